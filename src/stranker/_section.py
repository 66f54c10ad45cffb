"""The one adapter: SpatialData | AnnData (squidpy layout) | list of either -> Section, and back.

No other module knows input formats. A :class:`Section` is a view of one section: an image handle
that reads lazily, spot centres in pixels of the image's finest level, the spot diameter in those
pixels and the table (the user's own AnnData, never copied here) with the rows that belong to it.
Every element stranker adds to a SpatialData goes through :func:`add_elements`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._constants import Keys
from ._pixels import float_range, to_uint8


class InputError(ValueError):
    """Raised when an input object does not have what stranker needs; the message says the fix."""


# --------------------------------------------------------------------------------------------
# image handle
# --------------------------------------------------------------------------------------------
@dataclass
class ImageHandle:
    """A lazily read RGB image with one or more resolution levels.

    Parameters
    ----------
    levels
        Arrays of dims ``(c, y, x)`` (numpy or dask), finest first.
    scales
        For each level, how many level-0 pixels one pixel of the level spans (1.0 for level 0).
    name
        Where the image came from, for messages.
    """

    levels: list[Any]
    scales: list[float]
    name: str = "image"
    float_max: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of level 0."""
        return int(self.levels[0].shape[1]), int(self.levels[0].shape[2])

    @property
    def n_channels(self) -> int:
        return int(self.levels[0].shape[0])

    def level_for(self, factor: float) -> int:
        """Return the coarsest level that still samples at least twice as finely as ``factor`` asks.

        ``factor`` is the number of level-0 pixels per output pixel. Keeping 2x oversampling before
        an antialiased resize keeps the patch close to one read from level 0.
        """
        best = 0
        for i, s in enumerate(self.scales):
            if s <= max(factor / 2.0, 1.0) + 1e-9 and s >= self.scales[best]:
                best = i
        return best

    def to_rgb(self, win: Any) -> np.ndarray:
        """Convert a ``(c, y, x)`` window of any level to ``(y, x, 3)`` uint8.

        Integer images are scaled by their dtype's range; a float image is 0–1 or 0–255 as decided
        once for the whole image (from its coarsest level, unless ``float_max`` was given); the values
        are scaled by :func:`stranker._pixels.to_uint8`. A grey image is repeated into three channels,
        an alpha channel dropped.
        """
        win = np.asarray(win.compute() if hasattr(win, "compute") else win)
        if np.issubdtype(win.dtype, np.floating) and self.float_max is None:
            coarsest = self.levels[int(np.argmax(self.scales))]
            self.float_max = float_range(coarsest.compute() if hasattr(coarsest, "compute") else coarsest)
        c = win.shape[0]
        if c == 4:
            win = win[:3]
        elif c == 1:
            win = np.repeat(win, 3, axis=0)
        elif c != 3:
            raise InputError(
                f"Image {self.name!r} has {c} channels; stranker expects an RGB H&E image (3 channels)."
            )
        try:
            win = to_uint8(win, self.float_max)
        except TypeError as e:
            raise InputError(f"Image {self.name!r}: {e}") from e
        return np.moveaxis(win, 0, -1)

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int, pad_value: int = 255) -> np.ndarray:
        """Read the window ``[y0:y1, x0:x1]`` of a level as ``(y, x, c)`` uint8, padding outside."""
        arr = self.levels[level]
        _, h, w = arr.shape
        out = np.full((y1 - y0, x1 - x0, 3), pad_value, dtype=np.uint8)
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        if cy1 <= cy0 or cx1 <= cx0:
            return out
        out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = self.to_rgb(arr[:, cy0:cy1, cx0:cx1])
        return out


