"""AnnData in squidpy / scanpy layout (``obsm['spatial']``, ``uns['spatial'][library_id]``) -> Section."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._constants import SPOT_DIAMETER_UM, Keys
from .._errors import InputError
from ._image import ScaledImage
from ._read import choose
from ._record import ElementKeys, Section, check_mpp, given_scale


def spaceranger_visium(metadata: Any) -> bool:
    """Whether a library's ``metadata`` (``uns['spatial'][lib]['metadata']``) says Space Ranger's Visium.

    squidpy's and scanpy's readers copy ``software_version`` (``'spaceranger-2.1.0'``) and
    ``chemistry_description`` from the Space Ranger matrix; a Visium HD chemistry is not a 55 µm spot.
    """
    if not isinstance(metadata, dict):
        return False
    software = str(metadata.get("software_version", "")).strip().lower()
    chemistry = str(metadata.get("chemistry_description", "")).lower()
    return software.startswith("spaceranger") and "visium hd" not in chemistry


def _positive(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None


def anndata_mpp(adata: Any, lib: str | None, info: dict, diameter: float) -> tuple[float | None, str | None]:
    """Microns per full-resolution pixel of a library, and where it came from; ``(None, None)`` when unknown.

    From the first source that says: ``scalefactors['microns_per_pixel']`` (Space Ranger's Visium HD),
    ``uns['microns_per_pixel']``, ``scalefactors['bin_size_um']`` over the bin side, and the 55 µm spot
    of Visium when the library's metadata names Space Ranger (:func:`spaceranger_visium`). Nothing is
    guessed from the spot size alone: legacy ST, or a Visium matrix without its metadata, stays unknown.
    A recorded µm/px that is not a positive finite number within
    :data:`stranker.section._record.MPP_RANGE` is refused.
    """
    scalef = dict(info.get("scalefactors", {}))
    where = f"uns['spatial'][{lib!r}]['scalefactors']"
    for value, source in (
        (scalef.get(Keys.MPP), f"{where}[{Keys.MPP!r}]"),
        (adata.uns.get(Keys.MPP), f"uns[{Keys.MPP!r}]"),
    ):
        if value is not None:
            fix = ("Correct it, or pass `microns_per_pixel=` (µm per full-resolution pixel), which is used "
                   "instead.")
            return check_mpp(value, source, fix, text=True), source
    if not (np.isfinite(diameter) and diameter > 0):
        return None, None
    bin_um = _positive(scalef.get("bin_size_um"))
    if bin_um is not None:
        return bin_um / diameter, f"{where}['bin_size_um'] (Visium HD bin)"
    if "bin_size_um" not in scalef and spaceranger_visium(info.get("metadata")):
        um = SPOT_DIAMETER_UM["visium"]
        return um / diameter, f"Visium spot ({um:g} µm, Space Ranger)"
    return None, None


def _library_rows(adata: Any, lib: str | None, libs: list[str], library_key: str | None) -> np.ndarray:
    """Rows of ``adata`` that belong to library ``lib``: by ``obs[library_key]`` (squidpy's ``library_key``).

    Without a key, ``obs['library_id']`` is used when the AnnData holds several libraries; with several
    libraries and no such column, which row belongs to which image is unknown: refuse.
    """
    if library_key is None and len(libs) > 1:
        if "library_id" not in adata.obs:
            raise InputError(
                f"The AnnData holds {len(libs)} libraries in uns['spatial'] ({libs[:5]}) and no "
                "obs['library_id']: say which obs column holds each spot's library with `library_key=`."
            )
        library_key = "library_id"
    if library_key is None and "library_id" in adata.obs and adata.obs["library_id"].nunique() > 1:
        raise InputError(
            f"obs['library_id'] names {adata.obs['library_id'].nunique()} libraries but uns['spatial'] holds "
            f"only {libs}: pass `library_key='library_id'` to keep the rows of {lib!r}."
        )
    if library_key is None or lib is None:
        return np.arange(adata.n_obs)
    if library_key not in adata.obs:
        raise InputError(
            f"`library_key={library_key!r}` is not a column of obs; columns: {list(adata.obs.columns)[:10]}."
        )
    rows = np.flatnonzero(adata.obs[library_key].astype(str).to_numpy() == str(lib))
    if len(rows) == 0:
        values = list(dict.fromkeys(adata.obs[library_key].astype(str)))[:5]
        raise InputError(
            f"No row of the AnnData has obs[{library_key!r}] == {lib!r} (values: {values}): the libraries of "
            "uns['spatial'] and the column disagree."
        )
    return rows


def from_anndata(
    adata: Any,
    *,
    library_id: str | None,
    library_key: str | None,
    need_image: bool,
    spot_diameter_um: float | None = None,
    microns_per_pixel: float | None = None,
) -> Section:
    """Read one library of an AnnData in squidpy / scanpy layout (see :func:`as_sections`)."""
    where = "the AnnData"
    if Keys.SPATIAL not in adata.obsm:
        raise InputError(
            f"{where} has no obsm['spatial'] (spot centres in full-resolution pixels); "
            "pass a SpatialData or add the coordinates."
        )
    xy = np.asarray(adata.obsm[Keys.SPATIAL], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise InputError(
            f"obsm['spatial'] of {where} has shape {xy.shape}; expected (n_spots, 2): x, y in pixels."
        )
    xy = xy[:, :2]
    spatial = adata.uns.get(Keys.SPATIAL, {})
    libs = list(spatial.keys()) if isinstance(spatial, dict) else []
    if not libs:
        if need_image:
            raise InputError(
                f"{where} has no uns['spatial'][library_id] with images and scalefactors; stranker needs "
                "the H&E image (squidpy layout: uns['spatial'][lib]['images']['hires'])."
            )
        lib, info = None, {}
    else:
        lib = choose("library", libs, library_id, "library_id", "uns['spatial'] of the AnnData")
        info = spatial[lib]
    scalef = dict(info.get("scalefactors", {}))
    images = dict(info.get("images", {}))
    rows = _library_rows(adata, lib, libs, library_key)
    image = None
    if images:
        levels, scales = [], []
        for res, sf_key in (("hires", "tissue_hires_scalef"), ("lowres", "tissue_lowres_scalef")):
            if res in images:
                if sf_key not in scalef:
                    raise InputError(
                        f"uns['spatial'][{lib!r}]['scalefactors'] lacks {sf_key!r}, "
                        f"needed to place spots on the {res} image."
                    )
                img = np.asarray(images[res])
                if img.ndim == 2:
                    img = img[..., None]
                if img.ndim != 3 or (img.shape[-1] not in (1, 3, 4) and img.shape[0] in (1, 3, 4)):
                    raise InputError(
                        f"uns['spatial'][{lib!r}]['images'][{res!r}] has shape {img.shape}; "
                        "the squidpy layout stores (y, x, channels): "
                        "pass `np.moveaxis(img, 0, -1)` for a (c, y, x) image."
                    )
                sf = float(scalef[sf_key])
                if not (np.isfinite(sf) and sf > 0):
                    raise InputError(
                        f"uns['spatial'][{lib!r}]['scalefactors'][{sf_key!r}] must be a positive number, "
                        f"got {sf}."
                    )
                levels.append(np.moveaxis(img, -1, 0))
                scales.append(1.0 / sf)
        others = sorted(set(images) - {"hires", "lowres"})
        if not levels:
            raise InputError(f"uns['spatial'][{lib!r}]['images'] has {others}; expected 'hires' or 'lowres'.")
        order = np.argsort(scales)
        # level 0 is expressed in full-resolution pixels: rescale the finest image's frame
        levels = [levels[i] for i in order]
        scales = [scales[i] for i in order]
        image = ScaledImage(levels=levels, scales=scales, name=f"uns['spatial'][{lib!r}]['images']")
    elif need_image:
        raise InputError(f"uns['spatial'][{lib!r}] has no 'images'; stranker needs the H&E image.")
    if "spot_diameter_fullres" in scalef:
        diameter = float(scalef["spot_diameter_fullres"])
        if not (np.isfinite(diameter) and diameter > 0):
            raise InputError(
                f"uns['spatial'][{lib!r}]['scalefactors']['spot_diameter_fullres'] must be a positive number "
                f"of full-resolution pixels, got {diameter}."
            )
    elif need_image:
        raise InputError(f"uns['spatial'][{lib!r}]['scalefactors'] lacks 'spot_diameter_fullres'.")
    else:
        diameter = float("nan")
    # level 0 is the full-resolution frame: µm per full-resolution pixel is the level-0 resolution
    name = str(lib) if lib is not None else "section"
    given = given_scale(spot_diameter_um, microns_per_pixel, diameter, 1.0, name)
    mpp, mpp_source = given if given is not None else anndata_mpp(adata, lib, info, diameter)
    return Section(
        name=name,
        image=image,
        centers=xy[rows],
        diameter=diameter,
        table=adata,
        rows=rows,
        microns_per_pixel=mpp,
        source=adata,
        keys=ElementKeys(kind="anndata", library_id=lib),
        mpp_source=mpp_source,
    )

