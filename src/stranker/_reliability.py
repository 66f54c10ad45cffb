"""What a prediction is worth, from predictions on sections a model did not train on (numpy, scipy).

Section-level cross-fitting gives, for every training spot, an out-of-fold (OOF) prediction by a fold
model that did not see its section. From these:

- per gene, the Pearson r on each held-out group of sections, combined on Fisher's z scale into an
  estimate of the r on a new section (shrunk, empirical Bayes, towards what the fitted model's own r
  on its training spots says, calibrated over all genes) with a 90 % prediction interval, and a
  one-sided test that it is
  above 0 (a t-test across the held-out groups: sections, not spots, are the unit, so a gene that
  works on one section only is not called reliable), corrected by Benjamini–Hochberg;
- per spot, a difficulty, in the fitted model's embedding space: how far its image embedding lies
  from the training spots, relative to how far training spots lie from those of the *other* training
  sections (1: as far as a typical spot of another training section); for a training spot, its
  distance to the other sections; for a new spot, its distance to the training spots without one
  held-out group, averaged over the groups (banks of the same size as the calibration's). Per gene,
  a conformal quantile of the OOF residuals divided by it gives split-conformal intervals
  ``pred ± q_gene * difficulty`` (coverage ≥ level for spots exchangeable with the training spots);
- per section, a shift score: the larger of the median difficulty of its spots and the distance of
  its colour statistics (optical density per channel) from the training spots', each in units of the
  held-out training sections' own (each against the others); those sections' scores calibrate it (a
  conformal p-value; ``shifted`` when it exceeds all of them).
"""

from __future__ import annotations

import math

import numpy as np

DIFFICULTY_CLIP = (0.25, 4.0)  # a spot's interval is 1/4 to 4 times that of a typical held-out spot
NEIGHBOURS = 10  # nearest training spots whose mean distance is a spot's distance to the training tissue
MIN_R = 0.1  # a gene is reliable when its estimated r on new sections is at least this (and significant)


