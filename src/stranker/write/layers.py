"""The layer of predicted expression: how it is written (dense or sparse) and read back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._errors import InputError
from .._settings import settings
from ..section import Section


def genes_in_table(sp: Section, genes: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``genes`` into those the table of ``sp`` has (in order) and those it lacks."""
    cols = sp.gene_columns(genes)
    present = [g for g, c in zip(genes, cols, strict=True) if c >= 0]
    absent = [g for g, c in zip(genes, cols, strict=True) if c < 0]
    return present, absent


def prediction_layer(sp: Section, genes: list[str], pred: np.ndarray) -> tuple[Any, str]:
    """Predictions of ``genes`` as a layer over every gene of the table, and its format.

    Dense float32 with NaN for the genes the model does not predict, unless that would exceed
    ``sr.settings.max_dense_layer`` bytes (a Visium HD table: bins by all genes); then CSR holding
    the modelled genes only (the others read as 0: use ``uns[key]['genes']``). A modelled gene the
    table lacks has no column to go to: its prediction is not written (see :func:`genes_in_table`).
    """
    from scipy import sparse

    cols = sp.gene_columns(genes)
    keep = cols >= 0  # a gene absent from the table: get_indexer says -1, never a column to write
    cols, pred = cols[keep], np.asarray(pred)[:, keep]
    n, n_vars, k = sp.n_spots, sp.table.n_vars, len(cols)
    if k == n_vars or sp.table.n_obs * n_vars * 4 <= settings.max_dense_layer:
        full = np.full((n, n_vars), np.nan, dtype=np.float32)
        full[:, cols] = pred
        return full, "dense"
    order = np.argsort(cols)
    data = np.ascontiguousarray(pred[:, order], dtype=np.float32).ravel()
    indices = np.tile(cols[order].astype(np.int32), n)
    indptr = np.arange(0, n * k + 1, k, dtype=np.int64 if n * k >= 2**31 else np.int32)
    return sparse.csr_matrix((data, indices, indptr), shape=(n, n_vars)), "sparse"


def modelled_genes(sp: Section, layer: str) -> list[str]:
    """Genes with a prediction in ``layers[layer]``.

    Those of the run record ``uns[layer]``, else the finite columns.
    """
    _require(sp, layer)
    genes = (sp.table.uns.get(layer) or {}).get("genes")
    if genes is not None:
        return [g for g in genes if g in sp.table.var_names]
    return list(sp.var_names[np.isfinite(_dense(sp.expression(layer))).all(0)])


def read_predictions(sp: Section, layer: str, genes: Sequence[str]) -> np.ndarray:
    """``(n_spots, len(genes))`` float32 predictions from a dense or sparse layer.

    A gene not predicted raises.
    """
    _require(sp, layer)
    genes = list(genes)
    known = (sp.table.uns.get(layer) or {}).get("genes")
    mat = _dense(sp.expression(layer, genes))
    ok = np.isfinite(mat).all(0)
    if known is not None:
        ok &= np.isin(genes, list(known))
    if not ok.all():
        bad = [g for g, good in zip(genes, ok, strict=True) if not good]
        raise InputError(
            f"Layer {layer!r} of section {sp.name!r} has no prediction for {len(bad)} gene(s), "
            f"e.g. {bad[:5]}: the model did not predict them. Modelled genes: `uns[{layer!r}]['genes']`."
        )
    return mat


def _dense(mat: Any) -> np.ndarray:
    return np.asarray(mat.toarray() if hasattr(mat, "toarray") else mat, dtype=np.float32)


def _require(sp: Section, layer: str) -> None:
    if layer not in sp.table.layers:
        raise InputError(
            f"Layer {layer!r} not in the table of section {sp.name!r}: "
            "run `sr.tl.predict(model, data)` first."
        )
