"""Per-gene scores of predicted against measured expression (used by ``tl.evaluate`` and ``pl``)."""

from __future__ import annotations

from typing import Any

import numpy as np


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
    """ACG, HEG (the ``n_heg`` genes most expressed in ``true``), median r, fraction r > 0, MAE, MSE.

    A gene whose r is undefined (prediction or measurement constant across the spots) is left out of
    every r figure alike; ``n_genes_undefined`` and ``genes_undefined`` say which.
    """
    r = pearson_per_gene(pred, true)
    ok = np.isfinite(r)
    rho = spearman_per_gene(pred, true)
    heg = np.argsort(-true.mean(0), kind="stable")[: min(n_heg, len(genes))]

    def mean(x: np.ndarray) -> float:
        return float(np.mean(x)) if len(x) else float("nan")

    return {
        "pcc_all": mean(r[ok]),
        "pcc_heg": mean(r[heg][ok[heg]]),
        "spearman_all": float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan"),
        "spearman_heg": float(np.nanmean(rho[heg])) if np.isfinite(rho[heg]).any() else float("nan"),
        "pcc_median": float(np.median(r[ok])) if ok.any() else float("nan"),
        "frac_positive": mean(r[ok] > 0),
        "mae": float(np.mean(np.abs(pred - true))),
        "mse": float(np.mean((pred - true) ** 2)),
        "n_spots": int(len(true)),
        "n_genes": len(genes),
        "n_genes_undefined": int((~ok).sum()),
        "genes_undefined": [g for g, good in zip(genes, ok, strict=True) if not good],
        "heg_genes": [genes[i] for i in heg],
        "pcc": r,
    }


def interval_coverage(lower: np.ndarray, upper: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per gene (column): share of spots (rows) with ``lower <= true <= upper``.

    NaN for a gene with a NaN bound in some spot (no interval was written for it).
    """
    inside = (lower <= true) & (true <= upper)
    cov = inside.mean(0) if len(true) else np.full(true.shape[1], np.nan)
    cov = cov.astype(np.float64)
    cov[np.isnan(lower).any(0) | np.isnan(upper).any(0)] = np.nan
    return cov


def reliability_scores(
    true: np.ndarray,
    r: np.ndarray,
    *,
    lower: np.ndarray | None = None,
    upper: np.ndarray | None = None,
    cv_pcc: np.ndarray | None = None,
    reliable: np.ndarray | None = None,
) -> dict[str, Any]:
    """How the reliability outputs of a prediction hold up against measured expression.

    Parameters
    ----------
    true
        ``(n_spots, n_genes)`` measured expression on the model's target scale.
    r
        Per gene: measured Pearson r of the prediction (NaN where undefined).
    lower, upper
        Per-spot interval bounds (``layers['{key}_lower'/'_upper']``), or ``None``.
    cv_pcc, reliable
        Per gene: the model's estimated r on a new section and its reliable call, or ``None``.

    Returns
    -------
    With the intervals: ``coverage_mean`` and ``coverage_sd`` (mean and standard deviation over genes
    of the share of spots inside their interval), ``interval_width`` (mean of ``upper - lower`` over
    spots and genes) and ``coverage`` (the per-gene array). With the estimates: ``spearman_cv_pcc``
    (Spearman's rank correlation over genes of estimated and measured r; NaN with fewer than 2 genes
    that have both), ``n_reliable`` and ``frac_positive_reliable`` (share of the reliable genes with a
    measured r that is > 0; ``None`` when no gene with a measured r is reliable).
    """
    out: dict[str, Any] = {}
    if lower is not None and upper is not None:
        cov = interval_coverage(lower, upper, true)
        ok = np.isfinite(cov)
        width = upper - lower
        width = width[:, ~np.isnan(width).any(0)]  # genes without an interval are left out
        out.update(
            coverage_mean=float(cov[ok].mean()) if ok.any() else float("nan"),
            coverage_sd=float(cov[ok].std()) if ok.any() else float("nan"),
            interval_width=float(np.mean(width)) if width.size else float("nan"),
            coverage=cov,
        )
    if cv_pcc is not None:
        cv_pcc = np.asarray(cv_pcc, dtype=np.float64)
        both = np.isfinite(cv_pcc) & np.isfinite(r)
        rho = (spearman_per_gene(cv_pcc[both, None], np.asarray(r, dtype=np.float64)[both, None])[0]
               if both.sum() >= 2 else np.nan)
        out["spearman_cv_pcc"] = float(rho)
        if reliable is not None:
            rel = np.asarray(reliable, dtype=bool)
            scored = rel & np.isfinite(r)
            out["n_reliable"] = int(rel.sum())
            out["frac_positive_reliable"] = float(np.mean(r[scored] > 0)) if scored.any() else None
    return out
