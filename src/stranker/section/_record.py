"""The section record: one section as stranker sees it, and where it was read from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._errors import InputError
from ._image import ImageHandle


@dataclass(frozen=True)
class ElementKeys:
    """Where a section was read from, to write back to it.

    Attributes
    ----------
    kind
        ``'spatialdata'``, ``'anndata'``, or ``None`` for a section made by stranker (e.g. tiles).
    image_key, shapes_key, table_key, coordinate_system
        The SpatialData elements and the coordinate system that were used.
    library_id
        The library of an AnnData's ``uns['spatial']``.
    """

    kind: str | None = None
    image_key: str | None = None
    shapes_key: str | None = None
    table_key: str | None = None
    coordinate_system: str | None = None
    library_id: str | None = None


@dataclass
class Section:
    """One section as stranker sees it.

    Attributes
    ----------
    name
        Section name (library id; the table key, or spatialdata-io's dataset id when the table is
        ``'table'``; or ``section_i``).
    image
        Lazy image handle, or ``None`` when the input has no image.
    centers
        ``(n, 2)`` spot centres ``(x, y)`` in level-0 pixels of ``image``.
    diameter
        Spot diameter in level-0 pixels.
    table
        The user's AnnData holding the spots (not a copy), or ``None`` for an image-only section.
    rows
        Row positions in ``table`` of these spots, in order.
    microns_per_pixel
        Level-0 resolution when known.
    source, keys
        The object handed over and the element keys that were used (for writing back).
    fullres_per_px
        Full-resolution pixels one level-0 pixel spans: 1 unless the image read is coarser than the
        full-resolution frame the spots were measured in (spatialdata-io's Visium read without its
        full-resolution image: the hires image, ``1 / tissue_hires_scalef``). ``size=`` in pixels
        counts full-resolution pixels.
    mpp_source
        Where ``microns_per_pixel`` came from (e.g. ``"scalefactors['microns_per_pixel']"``,
        ``'Visium spot (55 µm)'``, ``'microns_per_pixel='``), or ``None`` when unknown.
    warned
        Warnings already given about this section (each is given once per call).
    """

    name: str
    image: ImageHandle | None
    centers: np.ndarray
    diameter: float
    table: Any
    rows: np.ndarray
    microns_per_pixel: float | None = None
    source: Any = None
    keys: ElementKeys = field(default_factory=ElementKeys)
    fullres_per_px: float = 1.0
    mpp_source: str | None = None
    warned: set[str] = field(default_factory=set, repr=False, compare=False)

    @property
    def n_spots(self) -> int:
        return int(self.centers.shape[0])

    @property
    def obs_names(self) -> np.ndarray:
        return np.asarray(self.table.obs_names[self.rows])

    @property
    def var_names(self) -> np.ndarray:
        return np.asarray(self.table.var_names)

    @property
    def is_full_table(self) -> bool:
        return self.table is not None and len(self.rows) == self.table.n_obs and np.array_equal(
            self.rows, np.arange(self.table.n_obs)
        )

    def gene_columns(self, genes: Sequence[str]) -> np.ndarray:
        """Column of each gene in the table (``-1`` when absent); duplicated gene names are refused."""
        names = self.table.var_names
        if not names.is_unique:
            dup = names[names.duplicated()].unique()[:5].tolist()
            raise InputError(
                f"The table of section {self.name!r} has duplicated gene names in `var` (e.g. {dup}): "
                "a gene must name one column. Make them unique with `table.var_names_make_unique()` "
                "(or sum the duplicates) first."
            )
        return names.get_indexer(list(genes))

    def expression(self, layer: str | None = None, genes: Sequence[str] | None = None):
        """Expression of these spots (rows) from ``X`` or ``layers[layer]``, optionally for ``genes``."""
        if self.table is None:
            raise InputError(f"Section {self.name!r} has no table: it holds no expression.")
        if layer is None:
            mat = self.table.X
        else:
            if layer not in self.table.layers:
                raise InputError(
                    f"Layer {layer!r} not found in the table of section {self.name!r}; "
                    f"available layers: {sorted(self.table.layers)}. Pass `layer=None` to use `X`."
                )
            mat = self.table.layers[layer]
        if mat is None:
            raise InputError(f"The table of section {self.name!r} has no `X`; pass `layer=`.")
        if not self.is_full_table:
            mat = mat[self.rows]
        if genes is not None:
            idx = self.gene_columns(genes)
            if (idx < 0).any():
                missing = [g for g, i in zip(genes, idx, strict=True) if i < 0]
                raise InputError(
                    f"{len(missing)} gene(s) not in the table of section {self.name!r}, e.g. {missing[:5]}. "
                    "Choose genes present in every section (see `sr.pp.select_genes(..., on_missing=...)`)."
                )
            mat = mat[:, idx]
        return mat


MPP_RANGE = (0.05, 20.0)
"""The resolutions stranker accepts, in µm per pixel: those of microscope scans and their thumbnails.