def pearson_columns(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r of each column of ``pred`` with the same column of ``true`` (NaN where one is constant)."""
    p = pred - pred.mean(0)
    t = true - true.mean(0)
    den = np.sqrt((p * p).sum(0) * (t * t).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (p * t).sum(0) / den, np.nan)


def gene_reliability(
    r_groups: np.ndarray, level: float = 0.9
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Estimated r of each gene on a new section, its prediction interval and a p-value for r > 0.

    Parameters
    ----------
    r_groups
        ``(n_groups, n_genes)`` Pearson r of each gene on each held-out group (NaN: constant there).
    level
        Level of the interval for the r on one new section.

    Returns
    -------
    ``(estimate, lo, hi, p)``: the back-transformed mean Fisher z over groups; the interval
    ``mean z ± t_{(1+level)/2, K-1} · sd_z · sqrt(1 + 1/K)`` (a new section varies as the held-out
    ones did); the one-sided p-value of a t-test of mean z > 0 across the ``K`` groups (1 where fewer
    than two groups have a value, or all values agree exactly on a non-positive z).
    """
    z = np.arctanh(np.clip(r_groups, -0.999999, 0.999999))
    ok = np.isfinite(z)
    k = ok.sum(0)
    zf = np.where(ok, z, 0.0)
    mean = np.where(k > 0, zf.sum(0) / np.maximum(k, 1), np.nan)
    dev = np.where(ok, z - mean, 0.0)
    sd = np.sqrt((dev * dev).sum(0) / np.maximum(k - 1, 1))
    est = np.tanh(mean)
    lo = np.full(z.shape[1], np.nan)
    hi = np.full(z.shape[1], np.nan)
    p = np.ones(z.shape[1])
    from scipy.stats import t as tdist

    for kk in np.unique(k[k >= 2]):
        m = k == kk
        half = tdist.ppf((1 + level) / 2, int(kk) - 1) * sd[m] * math.sqrt(1 + 1 / kk)
        lo[m], hi[m] = np.tanh(mean[m] - half), np.tanh(mean[m] + half)
        with np.errstate(divide="ignore", invalid="ignore"):
            tstat = mean[m] / (sd[m] / math.sqrt(kk))
        tstat = np.where(sd[m] > 0, tstat, np.where(mean[m] > 0, np.inf, -np.inf))
        p[m] = tdist.sf(tstat, int(kk) - 1)
    return est, lo, hi, p


def shrink_estimates(r_groups: np.ndarray, covariates: np.ndarray) -> tuple[np.ndarray, float]:
    """Empirical-Bayes estimate of each gene's r on a new section, and the weight kept on its own data.

    With a few held-out groups each gene's mean Fisher z is noisy. Genes are pooled: a least-squares
    fit of the mean z on ``covariates`` (``(n_genes, p)``; in a fit, the fitted model's own r on its
    training spots: optimistic, but free of held-out noise and about this model, not the fold models)
    is the prior; the noise variance
    of a gene's mean z is the pooled between-group variance over ``K``, the prior's variance what the
    fit leaves beyond it; the posterior mean ``w * z + (1 - w) * prior`` with ``w = tau2 / (tau2 +
    noise)`` is returned on the r scale. Genes without a value (or covariate) keep their plain mean.
    """
    z = np.arctanh(np.clip(r_groups, -0.999999, 0.999999))
    ok = np.isfinite(z)
    k = ok.sum(0)
    mean = np.where(k > 0, np.where(ok, z, 0.0).sum(0) / np.maximum(k, 1), np.nan)
    var = np.where(ok, (z - mean) ** 2, 0.0).sum(0) / np.maximum(k - 1, 1)
    use = (k >= 2) & np.isfinite(mean) & np.isfinite(covariates).all(1)
    if use.sum() < covariates.shape[1] + 3:
        return np.tanh(mean), 1.0
    design = np.column_stack([np.ones(use.sum()), covariates[use]])
    beta = np.linalg.lstsq(design, mean[use], rcond=None)[0]
    prior = design @ beta
    noise = float(np.mean(var[use] / k[use]))
    tau2 = max(float(np.var(mean[use] - prior)) - noise, 1e-12)
    w = tau2 / (tau2 + noise)
    out = mean.copy()
    out[use] = w * mean[use] + (1 - w) * prior
    return np.tanh(out), w


def benjamini_hochberg(p: np.ndarray, fdr: float) -> np.ndarray:
    """Boolean discoveries of the Benjamini–Hochberg procedure at false-discovery rate ``fdr``."""
    p = np.asarray(p, dtype=float)
    n = len(p)
    if n == 0:
        return np.zeros(0, dtype=bool)
    order = np.argsort(p)
    below = p[order] <= fdr * np.arange(1, n + 1) / n
    out = np.zeros(n, dtype=bool)
    if below.any():
        out[order[: int(np.flatnonzero(below).max()) + 1]] = True
    return out


def reliable_genes(estimate: np.ndarray, p: np.ndarray, fdr: float, min_r: float = MIN_R) -> np.ndarray:
    """Genes whose r on new sections is > 0 at false-discovery rate ``fdr`` (BH) and estimated ≥ ``min_r``."""
    return benjamini_hochberg(p, fdr) & (np.nan_to_num(estimate, nan=-1.0) >= min_r)


def nn_distance(query: np.ndarray, bank: np.ndarray, k: int = NEIGHBOURS, chunk: int = 4096) -> np.ndarray:
    """Mean cosine distance of each row of ``query`` to its ``k`` nearest rows of ``bank``."""
    b = bank / np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
    k = max(1, min(k, len(b)))
    out = np.empty(len(query), dtype=np.float64)
    for s in range(0, len(query), chunk):
        q = query[s : s + chunk]
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        sim = q @ b.T
        top = -np.partition(-sim, k - 1, axis=1)[:, :k]
        out[s : s + chunk] = np.clip(1.0 - top, 0.0, 2.0).mean(1)
    return out


def other_section_distance(emb: np.ndarray, section: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """Per training spot: distance to the training spots of the *other* sections.

    What a spot of a new section of the training tissue is expected to be from the training spots;
    with one section only, the distance to the other spots of that section.
    """
    sections = np.unique(section)
    out = np.empty(len(emb), dtype=np.float64)
    if len(sections) < 2:
        return nn_distance(emb, emb, k + 1) * (k + 1) / k  # the spot itself is one neighbour, at 0
    for s in sections:
        m = section == s
        out[m] = nn_distance(emb[m], emb[~m], k)
    return out


def held_out_distance(query: np.ndarray, bank: np.ndarray, group_of: np.ndarray,
                      k: int = NEIGHBOURS) -> np.ndarray:
    """Distance of each row of ``query`` to the bank as a held-out group saw it: without one group.

    A training spot's difficulty is its distance to the *other* groups' spots; a new spot measured
    against all of them would find nearer neighbours in the larger bank, and look easier than a
    held-out spot that was as far. So a new spot's distance is the mean, over the groups, of its
    distance to the bank without that group: banks of the size the calibration used. With one group,
    the plain distance.
    """
    groups = np.unique(group_of)
    if len(groups) < 2:
        return nn_distance(query, bank, k)
    return np.mean([nn_distance(query, bank[group_of != g], k) for g in groups], axis=0)


def colour_distance(colour: np.ndarray, reference: np.ndarray) -> float:
    """Distance of a section's mean colour statistics from reference spots', in units of their spread.

    ``colour`` and ``reference``: per spot, mean and sd of each channel's optical density; the
    distance is the norm of the section's mean minus the reference mean over the reference's
    per-statistic sd. NaN without pixels (a model on features).
    """
    colour, reference = np.asarray(colour, dtype=float), np.asarray(reference, dtype=float)
    if not len(colour) or not np.isfinite(colour).all() or not np.isfinite(reference).all():
        return float("nan")
    sd = np.maximum(reference.std(0), 1e-6)
    return float(np.linalg.norm((colour.mean(0) - reference.mean(0)) / sd))


def difficulty(distance: np.ndarray, scale: float) -> np.ndarray:
    """Distance to the training tissue in units of ``scale``, clipped to :data:`DIFFICULTY_CLIP`."""
    return np.clip(distance / scale, *DIFFICULTY_CLIP)


def conformal_quantile(scores: np.ndarray, level: float) -> np.ndarray:
    """Per column, the ``ceil((n + 1) level) / n`` empirical quantile of ``scores`` (split conformal).

    ``inf`` where ``n`` is too small for the level (fewer than ``1 / (1 - level) - 1`` spots).
    """
    n = scores.shape[0]
    rank = math.ceil((n + 1) * level)
    if rank > n:
        return np.full(scores.shape[1], np.inf)
    return np.sort(scores, axis=0)[rank - 1]


def shift_p_value(score: float, calibration: np.ndarray) -> float:
    """Conformal p-value of a section's shift score against the held-out training sections' scores."""
    calibration = np.asarray(calibration, dtype=float)
    return float((1 + (calibration >= score).sum()) / (len(calibration) + 1))
