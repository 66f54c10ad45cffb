"""SpatialData (as ``spatialdata_io.visium``, ``visium_hd`` and stranker's readers write it) -> Section."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .._constants import SPOT_DIAMETER_UM, Keys
from .._errors import InputError
from ._image import ImageHandle
from ._read import choose
from ._record import ElementKeys, Section, check_mpp, given_scale
from .anndata import spaceranger_visium
from .visium_hd import HD_TABLE, table_name


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


def table_region(table: Any) -> tuple[list[str], str | None, str | None]:
    """Regions (element names), region key and instance key a table annotates."""
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


_MPP_FIX = ("Correct it, or pass `microns_per_pixel=` (µm per full-resolution pixel), which is used "
            "instead.")


def _image_mpp(sdata: Any, image_key: str | None) -> float | None:
    """Resolution of an image as :func:`stranker.io.read_slide` records it.

    Read from the element, then from the SpatialData attrs; a recorded value must pass
    :func:`stranker.section._record.check_mpp`.
    """
    if image_key is None:
        return None
    mpp = getattr(sdata.images[image_key], "attrs", {}).get(Keys.MPP)
    where = f"The attrs[{Keys.MPP!r}] of image {image_key!r}"
    if mpp is None:
        glob = getattr(sdata, "attrs", {}).get(Keys.MPP)
        mpp = glob.get(image_key) if isinstance(glob, dict) else glob
        where = f"sdata.attrs[{Keys.MPP!r}]" + (f"[{image_key!r}]" if isinstance(glob, dict) else "")
    if mpp is None:
        return None
    return check_mpp(mpp, where, _MPP_FIX, text=True)


def from_spatialdata(
    sdata: Any,
    *,
    image_key: str | None,
    shapes_key: str | None,
    table_key: str | None,
    coordinate_system: str | None,
    bin_size: int | None,
    need_image: bool,
    need_table: bool,
    spot_diameter_um: float | None = None,
    microns_per_pixel: float | None = None,
) -> Section:
    """Read the section of one table (and its shapes and image) of a SpatialData (see :func:`as_sections`)."""
    where = "the SpatialData"
    # --- table and the shapes it annotates
    spots_like = [k for k, g in sdata.shapes.items() if _shape_kind(g) is not None]
    tables = list(sdata.tables.keys())
    if bin_size is not None:
        if table_key is not None:
            raise InputError("Give `bin_size=` or `table_key=`, not both.")
        table_key = table_name(bin_size)
        if table_key not in sdata.tables:
            sizes = [int(m.group(1)) for t in tables if (m := HD_TABLE.match(t))]
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
        cands = [t for t in tables if shapes_key is None or shapes_key in table_region(sdata.tables[t])[0]]
        cands = [t for t in cands if set(table_region(sdata.tables[t])[0]) & set(spots_like)]
        if not cands and need_table:
            raise InputError(
                f"{where} has no table that annotates circle or square shapes (tables: {tables}, "
                f"such shapes: {spots_like}). "
                "Add one with `spatialdata.models.TableModel.parse(adata, region=..., ...)`."
            )
        hd = [t for t in cands if HD_TABLE.match(t)]
        if len(cands) > 1 and hd:
            sizes = sorted(int(HD_TABLE.match(t).group(1)) for t in hd)
            raise InputError(
                f"{where} holds several Visium HD bin tables {cands}: choose the bin size with `bin_size=` "
                f"(one of {sizes} µm), or a table with `table_key=`."
            )
        table_key = choose("table", cands, None, "table_key", where) if cands else None
    elif table_key not in sdata.tables:
        raise InputError(f"table {table_key!r} not found in {where}; candidates: {tables}.")
    table = sdata.tables[table_key] if table_key is not None else None

    if table is not None:
        regions, region_key, instance_key = table_region(table)
        shape_cands = [r for r in regions if r in spots_like]
        shapes_key = choose(
            "shapes element annotated by the table", shape_cands, shapes_key, "shapes_key", where
        )
    elif spots_like:
        shapes_key = choose("circle or square shapes element", spots_like, shapes_key, "shapes_key", where)
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
        image_key = choose("image", images, image_key, "image_key", where)

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
            coordinate_system = choose("shared coordinate system", shared, None, "coordinate_system", where)
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
        regions, region_key, instance_key = table_region(table)
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
    fullres = _fullres_per_px(sdata, table, image_key)
    default = table_key
    if table_key is not None and _GENERIC_TABLE.match(table_key) and _is_dataset_id(sdata, table, shapes_key):
        default = shapes_key  # spatialdata-io's Visium: 'table' annotates the spots named after the dataset
    name = _section_name(table, rows, default) if table is not None else (image_key or "section")
    given = given_scale(spot_diameter_um, microns_per_pixel, diameter, fullres, name)
    if given is None:
        given = _spatialdata_mpp(sdata, table, table_key, shapes_key, image_key, diameter)
    mpp, mpp_source = given
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
        fullres_per_px=fullres,
        mpp_source=mpp_source,
    )


_SPACERANGER_READERS = ("visium", "visium_hd")  # spatialdata-io readers of Space Ranger output
_GENERIC_TABLE = re.compile(r"table(_\d+)?$")


def _is_dataset_id(sdata: Any, table: Any, key: str | None) -> bool:
    """Whether ``key`` is the dataset id of Space Ranger output read by spatialdata-io.

    ``spatialdata_io.visium`` / ``visium_hd`` name the images ``{dataset_id}_hires_image`` (...), the
    coordinate system of full-resolution pixels ``{dataset_id}`` and the Visium spots ``{dataset_id}``;
    the table of Visium spots holds ``uns['spatial'][dataset_id]`` (squidpy layout).
    """
    if not key:
        return False
    spatial = table.uns.get(Keys.SPATIAL) if table is not None else None
    if isinstance(spatial, dict) and key in spatial:
        return True
    return getattr(sdata, "attrs", {}).get("spatialdata_io_reader") in _SPACERANGER_READERS and any(
        f"{key}{suffix}" in sdata.images for suffix in _IMAGE_PREFERENCE
    )


def _fullres_per_px(sdata: Any, table: Any, image_key: str | None) -> float:
    """Full-resolution pixels per level-0 pixel of the image (:attr:`Section.fullres_per_px`).

    Known for the images spatialdata-io reads from Space Ranger output: in the coordinate system
    ``{dataset_id}`` (full-resolution pixels), the hires image is scaled by ``1 / tissue_hires_scalef``.
    Elsewhere 1: level-0 pixels are the full resolution.
    """
    if image_key is None:
        return 1.0
    prefix = next((image_key[: -len(s)] for s in _IMAGE_PREFERENCE if image_key.endswith(s)), None)
    if not _is_dataset_id(sdata, table, prefix) or prefix not in _coordinate_systems(sdata.images[image_key]):
        return 1.0
    scale = float(np.sqrt(abs(np.linalg.det(_affine(sdata.images[image_key], prefix)[:2, :2]))))
    return scale if np.isfinite(scale) and scale > 0 else 1.0


def _spatialdata_mpp(
    sdata: Any, table: Any, table_key: str | None, shapes_key: str | None, image_key: str | None,
    diameter: float,
) -> tuple[float | None, str | None]:
    """Microns per level-0 image pixel and where it came from, from the first source that says.

    ``table.uns['microns_per_pixel']``; the image's record from :func:`stranker.io.read_slide`; a
    Visium HD bin table (``square_008um``: the bin side is 8 µm); the spots of a Visium dataset read by
    spatialdata-io (a spot is 55 µm wide), or of a table whose ``uns['spatial']`` names Space Ranger.
    ``(None, None)`` when none says.
    """
    if table is not None and table.uns.get(Keys.MPP) is not None:
        where = f"table {table_key!r} uns[{Keys.MPP!r}]"
        return check_mpp(table.uns[Keys.MPP], f"The {where}", _MPP_FIX, text=True), where
    mpp = _image_mpp(sdata, image_key)
    if mpp is not None:
        return mpp, f"image {image_key!r} ({Keys.MPP!r})"
    if image_key is None or not np.isfinite(diameter) or diameter <= 0:
        return None, None
    m = HD_TABLE.match(table_key or "")
    if m:
        return float(m.group(1)) / diameter, f"Visium HD bin ({int(m.group(1))} µm)"
    if _is_dataset_id(sdata, table, shapes_key):
        spatial = table.uns.get(Keys.SPATIAL) if table is not None else None
        lib = spatial.get(shapes_key) if isinstance(spatial, dict) else None
        meta = lib.get("metadata") if isinstance(lib, dict) else None
        if getattr(sdata, "attrs", {}).get("spatialdata_io_reader") == "visium" or spaceranger_visium(meta):
            um = SPOT_DIAMETER_UM["visium"]
            return um / diameter, f"Visium spot ({um:g} µm, Space Ranger)"
    return None, None


def _section_name(table: Any, rows: np.ndarray, default: str) -> str:
    """``uns['section']``, else the single value of ``obs['section']``, else ``default``.

    ``default`` is the table key, or the dataset id of spatialdata-io's Visium (whose table is ``'table'``).
    """
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


