"""The numeric core of reliability (``stranker._reliability``) on data with a known law."""

import numpy as np
import pytest

from stranker import _reliability as rel


def test_conformal_intervals_from_held_out_residuals_cover_and_in_sample_ones_do_not():
    """y = f(x) + noise whose scale grows with a known difficulty; an overfit model's in-sample
    residuals are a third of its held-out ones. Intervals from held-out residuals cover new points at
    the level; from the in-sample residuals (what a model reports on its own training spots) they do not."""
    rng = np.random.default_rng(0)
    n_cal, n_new, genes, level = 2000, 4000, 20, 0.9
    d_cal = rng.uniform(0.5, 2.0, n_cal)
    d_new = rng.uniform(0.5, 2.0, n_new)
    noise_cal = rng.standard_t(5, (n_cal, genes)) * d_cal[:, None]
    noise_new = rng.standard_t(5, (n_new, genes)) * d_new[:, None]
    q_held = rel.conformal_quantile(np.abs(noise_cal) / d_cal[:, None], level)
    q_insample = rel.conformal_quantile(np.abs(noise_cal / 3) / d_cal[:, None], level)
    cover = (np.abs(noise_new) <= q_held[None] * d_new[:, None]).mean(0)
    assert abs(cover.mean() - level) < 0.02 and cover.min() > 0.86
    assert (np.abs(noise_new) <= q_insample[None] * d_new[:, None]).mean() < 0.6
    # scaled by the difficulty: hard spots get wider intervals, and are covered as well as easy ones
    hard, easy = d_new > 1.5, d_new < 0.8
    ok = np.abs(noise_new) <= q_held[None] * d_new[:, None]
    assert abs(ok[hard].mean() - ok[easy].mean()) < 0.03
    # too few spots for the level: an infinite interval, never a too narrow one
    assert np.isinf(rel.conformal_quantile(np.ones((5, 2)), 0.9)).all()


def test_genes_without_signal_are_not_called_reliable_beyond_the_fdr():
    """Per-section r of null genes scatter around 0 as r does between independent series of n spots;
    genes with signal have r > 0 on every section. Benjamini-Hochberg keeps the share of null genes
    among the reliable ones at or below the FDR (in expectation, over repetitions)."""
    rng = np.random.default_rng(1)
    k, n = 4, 180  # held-out sections, spots per section (her2st-like)
    shares, powers = [], []
    for _ in range(200):
        null = np.tanh(rng.normal(0, 1 / np.sqrt(n - 3), (k, 300)))
        signal = np.tanh(np.arctanh(0.35) + rng.normal(0, 0.1, (k, 30)))
        r = np.concatenate([null, signal], axis=1)
        est, lo, hi, p = rel.gene_reliability(r, 0.9)
        called = rel.reliable_genes(est, p, fdr=0.1)
        shares.append(called[:300].sum() / max(called.sum(), 1))
        powers.append(called[300:].mean())
    assert np.mean(shares) <= 0.1
    assert np.mean(powers) > 0.8
    # the interval of a gene's r on a new section holds the per-section values
    est, lo, hi, p = rel.gene_reliability(np.array([[0.2, -0.1], [0.3, 0.1], [0.25, 0.0]]), 0.9)
    assert (lo < est).all() and (est < hi).all() and p[0] < p[1]


def test_benjamini_hochberg_and_a_gene_constant_on_a_section():
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    np.testing.assert_array_equal(rel.benjamini_hochberg(p, 0.05), [True, True] + [False] * 8)
    assert rel.benjamini_hochberg(np.array([]), 0.1).size == 0
    r = np.array([[0.5, np.nan], [0.4, np.nan], [0.45, 0.3]])  # gene 2 was constant on two sections
    est, lo, hi, pv = rel.gene_reliability(r, 0.9)
    assert pv[1] == 1.0 and np.isnan(lo[1]) and np.isfinite(est[0])


def test_distances_shift_and_difficulty():
    rng = np.random.default_rng(2)
    centre = rng.normal(size=16)
    train = centre + 0.3 * rng.normal(size=(300, 16))
    section = np.repeat(np.arange(3), 100)
    other = rel.other_section_distance(train, section)
    scale = np.median(other)
    near = rel.difficulty(rel.nn_distance(centre + 0.3 * rng.normal(size=(50, 16)), train), scale)
    far = rel.difficulty(rel.nn_distance(-centre + 0.3 * rng.normal(size=(50, 16)), train), scale)
    assert np.median(far) > 2 * np.median(near)
    assert far.max() <= rel.DIFFICULTY_CLIP[1] and near.min() >= rel.DIFFICULTY_CLIP[0]
    cal = np.array([np.median(rel.difficulty(other[section == s], scale)) for s in range(3)])
    assert rel.shift_p_value(float(np.median(far)), cal) == 0.25  # beyond every training section
    assert rel.shift_p_value(float(np.min(cal)), cal) == 1.0


def test_shrinking_towards_genes_alike_estimates_r_better_than_each_gene_alone():
    rng = np.random.default_rng(3)
    n, k = 600, 3
    true = rng.uniform(-0.1, 0.25, n)  # each gene's r on new sections (Fisher z)
    fit_r = 1.5 * true + 0.3 + 0.1 * rng.normal(size=n)  # in-sample: optimistic, but ranks the genes
    r_groups = np.tanh(true[None, :] + 0.15 * rng.normal(size=(k, n)))
    raw = np.tanh(np.arctanh(r_groups).mean(0))
    cov = np.column_stack([fit_r, rng.normal(size=n)])  # one informative covariate, one not
    est, w = rel.shrink_estimates(r_groups, cov)
    assert 0.1 < w < 0.9
    err = lambda e: float(np.mean((np.arctanh(e) - true) ** 2))  # noqa: E731
    assert err(est) < 0.7 * err(raw)
    # without information in the covariates, the estimates stay close to the genes' own
    est0, w0 = rel.shrink_estimates(r_groups, rng.normal(size=(n, 2)))
    assert w0 > w and np.corrcoef(est0, raw)[0, 1] > 0.95
    # too few genes to pool, or NaN covariates: the plain mean
    np.testing.assert_allclose(rel.shrink_estimates(r_groups[:, :3], cov[:3])[0], raw[:3])
    cov[0] = np.nan
    assert rel.shrink_estimates(r_groups, cov)[0][0] == pytest.approx(raw[0])


def test_a_new_section_like_the_training_ones_has_the_difficulty_of_a_held_out_one():
    # four sections drawn alike: a fifth is as far from the bank as each held-out one is from the others,
    # when measured against banks of the same size; against the whole (larger) bank it looks easier
    rng = np.random.default_rng(5)
    centre = rng.normal(size=8)
    bank = centre + rng.normal(size=(400, 8))
    group_of = np.repeat(np.arange(4), 100)
    scale = float(np.median(rel.other_section_distance(bank, group_of)))
    new = centre + rng.normal(size=(300, 8))
    fair = np.median(rel.difficulty(rel.held_out_distance(new, bank, group_of), scale))
    whole = np.median(rel.difficulty(rel.nn_distance(new, bank), scale))
    assert abs(fair - 1) < 0.08 and whole < fair - 0.04
    np.testing.assert_allclose(rel.held_out_distance(new, bank, np.zeros(400)), rel.nn_distance(new, bank))
