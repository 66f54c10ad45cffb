"""Visium HD: sum square bins into larger square pseudo-spots (e.g. the width a model's patch sees)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._constants import Keys
from .._section import InputError, add_elements, as_sections, check_free
from .._settings import logger
from .._undo import unchanged_on_failure


@unchanged_on_failure("sdata")
def aggregate_bins(
    sdata: Any,
    *,
    bin_size: int = 8,
    size_um: float = 96.0,
    min_fraction: float = 0.5,
    key_added: str | None = None,
) -> None:
    """Sum the counts of Visium HD bins into square pseudo-spots ``size_um`` wide.

    Bins are grouped by their grid position (``obs['array_row']``, ``obs['array_col']``) into blocks of
    ``k x k`` bins, ``k = round(size_um / bin_size)``. A pseudo-spot sits at the mean centre of the
    tissue bins it sums and is ``k * bin_size`` µm wide. Use it to train on HD data at the scale a
    patch sees (a 8 µm bin holds a few dozen counts and a fraction of one cell; a 100 µm patch sees
    a hundred cells). :func:`stranker.tl.fit` does this itself on HD bins (to the width of its patch);
    call it directly to choose another width, then ``sr.tl.fit(sdata, bin_size=k * bin_size)``.

    Parameters
    ----------
    sdata
        A SpatialData in the layout of ``spatialdata_io.visium_hd`` (tables ``'square_008um'`` ...).
    bin_size
        The bins to sum, in µm (2, 8 or 16).
    size_um
        Width of the pseudo-spots in µm; rounded to a multiple of ``bin_size``.
    min_fraction
        Keep a pseudo-spot when at least this fraction of its ``k x k`` bins are in the table (drops
        slivers at the tissue edge).
    key_added
        Name of the new table; default ``'square_{width:03d}um'`` (the HD naming, so ``bin_size=width``
        selects it), whose squares are added as shapes ``'{dataset}_square_{width:03d}um'``; with
        ``key_added``, shapes ``'{key_added}_shapes'``. Elements an earlier call added under these names
        are replaced; an element of the user's is not.

    Returns
    -------
    ``None``. Adds to ``sdata`` a table (summed counts in ``X``, ``obs['n_bins']``,
    ``obs['array_row']`` / ``obs['array_col']`` of the block, ``uns['microns_per_pixel']``) and the
    square shapes it annotates, placed like the image.
    """
    aggregate(sdata, as_sections(sdata, bin_size=bin_size)[0], bin_size, size_um, min_fraction, key_added)


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
    if sp.microns_per_pixel is None:
        raise InputError(f"The resolution of section {sp.name!r} is unknown; set `uns['microns_per_pixel']`.")
    key, src = key_added or f"square_{width:03d}um", sp.keys.shapes_key
    if key_added is None and src and f"square_{bin_size:03d}um" in src:
        shapes_key = src.replace(f"square_{bin_size:03d}um", key)  # the HD naming: '{dataset}_square_032um'
    else:
        shapes_key = f"{key}_shapes"
    check_free(sdata, tables=[key], shapes=[shapes_key], fix=fix)
    rc = (
        np.column_stack([t.obs["array_row"].to_numpy()[sp.rows], t.obs["array_col"].to_numpy()[sp.rows]]) // k
    )
    blocks, group = np.unique(rc, axis=0, return_inverse=True)
    group = group.ravel()
    n_bins = np.bincount(group, minlength=len(blocks))
    keep = n_bins >= min_fraction * k * k
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
