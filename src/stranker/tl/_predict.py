"""sr.tl.predict: embeddings and expression on any section, with or without spots."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._constants import Keys
from .._settings import logger
from .._spots import InputError, Spots, as_spots
from ..pp._patches import check_inside
from ._fit import write_outputs


def tissue_grid(sp: Spots, spacing: float, min_tissue: float = 0.5) -> np.ndarray:
    """Centres (level-0 px) of a square grid of ``spacing``-wide tiles that lie on tissue.

    Tissue is told from background on the coarsest image level by Otsu's threshold on colour
    saturation (H&E stains are saturated, glass is not); a tile is kept when at least
    ``min_tissue`` of it is tissue.
    """
    from scipy.ndimage import uniform_filter
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu

    img = sp.image
    level = len(img.scales) - 1
    s = img.scales[level]
    _, h, w = img.levels[level].shape
    rgb = img.read(level, 0, h, 0, w)
    sat = rgb2hsv(rgb)[..., 1]
    thr = threshold_otsu(sat) if np.ptp(sat) > 0 else 1.0
    mask = (sat > max(thr, 0.05)).astype(np.float32)
    side = max(int(round(spacing / s)), 1)
    frac = uniform_filter(mask, size=side, mode="constant")
    h0, w0 = img.shape
    xs = np.arange(spacing / 2, w0, spacing)
    ys = np.arange(spacing / 2, h0, spacing)
    gx, gy = np.meshgrid(xs, ys)
    centres = np.column_stack([gx.ravel(), gy.ravel()])
    iy = np.clip((centres[:, 1] / s).astype(int), 0, h - 1)
    ix = np.clip((centres[:, 0] / s).astype(int), 0, w - 1)
    return centres[frac[iy, ix] >= min_tissue]


def _tile_section(sp: Spots, model: Any, tile_px: float | None) -> tuple[Spots, float]:
    if tile_px is None:
        d_um, mpp = model.meta.get("spot_diameter_um"), sp.microns_per_pixel
        tile_px = d_um / mpp if d_um and mpp else model.meta.get("spot_diameter_px")
    if not tile_px or not np.isfinite(tile_px) or tile_px <= 0:
        raise InputError("Cannot tell the tile size for this slide: pass `tile_px=` (pixels of its image).")
    centres = tissue_grid(sp, float(tile_px))
    if len(centres) == 0:
        raise InputError(f"No tissue found on the image of section {sp.name!r}; pass spots or check the image.")
    logger.info(f"Laid {len(centres)} tiles of {tile_px:.0f} px over the tissue of {sp.name!r}.")
    tiled = Spots(name=sp.name, image=sp.image, centers=centres, diameter=float(tile_px), table=None,
                  rows=np.arange(len(centres)), microns_per_pixel=sp.microns_per_pixel, source=sp.source, keys=sp.keys)
    return tiled, float(tile_px)


def _new_table(sp: Spots, model: Any, emb: np.ndarray, pred: np.ndarray, key_added: str, shapes_key: str,
               index: Any) -> Any:
    import anndata as ad
    import pandas as pd
    from spatialdata.models import TableModel

    ids = [str(i) for i in index]
    obs = pd.DataFrame({Keys.INSTANCE: list(index), Keys.REGION: pd.Categorical([shapes_key] * len(ids))},
                       index=ids)
    a = ad.AnnData(X=pred.astype(np.float32), obs=obs, var=pd.DataFrame(index=list(model.genes)))
    a.obsm[Keys.SPATIAL] = sp.centers.copy()
    if sp.microns_per_pixel is not None:
        a.uns[Keys.MPP] = sp.microns_per_pixel
    return TableModel.parse(a, region=shapes_key, region_key=Keys.REGION, instance_key=Keys.INSTANCE)


def predict(
    model: Any,
    data: Any,
    *,
    key_added: str = Keys.PREFIX,
    device: str | None = None,
    tile_px: float | None = None,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    library_id: str | None = None,
) -> None:
    """Predict expression and image embeddings on any section.

    Parameters
    ----------
    model
        A fitted :class:`stranker.Model`.
    data
        SpatialData, AnnData (squidpy layout) or a list. A SpatialData with an image but no spots
        gets a grid of spot-sized tiles over its tissue.
    key_added
        Prefix of the written keys.
    device
        Torch device; default ``sr.settings.device``.
    tile_px
        Tile side for image-only slides, in image pixels (default: the training spot size).
    image_key, shapes_key, table_key, library_id
        Which elements when there are several.

    Returns
    -------
    ``None``. On sections with spots and a table, writes ``obsm['X_{key_added}']``,
    ``layers[key_added]`` (modelled genes; others NaN) and ``uns[key_added]`` (``in_sample=False``).
    On an image-only SpatialData, adds circles ``'{key_added}_tiles'`` and a table
    ``'{key_added}_table'`` (predictions in ``X`` and ``layers[key_added]``) annotating them.
    """
    need_image = model.config.image_features is None
    secs = as_spots(data, image_key=image_key, shapes_key=shapes_key, table_key=table_key, library_id=library_id,
                    need_image=need_image, need_table=False)
    plans = []
    for sp in secs:
        if sp.n_spots == 0:
            if sp.keys.get("kind") != "spatialdata":
                raise InputError(f"Section {sp.name!r} has no spots.")
            tiled, _ = _tile_section(sp, model, tile_px)
            plans.append(("tiles", tiled, *model.infer(tiled, device=device)))
        else:
            if need_image:
                check_inside(sp)
            plans.append(("spots", sp, *model.infer(sp, device=device)))
    # everything computed: write
    for kind, sp, emb, pred in plans:
        if kind == "spots" and sp.table is not None:
            write_outputs(sp, model, emb, pred, key_added, in_sample=False)
            continue
        import geopandas  # noqa: F401  (spatialdata shapes)
        from spatialdata.models import ShapesModel
        from spatialdata.transformations import get_transformation

        sdata = sp.source
        if kind == "tiles":
            region = f"{key_added}_tiles"
            transforms = get_transformation(sdata.images[sp.keys["image_key"]], get_all=True)
            index = [f"tile_{i}" for i in range(sp.n_spots)]
            sdata.shapes[region] = ShapesModel.parse(
                sp.centers, geometry=0, radius=np.full(sp.n_spots, sp.diameter / 2), index=np.asarray(index),
                transformations=transforms,
            )
        else:
            region = sp.keys["shapes_key"]
            index = list(sdata.shapes[region].index)
        table = _new_table(sp, model, emb, pred, key_added, region, index)
        new = Spots(name=sp.name, image=sp.image, centers=sp.centers, diameter=sp.diameter, table=table,
                    rows=np.arange(sp.n_spots), microns_per_pixel=sp.microns_per_pixel)
        write_outputs(new, model, emb, pred, key_added, in_sample=False)
        sdata.tables[f"{key_added}_table"] = table
        logger.info(f"Adding table {key_added + '_table'!r} annotating {region!r}")
