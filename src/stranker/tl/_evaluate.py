"""sr.tl.evaluate: per-gene Pearson r and error of predicted against measured expression."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._constants import Keys
from .._predictions import read_predictions
from .._spots import InputError, Spots, as_spots
from .._write import write_results
from ..pp._genes import lognorm, section_counts


def pearson_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r of each column across rows (NaN where either side is constant)."""
    p = pred - pred.mean(0)
    t = true - true.mean(0)
    den = np.sqrt((p**2).sum(0) * (t**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(0) / den
    r[den == 0] = np.nan
    return r


def spearman_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each column across rows: Pearson r of average ranks (NaN if constant)."""
    from scipy.stats import rankdata

    return pearson_per_gene(rankdata(pred, axis=0), rankdata(true, axis=0))


def summarise(pred: np.ndarray, true: np.ndarray, genes: list[str], n_heg: int = 50) -> dict[str, Any]:
    """ACG, HEG (the ``n_heg`` genes most expressed in ``true``), median r, fraction r > 0, MAE, MSE."""
    r = pearson_per_gene(pred, true)
    rho = spearman_per_gene(pred, true)
    heg = np.argsort(-true.mean(0), kind="stable")[: min(n_heg, len(genes))]
    return {
        "pcc_all": float(np.nanmean(r)),
        "pcc_heg": float(np.nanmean(r[heg])),
        "spearman_all": float(np.nanmean(rho)),
        "spearman_heg": float(np.nanmean(rho[heg])),
        "pcc_median": float(np.nanmedian(r)),
        "frac_positive": float(np.mean(np.nan_to_num(r, nan=0.0) > 0)),
        "mae": float(np.mean(np.abs(pred - true))),
        "mse": float(np.mean((pred - true) ** 2)),
        "n_spots": int(len(true)),
        "n_genes": len(genes),
        "heg_genes": [genes[i] for i in heg],
        "pcc": r,
    }


def _pairs(sp: Spots, layer: str, genes: list[str], counts_layer: str | None, target_sum: float):
    idx = sp.table.var_names.get_indexer(genes)
    if (idx < 0).any():
        raise InputError(
            f"Genes {[g for g, i in zip(genes, idx, strict=True) if i < 0][:5]} "
            f"not in section {sp.name!r}."
        )
    pred = read_predictions(sp, layer, genes)
    true = lognorm(section_counts(sp, counts_layer), target_sum)[:, idx]
    return pred, true


def evaluate(
    data: Any,
    *,
    layer: str = Keys.PREFIX,
    genes: Sequence[str] | None = None,
    counts_layer: str | None = None,
    target_sum: float = 1e4,
    n_heg: int = 50,
    key_added: str = Keys.PREFIX,
    table_key: str | None = None,
    library_id: str | None = None,
    bin_size: int | None = None,
) -> dict[str, Any]:
    """Compare predicted with measured expression, per gene across spots.

    The measured side is ``log1p(counts / total * target_sum)`` over all genes (``fit``'s target).

    Parameters
    ----------
    data
        One or several sections that hold measured counts and ``layers[layer]``.
    layer
        Predicted expression.
    genes
        Genes to score; default the genes the model predicted (``uns[key_added]['genes']``).
    counts_layer
        Layer of raw counts; ``None`` uses ``X``.
    target_sum
        Scaling of the measured side.
    n_heg
        HEG = the ``n_heg`` genes most expressed in the evaluated spots (mclSTExp's definition).
    key_added
        ``var[f'{key_added}_pcc']`` and ``uns[key_added]['metrics']`` are written.
    table_key, library_id
        Which table / library when there are several.
    bin_size
        Visium HD: the bin size in µm (2, 8, 16) whose table and squares to use; the same as
        ``table_key='square_{bin_size:03d}um'``.

    Returns
    -------
    Metrics ``pcc_all`` (ACG), ``pcc_heg`` (HEG), ``spearman_all`` and ``spearman_heg`` (the same with
    Spearman's rank correlation), ``pcc_median``, ``frac_positive``, ``mae``, ``mse``.
    With one section, Pearson r is per gene across its spots. With several, the dict has
    ``per_section`` (each section alone) and ``pooled`` (all spots together), and the top-level
    figures are the mean over sections.
    """
    secs = as_spots(data, table_key=table_key, library_id=library_id, bin_size=bin_size, need_image=False)
    if genes is None:
        rec = secs[0].table.uns.get(key_added, {})
        if "genes" not in rec:
            raise InputError(
                f"No `uns[{key_added!r}]['genes']` in section {secs[0].name!r}: "
                "pass `genes=` or run `sr.tl.predict`."
            )
        genes = list(rec["genes"])
    genes = list(genes)
    pairs = [_pairs(sp, layer, genes, counts_layer, target_sum) for sp in secs]
    per = {sp.name: summarise(p, t, genes, n_heg) for sp, (p, t) in zip(secs, pairs, strict=True)}
    public = {name: {k: v for k, v in m.items() if k != "pcc"} for name, m in per.items()}
    if len(secs) == 1:
        metrics = dict(public[secs[0].name])
        metrics["scope"] = "per gene across the spots of one section"
    else:
        pooled = summarise(
            np.concatenate([p for p, _ in pairs]), np.concatenate([t for _, t in pairs]), genes, n_heg
        )
        keys = ("pcc_all", "pcc_heg", "spearman_all", "spearman_heg", "pcc_median", "frac_positive", "mae",
                "mse")
        metrics = {k: float(np.mean([public[n][k] for n in public])) for k in keys}
        metrics.update(
            scope="mean over sections of per-section figures; 'pooled' pools all spots",
            per_section=public, pooled={k: v for k, v in pooled.items() if k != "pcc"},
        )
    for sp in secs:
        r = np.full(sp.table.n_vars, np.nan, dtype=np.float32)
        r[sp.table.var_names.get_indexer(genes)] = per[sp.name]["pcc"]
        rec = dict(sp.table.uns.get(key_added, {}))
        rec["metrics"] = metrics if len(secs) == 1 else {**public[sp.name], "all_sections": metrics}
        write_results(sp, var={f"{key_added}_pcc": r}, uns={key_added: rec})
    return metrics
