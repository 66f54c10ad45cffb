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
