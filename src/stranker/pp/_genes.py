"""Gene-level preprocessing: normalisation and gene selection."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sps

from .._constants import Keys
from .._settings import logger
from .._spots import InputError, Spots, as_spots
from .._undo import unchanged_on_failure
from .._write import maybe_copy, unique_tables, write_results


def check_counts(mat: Any, where: str) -> None:
    """Raise when a count matrix has NaN, infinite or negative values or is all zero; warn on non-integers."""
    vals = mat.data if sps.issparse(mat) else np.asarray(mat)
    if 0 in mat.shape:
        return
    if not np.isfinite(vals).all():
        n = int((~np.isfinite(vals)).sum())
        raise InputError(f"{where} has {n} NaN or infinite value(s); stranker needs finite raw counts.")
    if (vals < 0).any():
        n = int((vals < 0).sum())
        raise InputError(
            f"{where} has {n} negative value(s); stranker expects raw counts (pass `layer=` with the counts "
            "if `X` is already transformed)."
        )
    if not vals.any():
        raise InputError(f"{where} is all zero: there is no expression to learn or score; check `layer=`.")
    if np.issubdtype(vals.dtype, np.floating) and np.any(np.mod(vals, 1)):
        logger.warning(
            f"{where} holds non-integer values: stranker expects raw counts and normalises them itself. "
            "If they are already normalised or log-transformed, pass `layer=` with the raw counts."
        )


def lognorm(mat: Any, target_sum: float = 1e4) -> np.ndarray:
    """Dense float32 ``log1p(counts / total * target_sum)`` per row (scanpy's normalize_total + log1p)."""
    if not (np.isfinite(target_sum) and target_sum > 0):
        raise InputError(f"`target_sum` must be a positive number, got {target_sum!r}.")
    x = mat.toarray() if sps.issparse(mat) else np.asarray(mat)
    x = x.astype(np.float32, copy=True)
    tot = x.sum(1, keepdims=True)
    np.divide(x * np.float32(target_sum), tot, out=x, where=tot > 0)
    return np.log1p(x, out=x)


def section_counts(sp: Spots, layer: str | None) -> Any:
    """Return the validated raw counts of one section."""
    mat = sp.expression(layer)
    check_counts(mat, f"{'X' if layer is None else f'layers[{layer!r}]'} of the table of section {sp.name!r}")
    return mat


@unchanged_on_failure()
def normalize(
    data: Any,
    *,
    target_sum: float = 1e4,
    layer: str | None = None,
    key_added: str = Keys.LOGNORM,
    copy: bool = False,
    table_key: str | None = None,
    library_id: str | None = None,
    bin_size: int | None = None,
) -> Any:
    """Scale counts to ``target_sum`` per spot over all genes, then log1p, into a layer.

    Same numbers as ``sc.pp.normalize_total(target_sum=1e4)`` followed by ``sc.pp.log1p``.

    Parameters
    ----------
    data
        SpatialData, AnnData or a list of either.
    target_sum
        Total per spot after scaling.
    layer
        Layer with raw counts; ``None`` uses ``X``.
    key_added
        Layer written.
    copy
        Return a modified copy instead of writing in place.
    table_key, library_id
        Which table / library when there are several.
    bin_size
        Visium HD: the bin size in µm (2, 8, 16) whose table and squares to use; the same as
        ``table_key='square_{bin_size:03d}um'``.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes ``layers[key_added]`` (float32).
    """
    if target_sum <= 0:
        raise InputError(f"`target_sum` must be positive, got {target_sum!r}.")
    data = maybe_copy(data, copy)
    secs = unique_tables(
        as_spots(data, table_key=table_key, library_id=library_id, bin_size=bin_size, need_image=False)
    )
    results = []
    for sp in secs:
        full = sp.table.X if layer is None else sp.table.layers.get(layer)
        if layer is not None and full is None:
            raise InputError(
                f"Layer {layer!r} not in the table of section {sp.name!r}; layers: {list(sp.table.layers)}."
            )
        if full is None:
            raise InputError(f"The table of section {sp.name!r} has no `X`; pass `layer=` with raw counts.")
        check_counts(
            full, f"{'X' if layer is None else f'layers[{layer!r}]'} of the table of section {sp.name!r}"
        )
        results.append(lognorm(full, target_sum))
    for sp, res in zip(secs, results, strict=True):
        sp.table.layers[key_added] = res
        logger.info(f"Adding `layers[{key_added!r}]` to the table of {sp.name!r}")
    return data if copy else None


def resolve_genes(secs: list[Spots], genes: Sequence[str], on_missing: str = "raise") -> list[str]:
    """Check an explicit gene list against every section."""
    if on_missing not in ("raise", "drop"):
        raise InputError(f"`on_missing` must be 'raise' or 'drop', got {on_missing!r}.")
    genes = list(dict.fromkeys(str(g) for g in genes))
    if not genes:
        raise InputError("The gene list is empty.")
    present = {sp.name: set(sp.var_names) for sp in secs}
    missing = {sp.name: [g for g in genes if g not in present[sp.name]] for sp in secs}
    missing = {k: v for k, v in missing.items() if v}
    if missing:
        lost = sorted(set().union(*missing.values()))
        detail = "; ".join(f"{k}: {len(v)} (e.g. {v[:3]})" for k, v in missing.items())
        if on_missing == "raise" or len(lost) == len(genes):
            hint = "" if len(lost) == len(genes) else (
                " Pass `on_missing='drop'` to model only the genes found everywhere."
            )
            raise InputError(
                f"{len(lost)} of {len(genes)} requested genes are missing from some sections "
                f"({detail}).{hint}"
                + (" No genes in common." if len(lost) == len(genes) else "")
            )
        logger.warning(f"Dropping {len(lost)} of {len(genes)} genes missing from some sections ({detail}).")
        lost_set = set(lost)
        genes = [g for g in genes if g not in lost_set]
    return genes


def common_genes(secs: list[Spots]) -> list[str]:
    """Genes present in every section, in the order of the first."""
    common = set(secs[0].var_names)
    for sp in secs[1:]:
        common &= set(sp.var_names)
    if not common:
        raise InputError(
            "The sections have no genes in common: "
            + ", ".join(f"{sp.name} ({len(sp.var_names)} genes)" for sp in secs)
        )
    return [g for g in secs[0].var_names if g in common]


def choose(
    secs: list[Spots],
    flavor: str | Sequence[str],
    *,
    n_top: int,
    layer: str | None,
    on_missing: str = "raise",
) -> list[str]:
    """Genes chosen on ``secs`` (see :func:`select_genes`), without writing anything."""
    if isinstance(flavor, str):
        if flavor not in ("hvg", "heg"):
            raise InputError(f"`flavor` must be 'hvg', 'heg' or a list of genes, got {flavor!r}.")
        if n_top < 1:
            raise InputError(f"`n_top` must be at least 1, got {n_top}.")
        cands = common_genes(secs)
        n_all = len(set().union(*(set(sp.var_names) for sp in secs)))
        if n_all > len(cands):
            logger.info(f"{n_all - len(cands)} genes not present in every section are not candidates.")
        mats = [lognorm(section_counts(sp, layer)) for sp in secs]
        idxs = [sp.table.var_names.get_indexer(cands) for sp in secs]
        x = np.concatenate([m[:, i] for m, i in zip(mats, idxs, strict=True)], axis=0)
        n = min(n_top, len(cands))
        if flavor == "heg":
            order = np.argsort(-x.mean(0), kind="stable")[:n]
            genes = [cands[i] for i in order]
        else:
            import anndata as ad
            import scanpy as sc

            a = ad.AnnData(x, var={"gene": cands})
            a.var_names = cands
            batch = np.repeat([sp.name for sp in secs], [m.shape[0] for m in mats])
            a.obs["section"] = batch
            keep = x.std(0) > 0
            a = a[:, keep].copy()
            sc.pp.highly_variable_genes(
                a, flavor="seurat", n_top_genes=min(n, a.n_vars),
                batch_key="section" if len(secs) > 1 else None,
            )
            var = a.var
            rank_col = "highly_variable_nbatches" if len(secs) > 1 else None
            sel = var[var["highly_variable"]]
            if rank_col:
                sel = sel.sort_values([rank_col, "dispersions_norm"], ascending=False)
            else:
                sel = sel.sort_values("dispersions_norm", ascending=False)
            genes = list(sel.index[:n])
    else:
        genes = resolve_genes(secs, flavor, on_missing)
    return genes


@unchanged_on_failure()
def select_genes(
    data: Any,
    *,
    flavor: str | Sequence[str] = "hvg",
    n_top: int = 1000,
    layer: str | None = None,
    on_missing: str = "raise",
    key_added: str = Keys.SELECTED,
    table_key: str | None = None,
    library_id: str | None = None,
    bin_size: int | None = None,
) -> list[str]:
    """Choose the genes to model, from the training sections only.

    Parameters
    ----------
    data
        The training sections (SpatialData, AnnData or a list). Genes are chosen on these alone.
    flavor
        ``'hvg'`` (scanpy's seurat highly variable genes on log-normalised counts, batch-aware over
        sections), ``'heg'`` (top ``n_top`` by mean log-normalised expression), or an explicit list.
    n_top
        Number of genes for ``'hvg'`` / ``'heg'``.
    layer
        Raw counts layer; ``None`` uses ``X``.
    on_missing
        For an explicit list: ``'raise'`` when a gene is missing from a section, ``'drop'`` to model
        only genes present everywhere (with a warning naming how many were dropped). For ``'hvg'`` /
        ``'heg'`` the candidates are the genes present in every section; how many were excluded is logged.
    key_added
        ``var`` column (bool) marking the chosen genes in each table.
    table_key, library_id
        Which table / library when there are several.
    bin_size
        Visium HD: the bin size in µm (2, 8, 16) whose table and squares to use; the same as
        ``table_key='square_{bin_size:03d}um'``.

    Returns
    -------
    The chosen gene names. Also writes ``var[key_added]`` and ``uns[key_added]``.
    """
    secs = as_spots(data, table_key=table_key, library_id=library_id, bin_size=bin_size, need_image=False)
    genes = choose(secs, flavor, n_top=n_top, layer=layer, on_missing=on_missing)
    params = {"genes": genes, "flavor": flavor if isinstance(flavor, str) else "list", "n_top": n_top,
              "sections": [sp.name for sp in secs]}
    for sp in unique_tables(secs):
        write_results(
            sp, var={key_added: np.isin(sp.var_names, genes)}, uns={key_added: params}
        )
    return genes
