"""sr.tl.embed_slides: one vector per whole slide from the tiles of its tissue."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .._constants import Keys
from .._errors import InputError
from .._settings import logger, resolve_seed, settings
from ..section import as_sections
from ._cohort import SlideInput, mpp_of, read_input, slide_inputs
from ._predict import as_model, spots_or_tiles


def _open_paths(items: list[Any]) -> list[Any]:
    """Expand the paths among ``items`` into :class:`SlideInput` (read later, one at a time); keep objects."""
    import os

    out: list[Any] = []
    for it in items:
        out += slide_inputs(it) if isinstance(it, str | os.PathLike) else [it]
    return out


def slide_ids(slides: list[Any], obs: Any) -> list[str]:
    """Return slide ids: ``attrs['slide_id']`` of each SpatialData, else the index of ``obs``, else ranks."""
    attrs = [getattr(s, "attrs", None) or {} for s in slides]
    from_attrs = [a.get(Keys.SLIDE_ID) for a in attrs]
    if all(i is not None for i in from_attrs):
        ids = [str(i) for i in from_attrs]
    elif any(i is not None for i in from_attrs):
        missing = [k for k, i in enumerate(from_attrs) if i is None]
        raise InputError(
            f"Slides {missing[:5]} have no `attrs[{Keys.SLIDE_ID!r}]` while others do: set it on every "
            "slide, or on none and pass `obs=` in slide order."
        )
    elif obs is not None:
        if len(obs) != len(slides):
            raise InputError(
                f"`obs` has {len(obs)} rows for {len(slides)} slides, and the slides carry no "
                f"`attrs[{Keys.SLIDE_ID!r}]` to match them by: pass one row per slide, in slide order."
            )
        ids = [str(i) for i in obs.index]
    else:
        ids = [f"slide_{i}" for i in range(len(slides))]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise InputError(f"Slide ids must be unique; repeated: {dup[:5]}.")
    return ids


def _slide_obs(slides: list[Any], ids: list[str], obs: Any) -> Any:
    """Per-slide metadata: scalar ``attrs`` of each slide, joined with the rows of ``obs`` for these ids."""
    import pandas as pd

    rows = []
    for s in slides:
        a = getattr(s, "attrs", None) or {}
        rows.append({k: v for k, v in a.items() if k != Keys.SLIDE_ID and np.isscalar(v)})
    meta = pd.DataFrame(rows, index=pd.Index(ids, name=Keys.SLIDE_ID))
    if obs is not None:
        if not isinstance(obs, pd.DataFrame):
            raise InputError(
                f"`obs` must be a pandas DataFrame indexed by slide id, got {type(obs).__name__}."
            )
        table = obs.copy()
        table.index = table.index.astype(str)
        twice = sorted({i for i in table.index[table.index.duplicated()] if i in set(ids)})
        if twice:  # which row describes the slide would be a guess (and the rows would outnumber it)
            raise InputError(
                f"`obs` has more than one row for slide id(s) {twice[:5]} (its index, read as text): keep "
                "one row per slide."
            )
        missing = [i for i in ids if i not in table.index]
        if missing:
            raise InputError(
                f"{len(missing)} slide id(s) have no row in `obs`, e.g. {missing[:5]}; the index of `obs` "
                f"(e.g. {list(table.index[:3])}) must hold the slides' ids (`attrs[{Keys.SLIDE_ID!r}]`)."
            )
        table = table.loc[ids]
        meta = meta.drop(columns=[c for c in meta.columns if c in table.columns]).join(table)
        meta.index.name = Keys.SLIDE_ID
    return meta


def embed_slides(
    model: Any,
    slides: Any,
    *,
    pooling: str = "mean",
    obs: Any = None,
    label: str | tuple[str, str] | None = None,
    keep_tiles: bool = False,
    tile_px: float | None = None,
    device: str | None = None,
    seed: int | None = None,
    key_added: str = Keys.PREFIX,
    image_key: str | None = None,
    mpp: float | Mapping[str, float] | None = None,
):
    """Embed every tile of each slide with the model's teacher image branch and pool to one vector per slide.

    A slide with spots is read at its spots; a slide with only an image gets a grid of tiles over its
    tissue (the tiling of :func:`stranker.tl.predict`). Tiles are embedded in streamed batches, so
    memory grows with the number of tiles, not with the image.

    Parameters
    ----------
    model
        A fitted :class:`stranker.Model` (trained on pixels), or the folder it was saved to.
    slides
        A SpatialData (image only, or with spots) or AnnData in squidpy layout, or a list of them; or
        paths: slide files (SVS, NDPI, MRXS, TIFF, OME-TIFF), SpatialData ``.zarr`` stores, folders of
        them or a text file listing them (as for :func:`stranker.tl.predict_slides`), mixed with objects
        or not. A path is opened lazily when its slide is embedded (one slide in memory at a time), and
        its slide id is its file stem.
    pooling
        ``'mean'``: the mean tile embedding. ``'attention'``: a gated-attention MIL
        (:class:`stranker.model.mil.GatedAttentionMIL`) is trained on all slides against ``label``
        and each slide gets its attention-pooled vector. Those vectors have seen the labels: for an
        honest cross-validated figure use ``sr.tl.survival(..., model='attention')`` or
        ``sr.tl.classify(..., model='attention')``, which train the same network inside each fold.
    obs
        DataFrame of slide metadata indexed by slide id (``attrs['slide_id']`` of each slide; when the
        slides carry no id, one row per slide in slide order). Scalar ``attrs`` of the slides are kept too.
        A slide id with more than one row is refused.
    label
        For ``pooling='attention'``: a column of the metadata holding classes (cross-entropy), or a pair
        ``(time, event)`` of columns (Cox partial likelihood).
    keep_tiles
        Keep the tile embeddings (the bags that ``model='attention'`` trains on).
    tile_px
        Tile side for image-only slides, in image pixels (default: the training spot size).
    device
        Torch device; default ``sr.settings.device``.
    seed
        Seed of the attention network (``pooling='attention'``; default ``sr.settings.seed``).
    key_added
        Prefix of the written keys.
    image_key
        Image element when a SpatialData has several.
    mpp
        For slides given as paths: microns per pixel of their full resolution, overriding what each
        records (one number, or a dict by slide name); a slide file that records none is refused
        without it.

    Returns
    -------
    AnnData with one row per slide (index: slide id), the slide metadata in ``obs`` and

    - ``X`` and ``obsm['X_{key_added}']``: pooled slide vectors;
    - ``obs['{key_added}_n_tiles']``: tiles (or spots) embedded per slide;
    - ``uns['{key_added}_tiles']`` (with ``keep_tiles`` or ``pooling='attention'``): dicts keyed by slide
      id of tile ``'embeddings'``, tile ``'centers'`` (level-0 px) and, for attention, ``'attention'``;
    - ``uns[key_added]``: the parameters of the run.
    """
    import anndata as ad
    import pandas as pd
    from tqdm.auto import tqdm

    model = as_model(model)
    if pooling not in ("mean", "attention"):
        raise InputError(f"`pooling` must be 'mean' or 'attention', got {pooling!r}.")
    if model.config.image_features is not None:
        raise InputError(
            f"The model was trained on precomputed features `obsm[{model.config.image_features!r}]`, not on "
            "pixels: it cannot embed slide images. Fit it on the images."
        )
    items = _open_paths(list(slides) if isinstance(slides, list | tuple) else [slides])
    if not items:
        raise InputError("Got no slides: pass a SpatialData, an AnnData or a list of them.")
    ids = slide_ids(items, obs)
    meta = _slide_obs(items, ids, obs)
    if pooling == "attention" and label is None:
        raise InputError(
            "`pooling='attention'` trains an attention network against a label: pass `label='column'` "
            "(classes) or `label=('time', 'event')` (survival)."
        )

    scales = {it.name: mpp_of(mpp, it.name) for it in items if isinstance(it, SlideInput)}  # checked first

    bags, centres, sizes = [], [], []
    log = logger.debug if len(items) > 1 else logger.info  # one tiling message per slide is noise in a cohort
    for sid, item in zip(tqdm(ids, desc="embed slides", disable=not settings.show_progress()), items,
                         strict=True):
        if isinstance(item, SlideInput):  # a path: read now, dropped after (one slide in memory at a time)
            scale = scales[item.name]  # read_slide takes it; a store gets it through as_sections
            item = read_input(item, scale)
        else:
            scale = None
        sp = as_sections(item, image_key=image_key, need_image=True, need_table=False,
                         microns_per_pixel=scale)[0]
        sp, _, size = spots_or_tiles(sp, model, tile_px, log=log, label=f"Slide {sid!r}")
        emb = model.infer(sp, device=device)[0]
        bags.append(emb.astype(np.float32))
        centres.append(np.asarray(sp.centers, dtype=np.float32))
        sizes.append(float(size))
    n_tiles = np.array([len(b) for b in bags])
    logger.info(
        f"Embedded {int(n_tiles.sum())} tiles of {len(ids)} slide(s) ({int(np.median(n_tiles))} per slide)."
    )

    tiles: dict[str, Any] = {}
    if pooling == "mean":
        pooled = np.stack([b.mean(0) for b in bags])
    else:
        from ._mil import fit_mil_all

        pooled, attention = fit_mil_all(bags, meta, label, seed=resolve_seed(seed))
        tiles["attention"] = dict(zip(ids, attention, strict=True))
    if keep_tiles or pooling == "attention":
        tiles["embeddings"] = dict(zip(ids, bags, strict=True))
        tiles["centers"] = dict(zip(ids, centres, strict=True))

    meta[f"{key_added}_{Keys.N_TILES}"] = n_tiles
    var = pd.DataFrame(index=[f"{key_added}_{j}" for j in range(pooled.shape[1])])
    out = ad.AnnData(X=pooled.astype(np.float32), obs=meta, var=var)
    out.obsm[f"X_{key_added}"] = pooled.astype(np.float32)
    out.uns[key_added] = {
        "pooling": pooling, "label": list(label) if isinstance(label, tuple) else label,
        "tile_px": float(np.median(sizes)), "embed_dim": int(bags[0].shape[1]), "model": repr(model),
        "n_tiles": int(n_tiles.sum()),
    }
    if tiles:
        out.uns[f"{key_added}_{Keys.TILES}"] = tiles
    return out
