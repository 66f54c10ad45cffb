"""sr.pl.embedding: UMAP of the image embedding, coloured by any obs key (through scanpy)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._constants import Keys
from .._docs import doc_params
from .._errors import InputError
from .._settings import logger, resolve_seed
from ..write import modelled_genes, read_predictions
from ._utils import finish, sections


def embedding_anndata(
    data: Any, *, key: str = Keys.PREFIX, layer: str | None = None, basis: str | None = None, **keys: Any
):
    """Gather the spots of every section in a light AnnData (embedding, ``obs``, ``obs['section']``).

    ``X`` holds the predictions of the genes every section has in ``layers[layer]`` (so genes can
    colour the plot too); ``obsm['X_umap']`` holds the coordinates to draw when ``basis`` names them,
    or when the one section's table has a UMAP computed from its ``obsm['X_{key}']`` (scanpy records
    ``use_rep`` in ``uns['neighbors']``). The user's tables are not modified.
    """
    import anndata as ad
    import pandas as pd

    secs = sections(data, **keys)
    rep = f"X_{key}"
    blocks, obs, names, coords = [], [], [], []
    if basis is None and len(secs) == 1 and _umap_of(secs[0].table, rep):
        basis = "X_umap"
    for sp in secs:
        if basis is not None:
            if basis not in sp.table.obsm:
                raise InputError(
                    f"`obsm[{basis!r}]` (`basis=`) not in the table of section {sp.name!r}; available: "
                    f"{list(sp.table.obsm)}. Pass `basis=None` to compute a UMAP of `obsm[{rep!r}]`."
                )
            coords.append(np.asarray(sp.table.obsm[basis], dtype=np.float32)[sp.rows, :2])
        if rep not in sp.table.obsm:
            raise InputError(
                f"`obsm[{rep!r}]` not in the table of section {sp.name!r}: "
                "run `sr.tl.fit` or `sr.tl.predict` first."
            )
        blocks.append(np.asarray(sp.table.obsm[rep], dtype=np.float32)[sp.rows])
        o = sp.table.obs.iloc[sp.rows].copy()
        o["section"] = sp.name
        obs.append(o)
        names.append(sp.name)
    emb = np.concatenate(blocks)
    if not np.isfinite(emb).all():
        raise InputError(f"`obsm[{rep!r}]` has NaN for some spots: predict every section you plot.")
    obs_all = pd.concat(obs, join="outer")
    obs_all["section"] = pd.Categorical(obs_all["section"].astype(str), categories=list(dict.fromkeys(names)))
    obs_all.index = pd.Index([f"{s}:{i}" for s, i in zip(obs_all["section"], obs_all.index, strict=True)])
    genes: list[str] = []
    x = np.zeros((len(emb), 0), dtype=np.float32)
    lay = layer or key
    if all(lay in sp.table.layers for sp in secs):
        each = [set(modelled_genes(sp, lay)) for sp in secs]
        genes = [g for g in modelled_genes(secs[0], lay) if all(g in e for e in each)]
        x = np.concatenate([read_predictions(sp, lay, genes) for sp in secs]) if genes else x
    a = ad.AnnData(X=x, obs=obs_all, var=pd.DataFrame(index=pd.Index(genes, dtype=str)))
    a.obsm[rep] = emb
    if coords:
        a.obsm["X_umap"] = np.concatenate(coords)
    return a


def _umap_of(table: Any, rep: str) -> bool:
    """Whether ``table`` holds a UMAP drawn from the neighbour graph of ``obsm[rep]`` (scanpy's record)."""
    neighbors = table.uns.get("neighbors", {})
    params = neighbors.get("params", {}) if isinstance(neighbors, dict) else {}
    return "X_umap" in table.obsm and "umap" in table.uns and params.get("use_rep") == rep


@doc_params()
def embedding(
    data: Any,
    *,
    color: str | Sequence[str] | None = "section",
    key: str = Keys.PREFIX,
    layer: str | None = None,
    basis: str | None = None,
    n_neighbors: int = 15,
    seed: int | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    ax: Any = None,
    table_key: str | None = None,
    library_id: str | None = None,
    bin_size: int | None = None,
    **kwargs: Any,
):
    """UMAP of the image embedding ``obsm[f'X_{key}']`` of one or several sections.

    An existing UMAP is drawn as it is: ``obsm[basis]``, or, for one section, ``obsm['X_umap']`` when
    scanpy computed it from ``obsm[f'X_{key}']`` (``sc.pp.neighbors(adata, use_rep='X_stranker');
    sc.tl.umap(adata)``). Otherwise the neighbour graph and UMAP are computed with scanpy on a light
    copy (the user's tables are not changed). Drawn with :func:`scanpy.pl.umap`.

    Parameters
    ----------
    data
        SpatialData or AnnData after :func:`stranker.tl.fit` or :func:`stranker.tl.predict`, or a
        list of sections (spots of all of them in one UMAP).
    color
        Key(s) of ``obs`` (``'section'`` is added), or predicted genes, to colour by.
    key
        The ``key_added`` of fit / predict: the embedding is ``obsm[f'X_{key}']``.
    layer
        Layer of predicted expression for colouring by gene; default ``key``.
    basis
        ``obsm`` key of 2-D coordinates to draw (e.g. ``'X_umap'``) instead of computing a UMAP.
    n_neighbors
        Neighbours of the kNN graph (when a UMAP is computed).
    seed
        Random state of UMAP (default ``sr.settings.seed``).
    show
        Show the figure; ``None`` shows it unless ``save`` is given.
    save
        File to write the figure to.
    ax
        Axes to draw into (one colour key).
    {doc_tables}
    {doc_bin_size}
    **kwargs
        Passed to :func:`scanpy.pl.umap` (``palette``, ``size``, ``legend_loc``, ...).

    Returns
    -------
    The axes (a list for several colour keys) when the figure is not shown, else ``None``.
    """
    import scanpy as sc

    a = embedding_anndata(
        data, key=key, layer=layer, basis=basis, table_key=table_key, library_id=library_id, bin_size=bin_size
    )
    colors = [color] if isinstance(color, str) or color is None else list(color)
    unknown = [c for c in colors if c is not None and c not in a.obs and c not in a.var_names]
    if unknown:
        raise InputError(
            f"Cannot colour by {unknown}: not in `obs` ({list(a.obs)[:10]}) nor a predicted gene."
        )
    if a.n_obs < 3:
        raise InputError(f"UMAP needs at least 3 spots; got {a.n_obs}.")
    if "X_umap" not in a.obsm:
        seed = resolve_seed(seed)
        logger.info(f"Computing a UMAP of `obsm['X_{key}']` for this plot (compute it once with "
                    f"`sc.pp.neighbors(adata, use_rep='X_{key}'); sc.tl.umap(adata)` to reuse it).")
        sc.pp.neighbors(a, use_rep=f"X_{key}", n_neighbors=min(n_neighbors, a.n_obs - 1), random_state=seed)
        sc.tl.umap(a, random_state=seed)
    out = sc.pl.umap(a, color=color, ax=ax, show=False, **kwargs)
    first = out[0] if isinstance(out, list) else out
    return finish(first.figure, out, show=show, save=save)