# --------------------------------------------------------------------------------------------
# the view of one section
# --------------------------------------------------------------------------------------------
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
        Section name (library id, table key or ``section_i``).
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


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def as_sections(
    data: Any,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    library_id: str | None = None,
    library_key: str | None = None,
    coordinate_system: str | None = None,
    bin_size: int | None = None,
    need_image: bool = True,
    need_table: bool = True,
) -> list[Section]:
    """Turn a SpatialData, an AnnData in squidpy layout, or a list of either into Section.

    Parameters
    ----------
    data
        The user's object(s).
    image_key, shapes_key, table_key
        Elements of a SpatialData; detected when there is exactly one candidate.
    library_id
        Library of an AnnData's ``uns['spatial']``; detected when there is one.
    library_key
        Column of an AnnData's ``obs`` that holds each spot's library (squidpy's ``library_key``);
        default ``'library_id'`` when the AnnData holds several libraries.
    coordinate_system
        Coordinate system that links image and spots; detected when one is shared (or when the
        shared ones place the spots on the same image pixels).
    bin_size
        Visium HD: bin size in micrometres (2, 8, 16): uses table ``'square_{bin_size:03}um'`` and the
        squares it annotates (``spatialdata_io.visium_hd`` layout). Each bin is one spot.
    need_image, need_table
        Raise when the section has no image / no table.

    Returns
    -------
    One :class:`Section` per section.
    """
    items = list(data) if isinstance(data, list | tuple) else [data]
    if not items:
        raise InputError("Got an empty list: pass at least one SpatialData or AnnData.")
    out: list[Section] = []
    for i, item in enumerate(items):
        kind = _kind(item)
        if kind == "spatialdata":
            sp = _from_spatialdata(
                item,
                image_key=image_key,
                shapes_key=shapes_key,
                table_key=table_key,
                coordinate_system=coordinate_system,
                bin_size=bin_size,
                need_image=need_image,
                need_table=need_table,
            )
        elif kind == "anndata":
            sp = _from_anndata(item, library_id=library_id, library_key=library_key, need_image=need_image)
        else:
            raise InputError(
                f"Item {i} is a {type(item).__name__}; stranker takes a SpatialData, an AnnData in "
                "squidpy layout (obsm['spatial'], uns['spatial']), or a list of these."
            )
        if len(items) > 1 and sp.name in {s.name for s in out}:
            sp.name = f"{sp.name}_{i}"
        out.append(sp)
    return out


def _kind(obj: Any) -> str:
    for cls in type(obj).__mro__:
        if cls.__name__ == "SpatialData" and cls.__module__.startswith("spatialdata"):
            return "spatialdata"
        if cls.__name__ == "AnnData" and cls.__module__.startswith("anndata"):
            return "anndata"
    return "other"


def _choose(kind: str, candidates: Sequence[str], key: str | None, arg: str, where: str) -> str:
    """Pick a key among candidates; the error lists them."""
    candidates = list(candidates)
    if key is not None:
        if key not in candidates:
            raise InputError(f"{kind} {key!r} not found in {where}; candidates: {candidates}.")
        return key
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise InputError(f"{where} has no {kind}.")
    raise InputError(f"{where} has several {kind}s {candidates}: choose one with `{arg}=`.")


# --------------------------------------------------------------------------------------------
# SpatialData
# --------------------------------------------------------------------------------------------
def _affine(element: Any, cs: str) -> np.ndarray:
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, to_coordinate_system=cs)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)


def _coordinate_systems(element: Any) -> list[str]:
    from spatialdata.transformations import get_transformation

    return list(get_transformation(element, get_all=True).keys())


def _image_handle(element: Any, name: str) -> ImageHandle:
    """DataArray or DataTree (multiscale) -> ImageHandle."""
    if hasattr(element, "children") and len(getattr(element, "children", {})) > 0:  # DataTree
        levels = []
        for key in sorted(element.children, key=lambda k: int("".join(ch for ch in k if ch.isdigit()) or 0)):
            ds = element[key].ds if hasattr(element[key], "ds") else element[key]
            var = next(iter(ds.data_vars.values()))
            levels.append(var.transpose("c", "y", "x").data)
    else:
        if "c" not in element.dims:
            raise InputError(f"Image {name!r} has dims {element.dims}; expected ('c', 'y', 'x').")
        levels = [element.transpose("c", "y", "x").data]
    h0, w0 = levels[0].shape[1], levels[0].shape[2]
    scales = [float(np.sqrt((h0 / lv.shape[1]) * (w0 / lv.shape[2]))) for lv in levels]
    return ImageHandle(levels=levels, scales=scales, name=name)


# spot-like shapes: circles with a radius (Visium, ST, ours) or squares (Visium HD bins)
_VISIUM_SPOT_UM = 55.0  # diameter of a Visium spot
_HD_TABLE = re.compile(r"^square_(\d{3})um$")  # spatialdata_io.visium_hd table names
_IMAGE_PREFERENCE = ("_full_image", "_hires_image", "_lowres_image")  # spatialdata_io.visium(_hd) image names


