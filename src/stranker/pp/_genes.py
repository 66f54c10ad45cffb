"""Gene-level preprocessing: normalisation and gene selection."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import scipy.sparse as sps

from .._constants import Keys
from .._docs import doc_params
from .._errors import InputError
from .._expression import check_counts, lognorm, lognorm_sparse, section_counts
from .._settings import logger
from ..section import Section, as_sections
from ..write import maybe_copy, unchanged_on_failure, unique_tables, write_results, write_table


@unchanged_on_failure()
@doc_params()
def normalize(
    data: Any,
    *,
    target_sum: float = 1e4,
    layer: str | None = None,
    key_added: str = Keys.LOGNORM,
    copy: bool = False,
    table_key: str | None = None,
    library_id: str | None = None,
    library_key: str | None = None,
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
    {doc_tables}
    {doc_library_key}
    {doc_bin_size}

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes ``layers[key_added]`` (float32).
    """
    if target_sum <= 0:
        raise InputError(f"`target_sum` must be positive, got {target_sum!r}.")
    data = maybe_copy(data, copy)
    secs = unique_tables(
        as_sections(data, table_key=table_key, library_id=library_id, library_key=library_key,
                    bin_size=bin_size, need_image=False)
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
        results.append(lognorm_sparse(full, target_sum) if sps.issparse(full) else lognorm(full, target_sum))
    for sp, res in zip(secs, results, strict=True):
        write_table(sp.table, f"the table of {sp.name!r}", layers={key_added: res})
    return data if copy else None


def resolve_genes(secs: list[Section], genes: Sequence[str], on_missing: str = "raise") -> list[str]:
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


def common_genes(secs: list[Section]) -> list[str]:
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


@contextmanager
def _same_openmp_threads() -> Iterator[None]:
    """Keep the OpenMP thread count that torch shares across scanpy's sparse (numba) kernels.

    numba's OpenMP pool sets the count to the number of CPUs when it starts (OMP_NUM_THREADS=1
    became 2), in an OpenMP library torch then uses too: a later fit's numbers would depend on how
    its genes were chosen. Libraries loaded before are restored; one loaded meanwhile gets the
    count OpenMP starts with (``OMP_NUM_THREADS``, else the CPUs this process may use).
    """
    import os

    from threadpoolctl import ThreadpoolController, threadpool_limits

    before = {i["filepath"] for i in ThreadpoolController().info() if i["user_api"] == "openmp"}
    try:
        with threadpool_limits(limits=None):
            yield
    finally:
        new = [i["filepath"] for i in ThreadpoolController().info()
               if i["user_api"] == "openmp" and i["filepath"] not in before]
        if new:
            env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
            n = int(env) if env.isdigit() and int(env) > 0 else (
                len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            )
            ThreadpoolController().select(filepath=new).limit(limits=n)


def choose(
    secs: list[Section],
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
        # log-normalised candidates of every section, sparse: totals over all genes, nothing densified
        x = sps.vstack(
            [lognorm_sparse(section_counts(sp, layer), cols=sp.gene_columns(cands))
             for sp in secs],
            format="csr",
        )
        n = min(n_top, len(cands))
        if flavor == "heg":
            means = np.asarray(x.sum(axis=0, dtype=np.float64)).ravel() / max(x.shape[0], 1)
            order = np.argsort(-means, kind="stable")[:n]
            genes = [cands[i] for i in order]
        else:
            import anndata as ad
            import pandas as pd
            import scanpy as sc

            a = ad.AnnData(x, var={"gene": cands})
            a.var_names = cands
            names = list(dict.fromkeys(sp.name for sp in secs))
            codes = np.repeat([names.index(sp.name) for sp in secs], [sp.n_spots for sp in secs])
            a.obs["section"] = pd.Categorical.from_codes(codes, categories=names)
            keep = x.max(axis=0).toarray().ravel() > x.min(axis=0).toarray().ravel()  # not constant
            a = a[:, keep].copy()
            with _same_openmp_threads():
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
@doc_params()
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
    library_key: str | None = None,
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
    {doc_tables}
    {doc_library_key}
    {doc_bin_size}

    Returns
    -------
    The chosen gene names. Also writes ``var[key_added]`` and ``uns[key_added]``.
    """
    secs = as_sections(data, table_key=table_key, library_id=library_id, library_key=library_key,
                       bin_size=bin_size, need_image=False)
    genes = choose(secs, flavor, n_top=n_top, layer=layer, on_missing=on_missing)
    params = {"genes": genes, "flavor": flavor if isinstance(flavor, str) else "list", "n_top": n_top,
              "sections": [sp.name for sp in secs]}
    for sp in unique_tables(secs):
        write_results(
            sp, var={key_added: np.isin(sp.var_names, genes)}, uns={key_added: params}
        )
    return genes