From 0.05 µm/px (beyond a 100x oil objective's scan, about 0.1) to 20 µm/px (a downscaled Visium
image: ``tissue_lowres_scalef`` of a 0.5 µm/px scan is 0.025). A scale outside it is not a microscope's:
TIFF's default of 1 dpi (25 400 µm/px), the screen resolutions 72, 96, 300 dpi (353, 265, 85 µm/px), a
value in the wrong unit. Metadata outside it is treated as no resolution (refused with the way to give
it); an argument (``mpp=``, ``microns_per_pixel=``) outside it is refused, naming the range.
"""


def check_mpp(value: Any, what: str, fix: str = "", *, text: bool = False) -> float:
    """Return a resolution as ``float`` µm per pixel, or raise :class:`InputError` naming ``what``, ``fix``.

    ``value`` must be a number (not a bool; a numeric string only when ``text``: metadata stored as text,
    such as an OME-XML attribute), finite, positive and within :data:`MPP_RANGE`.
    """
    fix = f" {fix}" if fix else ""
    number = isinstance(value, int | float | np.integer | np.floating)
    number = number and not isinstance(value, bool | np.bool_)
    v = float("nan")
    if number or (text and isinstance(value, str | bytes)):
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = float("nan")
    elif isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iuf":
        v = float(value.reshape(-1)[0])  # a scalar stored as a 0-d / 1-element array (h5ad, zarr attrs)
    if not (np.isfinite(v) and v > 0):
        hint = ""
        if isinstance(value, str) and not text:
            hint = f" (a string: pass the number itself, e.g. {value.strip()})"
        raise InputError(
            f"{what} must be a positive finite number of µm per pixel, got {value!r}{hint}.{fix}"
        )
    lo, hi = MPP_RANGE
    if not lo <= v <= hi:
        raise InputError(
            f"{what} is {v:.4g} µm per pixel, outside the range of microscope scans stranker accepts "
            f"({lo:g}–{hi:g} µm/px): a screen default (72, 96, 300 dpi), TIFF's default 1 dpi or a value in "
            f"another unit, not the scale of a scan.{fix}"
        )
    return v


def check_scale_args(spot_diameter_um: Any, microns_per_pixel: Any) -> None:
    """Refuse ``spot_diameter_um=`` / ``microns_per_pixel=`` that are not one positive finite number.

    ``microns_per_pixel`` must moreover lie within :data:`MPP_RANGE` (:func:`check_mpp`).
    """
    if spot_diameter_um is not None and microns_per_pixel is not None:
        raise InputError(
            "Give at most one of `spot_diameter_um=` and `microns_per_pixel=`: each sets the scale."
        )
    if microns_per_pixel is not None:
        check_mpp(microns_per_pixel, "`microns_per_pixel=`")
    if spot_diameter_um is not None:
        value = spot_diameter_um
        number = isinstance(value, int | float | np.integer | np.floating)
        ok = number and not isinstance(value, bool | np.bool_)
        if not ok or not (np.isfinite(value) and value > 0):
            raise InputError(
                "`spot_diameter_um=` must be a positive finite number of µm (e.g. 55 for Visium, 100 for "
                f"legacy ST), got {value!r}."
            )


def given_scale(
    spot_diameter_um: float | None, microns_per_pixel: float | None, diameter: float, fullres_per_px: float,
    name: str,
) -> tuple[float, str] | None:
    """Level-0 µm/px and its source from the user's ``spot_diameter_um=`` / ``microns_per_pixel=``.

    ``microns_per_pixel`` is per full-resolution pixel; ``spot_diameter_um`` divides the spot diameter
    (``diameter``, level-0 pixels). ``None`` when neither is given.
    """
    check_scale_args(spot_diameter_um, microns_per_pixel)
    if microns_per_pixel is not None:
        return float(microns_per_pixel) * float(fullres_per_px), "microns_per_pixel="
    if spot_diameter_um is not None:
        if not (np.isfinite(diameter) and diameter > 0):
            raise InputError(
                f"`spot_diameter_um=` cannot set the scale of section {name!r}: its spots have no known "
                "diameter in pixels. Pass `microns_per_pixel=` instead."
            )
        return float(spot_diameter_um) / float(diameter), "spot_diameter_um="
    return None
