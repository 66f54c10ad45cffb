"""sr.pl.embedding: UMAP of the image embedding, coloured by any obs key (through scanpy)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._constants import Keys
from .._predictions import modelled_genes, read_predictions
from .._spots import InputError
from ._utils import finish, sections


def embedding_anndata(data: Any, *, key: str = Keys.PREFIX, layer: str | None = None, **keys: Any):
    """Gather the spots of every section in a light AnnData (embedding, ``obs``, ``obs['section']``).

    ``X`` holds the predictions of the genes every section has in ``layers[layer]`` (so genes can
    colour the plot too). The user's tables are not modified.
    """
    import anndata as ad
    import pandas as pd

    secs = sections(data, **keys)
    rep = f"X_{key}"
    blocks, obs, names = [], [], []
    for sp in secs:
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
    return a


def embedding(
    data: Any,
    *,
    color: str | Sequence[str] | None = "section",
    key: str = Keys.PREFIX,
    layer: str | None = None,
    n_neighbors: int = 15,
    seed: int = 0,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    ax: Any = None,
    table_key: str | None = None,
    library_id: str | None = None,
    bin_size: int | None = None,
    **kwargs: Any,
):
    """UMAP of the image embedding ``obsm[f'X_{key}']`` of one or several sections.

    The neighbour graph and UMAP are computed with scanpy on a light copy (the user's tables are
    not changed) and drawn with :func:`scanpy.pl.umap`.

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
    n_neighbors
        Neighbours of the kNN graph.
    seed
        Random state of UMAP.
    show
        Show the figure; ``None`` shows it unless ``save`` is given.
    save
        File to write the figure to.
    ax
        Axes to draw into (one colour key).
    table_key, library_id
        Which table / library when there are several.
    bin_size
        Visium HD: the bin size in µm (2, 8, 16) whose table and squares to use; the same as
        ``table_key='square_{bin_size:03d}um'``.
    **kwargs
        Passed to :func:`scanpy.pl.umap` (``palette``, ``size``, ``legend_loc``, ...).

    Returns
    -------
    The axes (a list for several colour keys) when the figure is not shown, else ``None``.
    """
    import scanpy as sc

    a = embedding_anndata(
        data, key=key, layer=layer, table_key=table_key, library_id=library_id, bin_size=bin_size
    )
    colors = [color] if isinstance(color, str) or color is None else list(color)
    unknown = [c for c in colors if c is not None and c not in a.obs and c not in a.var_names]
    if unknown:
        raise InputError(
            f"Cannot colour by {unknown}: not in `obs` ({list(a.obs)[:10]}) nor a predicted gene."
        )
    if a.n_obs < 3:
        raise InputError(f"UMAP needs at least 3 spots; got {a.n_obs}.")
    sc.pp.neighbors(a, use_rep=f"X_{key}", n_neighbors=min(n_neighbors, a.n_obs - 1), random_state=seed)
    sc.tl.umap(a, random_state=seed)
    out = sc.pl.umap(a, color=color, ax=ax, show=False, **kwargs)
    first = out[0] if isinstance(out, list) else out
    return finish(first.figure, out, show=show, save=save)
