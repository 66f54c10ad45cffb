"""Counts to the model's target: validated raw counts, ``log1p(counts / total * target_sum)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sps

from ._errors import InputError
from ._settings import logger
from .section import Section


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


def library_sizes(mat: Any) -> np.ndarray:
    """Total counts of each row (float32), summed on a sparse matrix as it is: nothing is densified."""
    if sps.issparse(mat):
        return np.asarray(mat.sum(axis=1, dtype=np.float64)).ravel().astype(np.float32)
    return np.asarray(mat, dtype=np.float32).sum(1)


def _log_scaled(vals: np.ndarray, totals: np.ndarray, target_sum: float) -> np.ndarray:
    """In place: ``log1p(vals * target_sum / totals)`` (float32; rows with no counts stay 0)."""
    if not (np.isfinite(target_sum) and target_sum > 0):
        raise InputError(f"`target_sum` must be a positive number, got {target_sum!r}.")
    np.divide(vals * np.float32(target_sum), totals, out=vals, where=totals > 0)
    return np.log1p(vals, out=vals)


def _columns(mat: Any, cols: Sequence[int] | np.ndarray | None) -> Any:
    if cols is None:
        return mat
    cols = np.asarray(cols, dtype=np.int64)
    if len(cols) == mat.shape[1] and (cols == np.arange(len(cols))).all():
        return mat  # every column, in order: no copy
    return mat[:, cols]


def lognorm(mat: Any, target_sum: float = 1e4, cols: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Dense float32 ``log1p(counts / total * target_sum)`` per row (scanpy's normalize_total + log1p).

    Totals are over all columns; only columns ``cols`` (all when ``None``) are returned, and only
    they are densified, so a sparse table of any width costs the chosen columns only.
    """
    totals = library_sizes(mat)
    sub = _columns(mat, cols)
    # columns of a matrix come column-major, as numpy's ``x[:, cols]`` (column means sum pairwise)
    order = "C" if cols is None else "F"
    if sps.issparse(sub):
        x = np.asarray(sub.toarray(order=order), dtype=np.float32, order=order)
    else:
        x = np.array(sub, dtype=np.float32, order=order)
    return _log_scaled(x, totals[:, None], target_sum)


def lognorm_sparse(
    mat: Any, target_sum: float = 1e4, cols: Sequence[int] | np.ndarray | None = None
) -> sps.csr_matrix:
    """Compute :func:`lognorm` as a CSR float32 matrix: only the stored values are transformed."""
    totals = library_sizes(mat)
    x = sps.csr_matrix(_columns(mat, cols), dtype=np.float32, copy=True)
    x.sum_duplicates()
    _log_scaled(x.data, np.repeat(totals, np.diff(x.indptr)), target_sum)
    return x


def log_expression(
    sp: Section, genes: Sequence[str], layer: str | None, target_sum: float = 1e4
) -> np.ndarray:
    """Dense ``(n_spots, len(genes))`` log-normalised expression of one section (totals over all genes)."""
    idx = sp.gene_columns(list(genes))
    if (idx < 0).any():
        missing = [g for g, i in zip(genes, idx, strict=True) if i < 0]
        raise InputError(
            f"{len(missing)} gene(s) not in the table of section {sp.name!r}, e.g. {missing[:5]}."
        )
    return lognorm(section_counts(sp, layer), target_sum, cols=idx)


def section_counts(sp: Section, layer: str | None) -> Any:
    """Return the validated raw counts of one section."""
    mat = sp.expression(layer)
    check_counts(mat, f"{'X' if layer is None else f'layers[{layer!r}]'} of the table of section {sp.name!r}")
    return mat
