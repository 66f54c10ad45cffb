"""Visium HD: the names spatialdata-io gives its bin tables, and bins summed into pseudo-spots."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .._constants import Keys
from .._errors import InputError
from .._settings import logger
from ._record import Section
from .patches import PatchGeometry

HD_TABLE = re.compile(r"^square_(\d{3})um$")  # spatialdata_io.visium_hd table names: 'square_008um'


def table_name(bin_um: int) -> str:
    """Return the name spatialdata-io (and :func:`aggregate`) gives the table of ``bin_um`` µm bins."""
    return f"square_{int(bin_um):03d}um"


def aggregate(
    sdata: Any,
    sp: Any,
    bin_size: int,
    size_um: float,
    min_fraction: float = 0.5,
    key_added: str | None = None,
    fix: str | None = None,
) -> tuple[str, str]:
    """Sum the bins of section ``sp`` (from ``sdata``) into pseudo-spots.

    Returns the keys of the new table and shapes. ``fix``: what a refusal to replace a user's element
    tells the user to do (default: pass another ``key_added``).
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sps
    from shapely import box
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import get_transformation

    t = sp.table
    number = isinstance(size_um, int | float | np.integer | np.floating) and not isinstance(size_um, bool)
    if not (number and np.isfinite(size_um) and size_um > 0):
        raise InputError(f"`size_um=` must be a positive finite number of µm (e.g. 96), got {size_um!r}.")
    k = int(round(float(size_um) / bin_size))
    if k < 1:
        raise InputError(f"`size_um={size_um}` is smaller than the bins ({bin_size} µm).")
    if not 0 < min_fraction <= 1:
        raise InputError(f"`min_fraction` (share of the bins present) must be in (0, 1], got {min_fraction}.")
    width = k * bin_size
    missing = [c for c in ("array_row", "array_col") if c not in t.obs]
    if missing:
        raise InputError(
            f"Table {sp.keys.table_key!r} lacks obs {missing}: the bin grid positions are needed."
        )
    grid = np.column_stack([_grid_positions(t, c, sp.rows) for c in ("array_row", "array_col")])
    span = grid.max(0) - grid.min(0) + 1 if len(grid) else np.zeros(2, dtype=np.int64)
    if k > span.max():
        raise InputError(
            f"`size_um={size_um}` ({k} x {k} bins of {bin_size} µm) is wider than the section: its bins "
            f"span {int(span[0])} x {int(span[1])} grid positions "
            f"({int(span[0]) * bin_size} x {int(span[1]) * bin_size} µm). "
            "Pass the width of a pseudo-spot, e.g. `size_um=96`."
        )
    if sp.microns_per_pixel is None:
        raise InputError(f"The resolution of section {sp.name!r} is unknown; set `uns['microns_per_pixel']`.")
    key, src = key_added or table_name(width), sp.keys.shapes_key
    if key_added is None and src and table_name(bin_size) in src:
        shapes_key = src.replace(table_name(bin_size), key)  # the HD naming: '{dataset}_square_032um'
    else:
        shapes_key = f"{key}_shapes"
    from ..write import add_elements, check_free

    check_free(sdata, tables=[key], shapes=[shapes_key], fix=fix)
    rc = grid // k
    blocks, group = np.unique(rc, axis=0, return_inverse=True)
    group = group.ravel()
    n_bins = np.bincount(group, minlength=len(blocks))
    keep = n_bins >= min_fraction * k * k
    if not keep.any():
        raise InputError(
            f"No block of {k} x {k} bins of section {sp.name!r} holds {min_fraction:.0%} of its bins "
            f"(the most: {int(n_bins.max()) if len(n_bins) else 0}): nothing to sum. Pass a smaller "
            "`size_um=` or `min_fraction=`."
        )
    new_id = np.full(len(blocks), -1)
    new_id[keep] = np.arange(int(keep.sum()))
    g = new_id[group]
    member = g >= 0
    m = sps.csr_matrix(
        (np.ones(int(member.sum()), dtype=np.float32), (g[member], np.flatnonzero(member))),
        shape=(int(keep.sum()), len(g)),
    )
    x = sp.expression()
    counts = m @ (x if sps.issparse(x) else np.asarray(x))
    centres = (m @ sp.centers) / n_bins[keep][:, None]
    side = width / sp.microns_per_pixel  # level-0 image pixels
    ids = pd.Index(blocks[keep][:, 0].astype(str)).str.cat(blocks[keep][:, 1].astype(str), sep="_")
    ids = (key + "_" + ids).astype(str)
    half = side / 2
    squares = box(centres[:, 0] - half, centres[:, 1] - half, centres[:, 0] + half, centres[:, 1] + half)
    import geopandas as gpd

    transforms = get_transformation(sdata.images[sp.keys.image_key], get_all=True)
    shapes = ShapesModel.parse(gpd.GeoDataFrame(geometry=squares, index=ids), transformations=transforms)
    obs = pd.DataFrame(
        {
            "array_row": blocks[keep][:, 0],
            "array_col": blocks[keep][:, 1],
            "n_bins": n_bins[keep],
            Keys.REGION: pd.Categorical(np.repeat(shapes_key, len(ids))),
            "location_id": np.asarray(ids),
        },
        index=ids,
    )
    a = ad.AnnData(
        X=sps.csr_matrix(counts) if sps.issparse(counts) else counts, obs=obs, var=t.var[[]].copy()
    )
    a.obsm[Keys.SPATIAL] = centres
    a.uns[Keys.MPP] = sp.microns_per_pixel
    table = TableModel.parse(a, region=shapes_key, region_key=Keys.REGION, instance_key="location_id")
    add_elements(sdata, shapes={shapes_key: shapes}, tables={key: table}, by="sr.io.aggregate_bins")
    logger.info(
        f"Summed {int(member.sum())} bins of {bin_size} µm into {len(ids)} pseudo-spots of {width} µm: "
        f"table {key!r}, shapes {shapes_key!r}."
    )
    return key, shapes_key