def _shape_kind(gdf: Any) -> str | None:
    """``'circles'``, ``'squares'`` (axis-aligned square polygons), or ``None`` for other shapes."""
    if len(gdf) == 0:
        return None
    kind = gdf.geometry.iloc[0].geom_type
    if kind == "Point":
        return "circles" if "radius" in getattr(gdf, "columns", []) else None
    if kind != "Polygon":
        return None
    geom = gdf.geometry.iloc[:1000]  # a sample: Visium HD's 2 µm bins are millions of polygons
    b = geom.bounds.to_numpy()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    area = geom.area.to_numpy()
    if (geom.geom_type != "Polygon").any():
        return None
    square = np.allclose(w, h, rtol=0.05) and np.allclose(area, w * h, rtol=0.05)
    return "squares" if square else None


def _centres_and_diameters(gdf: Any) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``(n, 2)`` and diameters of circles, or centroids and sides of squares, in element units."""
    if _shape_kind(gdf) == "circles":
        xy = np.column_stack([gdf.geometry.x.to_numpy(), gdf.geometry.y.to_numpy()])
        return xy.astype(np.float64), 2 * gdf["radius"].to_numpy(dtype=np.float64)
    c = gdf.geometry.centroid
    xy = np.column_stack([c.x.to_numpy(), c.y.to_numpy()]).astype(np.float64)
    return xy, np.sqrt(gdf.geometry.area.to_numpy(dtype=np.float64))


def _table_region(table: Any) -> tuple[list[str], str | None, str | None]:
    attrs = table.uns.get("spatialdata_attrs", {})
    region = attrs.get("region")
    regions = [] if region is None else ([region] if isinstance(region, str) else list(region))
    return regions, attrs.get("region_key"), attrs.get("instance_key")


def _preferred_image(images: list[str]) -> str | None:
    """Return the finest of the images that ``spatialdata_io.visium`` / ``visium_hd`` wrote for a dataset."""
    for suffix in _IMAGE_PREFERENCE:
        hits = [k for k in images if k.endswith(suffix)]
        if len(hits) == 1 and all(k.endswith(_IMAGE_PREFERENCE) for k in images):
            prefixes = {k[: -len(s)] for k in images for s in _IMAGE_PREFERENCE if k.endswith(s)}
            return hits[0] if len(prefixes) == 1 else None
    return None


def _image_mpp(sdata: Any, image_key: str | None) -> float | None:
    """Resolution of an image as :func:`stranker.io.read_slide` records it.

    Read from the element, then from the SpatialData attrs.
    """
    if image_key is None:
        return None
    mpp = getattr(sdata.images[image_key], "attrs", {}).get(Keys.MPP)
    if mpp is None:
        glob = getattr(sdata, "attrs", {}).get(Keys.MPP)
        mpp = glob.get(image_key) if isinstance(glob, dict) else glob
    return float(mpp) if mpp is not None else None


def _from_spatialdata(
    sdata: Any,
    *,
    image_key: str | None,
    shapes_key: str | None,
    table_key: str | None,
    coordinate_system: str | None,
    bin_size: int | None,
    need_image: bool,
    need_table: bool,
) -> Section:
    where = "the SpatialData"
    # --- table and the shapes it annotates
    spots_like = [k for k, g in sdata.shapes.items() if _shape_kind(g) is not None]
    tables = list(sdata.tables.keys())
    if bin_size is not None:
        if table_key is not None:
            raise InputError("Give `bin_size=` or `table_key=`, not both.")
        table_key = f"square_{int(bin_size):03d}um"
        if table_key not in sdata.tables:
            sizes = [int(m.group(1)) for t in tables if (m := _HD_TABLE.match(t))]
            raise InputError(
                f"`bin_size={bin_size}`: {where} has no table {table_key!r} (Visium HD layout of "
                f"`spatialdata_io.visium_hd`); bin sizes present: {sizes or 'none'}."
            )
    if shapes_key is not None and shapes_key not in sdata.shapes:
        raise InputError(f"shapes {shapes_key!r} not found in {where}; candidates: {list(sdata.shapes)}.")
    if shapes_key is not None and shapes_key not in spots_like:
        raise InputError(
            f"Shapes {shapes_key!r} are neither circles with a `radius` column nor squares; "
            "stranker needs spots as circles (Visium, ST) or square bins (Visium HD)."
        )
    if table_key is None:
        cands = [t for t in tables if shapes_key is None or shapes_key in _table_region(sdata.tables[t])[0]]
        cands = [t for t in cands if set(_table_region(sdata.tables[t])[0]) & set(spots_like)]
        if not cands and need_table:
            raise InputError(
                f"{where} has no table that annotates circle or square shapes (tables: {tables}, "
                f"such shapes: {spots_like}). "
                "Add one with `spatialdata.models.TableModel.parse(adata, region=..., ...)`."
            )
        hd = [t for t in cands if _HD_TABLE.match(t)]
        if len(cands) > 1 and hd:
            sizes = sorted(int(_HD_TABLE.match(t).group(1)) for t in hd)
            raise InputError(
                f"{where} holds several Visium HD bin tables {cands}: choose the bin size with `bin_size=` "
                f"(one of {sizes} µm), or a table with `table_key=`."
            )
        table_key = _choose("table", cands, None, "table_key", where) if cands else None
    elif table_key not in sdata.tables:
        raise InputError(f"table {table_key!r} not found in {where}; candidates: {tables}.")
    table = sdata.tables[table_key] if table_key is not None else None

    if table is not None:
        regions, region_key, instance_key = _table_region(table)
        shape_cands = [r for r in regions if r in spots_like]
        shapes_key = _choose(
            "shapes element annotated by the table", shape_cands, shapes_key, "shapes_key", where
        )
    elif spots_like:
        shapes_key = _choose("circle or square shapes element", spots_like, shapes_key, "shapes_key", where)
    else:
        shapes_key = None

    # --- image
    images = list(sdata.images.keys())
    if not images:
        if need_image:
            raise InputError(
                f"{where} has no image element; stranker needs the H&E image "
                "(add it with `spatialdata.models.Image2DModel.parse`)."
            )
        image_key = None
    elif image_key is None and len(images) > 1 and _preferred_image(images) is not None:
        image_key = _preferred_image(images)
    else:
        image_key = _choose("image", images, image_key, "image_key", where)

    # --- coordinate system shared by image and shapes
    cs_sets = []
    if image_key is not None:
        cs_sets.append(set(_coordinate_systems(sdata.images[image_key])))
    if shapes_key is not None:
        cs_sets.append(set(_coordinate_systems(sdata.shapes[shapes_key])))
    shared = sorted(set.intersection(*cs_sets)) if cs_sets else []

    def to_pixels(cs: str) -> np.ndarray:
        a_sh = _affine(sdata.shapes[shapes_key], cs) if shapes_key is not None else np.eye(3)
        if image_key is None:
            return a_sh
        return np.linalg.inv(_affine(sdata.images[image_key], cs)) @ a_sh

    if coordinate_system is None:
        if not shared:
            raise InputError(
                f"Image {image_key!r} and shapes {shapes_key!r} share no coordinate system; "
                "add transformations that place both in one system."
            )
        if "global" in shared:
            coordinate_system = "global"
        elif len(shared) > 1 and all(np.allclose(to_pixels(cs), to_pixels(shared[0])) for cs in shared[1:]):
            coordinate_system = shared[0]  # e.g. Visium's '{id}' and '{id}_downscaled_hires' agree
        else:
            coordinate_system = _choose("shared coordinate system", shared, None, "coordinate_system", where)
    elif coordinate_system not in shared:
        raise InputError(
            f"coordinate system {coordinate_system!r} not shared by image and shapes; shared: {shared}."
        )

    image = _image_handle(sdata.images[image_key], image_key) if image_key is not None else None

    # --- spot centres in level-0 image pixels
    if shapes_key is not None:
        gdf = sdata.shapes[shapes_key]
        xy, diam = _centres_and_diameters(gdf)
        m = to_pixels(coordinate_system)
        xy = xy @ m[:2, :2].T + m[:2, 2]
        diam = diam * float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
        shape_index = gdf.index
    else:
        xy = np.zeros((0, 2))
        diam = np.zeros(0)
        shape_index = None

    # --- rows of the table that annotate these shapes, in table order
    if table is not None:
        regions, region_key, instance_key = _table_region(table)
        if region_key is not None and region_key in table.obs:
            rows = np.flatnonzero(table.obs[region_key].astype(str).to_numpy() == shapes_key)
        else:
            rows = np.arange(table.n_obs)
        inst = (
            table.obs[instance_key].to_numpy()[rows] if instance_key in table.obs else table.obs_names[rows]
        )
        pos = _index_positions(shape_index, inst)
        if (pos < 0).any():
            raise InputError(
                f"{int((pos < 0).sum())} row(s) of table {table_key!r} point to instances missing from "
                f"shapes {shapes_key!r} (e.g. {list(np.asarray(inst)[pos < 0][:3])}); "
                "the table and shapes disagree."
            )
        xy, diam = xy[pos], diam[pos]
    else:
        rows = np.arange(len(xy))

    bad = ~(np.isfinite(diam) & (diam > 0))
    if bad.any():
        raise InputError(
            f"{int(bad.sum())} spot(s) of shapes {shapes_key!r} have a zero, negative or missing size "
            f"(e.g. {list(np.asarray(diam)[bad][:3])}); "
            "give every spot its radius (circles) or area (squares)."
        )
    diameter = float(np.median(diam)) if len(diam) else float("nan")
    mpp = _spatialdata_mpp(sdata, table, table_key, image_key, diameter)
    name = _section_name(table, rows, table_key) if table is not None else (image_key or "section")
    return Section(
        name=name,
        image=image,
        centers=xy,
        diameter=diameter,
        table=table,
        rows=rows,
        microns_per_pixel=mpp,
        source=sdata,
        keys=ElementKeys(
            kind="spatialdata",
            image_key=image_key,
            shapes_key=shapes_key,
            table_key=table_key,
            coordinate_system=coordinate_system,
        ),
    )


def _spatialdata_mpp(sdata: Any, table: Any, table_key: str | None, image_key: str | None,
                     diameter: float) -> float | None:
    """Microns per level-0 image pixel, from the first source that says.

    ``table.uns['microns_per_pixel']``; the image's record from :func:`stranker.io.read_slide`; a
    Visium HD bin table (``square_008um``: the bin side is 8 µm); a Visium SpatialData read by
    spatialdata-io (a spot is 55 µm wide).
    """
    if table is not None and table.uns.get(Keys.MPP) is not None:
        return float(table.uns[Keys.MPP])
    mpp = _image_mpp(sdata, image_key)
    if mpp is not None or image_key is None or not np.isfinite(diameter) or diameter <= 0:
        return mpp
    m = _HD_TABLE.match(table_key or "")
    if m:
        return float(m.group(1)) / diameter
    if getattr(sdata, "attrs", {}).get("spatialdata_io_reader") == "visium":
        return _VISIUM_SPOT_UM / diameter
    return None


def _section_name(table: Any, rows: np.ndarray, default: str) -> str:
    """``uns['section']``, else the single value of ``obs['section']``, else the table key."""
    if "section" in table.uns:
        return str(table.uns["section"])
    if "section" in table.obs and len(rows):
        vals = np.unique(table.obs["section"].astype(str).to_numpy()[rows])
        if len(vals) == 1:
            return str(vals[0])
    return str(default)


def _index_positions(index: Any, values: np.ndarray) -> np.ndarray:
    import pandas as pd

    idx = pd.Index(index)
    pos = idx.get_indexer(values)
    if (pos < 0).any():  # instance ids stored as str in one and int in the other
        pos2 = pd.Index(idx.astype(str)).get_indexer(np.asarray(values).astype(str))
        pos = np.where(pos < 0, pos2, pos)
    return pos


# --------------------------------------------------------------------------------------------
# AnnData, squidpy layout
# --------------------------------------------------------------------------------------------
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


def _from_anndata(
    adata: Any, *, library_id: str | None, library_key: str | None, need_image: bool
) -> Section:
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
        lib = _choose("library", libs, library_id, "library_id", "uns['spatial'] of the AnnData")
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
        image = _ScaledImage(levels=levels, scales=scales, name=f"uns['spatial'][{lib!r}]['images']")
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
    mpp = scalef.get(Keys.MPP, adata.uns.get(Keys.MPP))
    return Section(
        name=str(lib) if lib is not None else "section",
        image=image,
        centers=xy[rows],
        diameter=diameter,
        table=adata,
        rows=rows,
        microns_per_pixel=float(mpp) if mpp is not None else None,
        source=adata,
        keys=ElementKeys(kind="anndata", library_id=lib),
    )


class _ScaledImage(ImageHandle):
    """Image whose level 0 is a full-resolution frame that may not be stored (Visium hires/lowres).

    ``scales[i]`` says how many full-resolution pixels one pixel of level ``i`` spans; the full
    resolution itself is addressed through the finest stored level.
    """

    @property
    def shape(self) -> tuple[int, int]:
        s = self.scales[0]
        return int(round(self.levels[0].shape[1] * s)), int(round(self.levels[0].shape[2] * s))


# --------------------------------------------------------------------------------------------
# elements added to a SpatialData
# --------------------------------------------------------------------------------------------
_ELEMENT_TYPES = ("images", "labels", "points", "shapes", "tables")


def _record(element: Any) -> dict:
    """Where an element keeps stranker's record: a table's ``uns``, a shapes' or image's ``attrs``."""
    return element.uns if hasattr(element, "uns") else element.attrs


def written_by_stranker(element: Any, key: str) -> bool:
    """Whether stranker added ``element`` to a SpatialData under the name ``key`` (so it may replace it)."""
    rec = _record(element).get(Keys.WRITTEN)
    return isinstance(rec, Mapping) and rec.get("key") == key


def check_free(
    sdata: Any,
    *,
    tables: Sequence[str] = (),
    shapes: Sequence[str] = (),
    images: Sequence[str] = (),
    arg: str = "key_added",
    fix: str | None = None,
) -> None:
    """Refuse names held by an element that stranker did not write there (before any work is done).

    A name is free when no element of any type holds it (SpatialData names are unique across types,
    whatever their case), or when the element of that type under that name is one stranker added.
    Shapes that stay annotated by a table not written in the same call are not replaced either.

    Parameters
    ----------
    sdata
        The SpatialData.
    tables, shapes, images
        Names of the elements to write.
    arg
        The argument that named them, for the message.
    fix
        What the message tells the user to do instead of passing another ``arg`` (for names the
        user did not choose).
    """
    fix = fix or f"Pass another `{arg}=`."
    wanted = {"tables": list(tables), "shapes": list(shapes), "images": list(images)}
    for kind, names in wanted.items():
        for name in names:
            for other in _ELEMENT_TYPES:
                for key, element in getattr(sdata, other).items():
                    if key.lower() != name.lower() or (
                        other == kind and key == name and written_by_stranker(element, key)
                    ):
                        continue
                    raise InputError(
                        f"The SpatialData holds {other} element {key!r}, which stranker did not write: "
                        f"it is not replaced. {fix}"
                    )
    for name in wanted["shapes"]:
        others = {k: t for k, t in sdata.tables.items() if k not in wanted["tables"]}
        users = [k for k, t in others.items() if name in _table_region(t)[0]]
        if name in sdata.shapes and users:
            raise InputError(
                f"Shapes {name!r} are annotated by table(s) {users}: they are not replaced. {fix} "
                "Or delete those tables first."
            )


def add_elements(
    sdata: Any,
    *,
    tables: Mapping[str, Any] | None = None,
    shapes: Mapping[str, Any] | None = None,
    images: Mapping[str, Any] | None = None,
    by: str | None = None,
    arg: str = "key_added",
) -> None:
    """Add elements to a SpatialData: the one way stranker writes them.

    An element of the user's under a name is never replaced (:func:`check_free` refuses, naming
    ``arg``); one that stranker added earlier under that name is.

    Parameters
    ----------
    sdata
        The SpatialData.
    tables, shapes, images
        New elements by name (parsed by their ``spatialdata.models``); shapes and images are added
        before the tables that annotate them.
    by
        The stranker function that derived them (e.g. ``'sr.tl.predict'``), recorded in each element
        (``uns`` / ``attrs[Keys.WRITTEN]``; kept by a zarr round trip for tables and shapes, not for
        images) so that a later call may replace it; ``None`` for elements that are the data itself
        (a reader's).
    arg
        The argument that named them, for the message.
    """
    groups = {"images": dict(images or {}), "shapes": dict(shapes or {}), "tables": dict(tables or {})}
    check_free(sdata, **{k: list(v) for k, v in groups.items()}, arg=arg)
    for kind, elements in groups.items():
        for name, element in elements.items():
            if by is not None:
                _record(element)[Keys.WRITTEN] = {"by": by, "key": name}
            getattr(sdata, kind)[name] = element