def _grid_positions(t: Any, column: str, rows: np.ndarray) -> np.ndarray:
    """Whole-number grid positions ``obs[column]`` of the bins ``rows``, numbered 0, 1, 2, ... (step 1).

    Bins summed in blocks of ``k x k`` positions must be neighbours one position apart, as
    spatialdata-io numbers them: positions that are not whole numbers, or advance by 2 or more between
    neighbouring bins, are refused (a block would hold a quarter of the bins it should, or none).
    """
    raw = t.obs[column].to_numpy()[rows]
    try:
        v = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(
            f"obs[{column!r}] holds {raw[:3].tolist()}: the bin grid positions must be numbers."
        ) from e
    if not np.isfinite(v).all() or not np.array_equal(v, np.round(v)):
        bad = raw[~(np.isfinite(v) & (v == np.round(v)))][:3].tolist()
        raise InputError(
            f"obs[{column!r}] holds {bad}: the bin grid positions must be whole numbers (row / column of "
            "each bin)."
        )
    v = v.astype(np.int64)
    steps = np.diff(np.unique(v))
    step = int(np.gcd.reduce(steps)) if len(steps) else 1
    if step != 1:
        raise InputError(
            f"obs[{column!r}] advances by {step} between neighbouring bins (values "
            f"{np.unique(v)[:4].tolist()} ...); the bins are summed in blocks of neighbouring grid "
            "positions, numbered 0, 1, 2, ... as spatialdata-io numbers them. Renumber them "
            f"(`(obs[{column!r}] - obs[{column!r}].min()) // {step}`), or check that the column holds grid "
            "positions, not pixels."
        )
    return v


def bins_to_patches(
    secs: list[Section], geometry: PatchGeometry
) -> tuple[list[Section], list[tuple[Any, str, str]]]:
    """Visium HD sections -> their bins summed into pseudo-spots as wide as the patch the model reads.

    Returns the sections (others unchanged) and the (SpatialData, table, shapes) keys that were added.
    """
    from ._read import as_sections

    out, added = [], []
    for sp in secs:
        m = HD_TABLE.match(str(sp.keys.table_key or ""))
        if (m is None or sp.keys.kind != "spatialdata" or sp.microns_per_pixel is None
                or not {"array_row", "array_col"} <= set(sp.table.obs)):
            out.append(sp)
            continue
        bin_um = int(m.group(1))
        # the tissue width the patch shows on this section
        width_um = geometry.size_um or geometry.size_px * sp.microns_per_pixel
        k = int(round(width_um / bin_um))
        if k < 2:  # the bins are about as wide as the patch already
            out.append(sp)
            continue
        sdata, key = sp.source, table_name(k * bin_um)
        if key in sdata.tables:
            logger.info(f"Training on {key!r}, the {bin_um} µm bins already summed to the patch width.")
        else:
            width = k * bin_um
            fix = (f"`sr.tl.fit` sums the {bin_um} µm bins into pseudo-spots of {width} µm under this "
                   "name: rename that element, or sum them yourself with `sr.io.aggregate_bins(sdata, "
                   f"bin_size={bin_um}, size_um={width}, key_added=...)` and fit on that table "
                   "(`table_key=`), or pass `aggregate=False`.")
            key, skey = aggregate(sdata, sp, bin_um, width, fix=fix)
            added.append((sdata, key, skey))
        out.append(as_sections(sdata, table_key=key, image_key=sp.keys.image_key, need_image=True)[0])
    return out, added
