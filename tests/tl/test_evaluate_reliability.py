"""sr.tl.evaluate scores the reliability outputs of a prediction: interval coverage and width, estimated r."""

import logging

import numpy as np
import pytest
from scipy.stats import spearmanr

import stranker as sr
from stranker._expression import lognorm
from tests.conftest import make_sdata

GENES = ["G0", "G1", "G2", "G3", "G4"]
KEYS = ("coverage_mean", "coverage_sd", "interval_width", "spearman_cv_pcc", "n_reliable",
        "frac_positive_reliable")


@pytest.fixture(scope="module")
def predicted():
    """A model fitted with reliability on three sections, and a new section it predicted (with intervals)."""
    train = [make_sdata(n=24, seed=s)[0] for s in range(3)]
    model = sr.tl.fit(train, epochs=2, batch_size=8, patch_px=32, image_size=32, backbone="test_resnet",
                      seed=0, pretrained=False, genes=GENES)
    assert model.reliability is not None
    test = make_sdata(n=16, seed=7)[0]
    sr.tl.predict(model, test)
    return model, train, test


def _copy(sdata):
    from spatialdata import deepcopy

    return deepcopy(sdata)


def _measured(table):
    return lognorm(table.X.toarray() if hasattr(table.X, "toarray") else table.X)


def test_coverage_width_and_estimates_of_a_predicted_section(predicted):
    model, _, test = predicted
    sdata = _copy(test)
    table = sdata.tables["table"]
    m = sr.tl.evaluate(sdata)
    lo, hi = table.layers["stranker_lower"], table.layers["stranker_upper"]
    true = _measured(table)
    cov = ((lo <= true) & (true <= hi)).mean(0)
    np.testing.assert_allclose(table.var["stranker_coverage"].to_numpy(), cov, atol=1e-6)
    assert m["coverage_mean"] == pytest.approx(cov.mean())
    assert m["coverage_sd"] == pytest.approx(cov.std())
    assert m["interval_width"] == pytest.approx(float((hi - lo).mean()), rel=1e-5)
    assert m["interval_level"] == pytest.approx(model.config.interval_level)
    r = table.var["stranker_pcc"].to_numpy()
    cv = table.var["stranker_cv_pcc"].to_numpy()
    np.testing.assert_allclose(cv, model.reliability["cv_pcc"].to_numpy())
    assert m["spearman_cv_pcc"] == pytest.approx(spearmanr(cv, r).statistic)
    assert m["n_reliable"] == int(model.reliability["reliable"].sum())
    if m["n_reliable"] == 0:
        assert m["frac_positive_reliable"] is None
    stored = table.uns["stranker"]["metrics"]
    assert all(stored[k] == m[k] or (stored[k] is None and m[k] is None) for k in KEYS)
    assert "coverage" not in stored  # the per-gene array goes into var only


def test_share_of_reliable_genes_with_a_positive_measured_r(predicted):
    _, _, test = predicted
    sdata = _copy(test)
    table = sdata.tables["table"]
    sr.tl.evaluate(sdata)
    r = table.var["stranker_pcc"].to_numpy()
    flags = np.zeros(len(r), dtype=bool)
    flags[np.argsort(r)[:3]] = True  # the three worst genes called reliable
    table.var["stranker_reliable"] = flags
    m = sr.tl.evaluate(sdata)
    assert m["n_reliable"] == 3
    assert m["frac_positive_reliable"] == pytest.approx(float(np.mean(r[flags] > 0)))
    table.var["stranker_reliable"] = False
    assert sr.tl.evaluate(sdata)["frac_positive_reliable"] is None


def test_training_section_has_estimates_but_no_intervals(predicted):
    _, train, _ = predicted
    sdata = _copy(train[0])
    table = sdata.tables["table"]
    assert "stranker_cv_pcc" in table.var and "stranker_lower" not in table.layers  # in-sample fit
    m = sr.tl.evaluate(sdata)
    assert "spearman_cv_pcc" in m and "n_reliable" in m
    assert not {"coverage_mean", "coverage_sd", "interval_width"} & set(m)
    assert "stranker_coverage" not in table.var


def test_without_reliability_outputs_evaluate_is_unchanged(predicted):
    _, _, test = predicted
    full = _copy(test)
    bare = _copy(test)
    table = bare.tables["table"]
    del table.layers["stranker_lower"], table.layers["stranker_upper"]
    table.var = table.var.drop(columns=[c for c in table.var if c.startswith("stranker_")])
    a = sr.tl.evaluate(full)
    b = sr.tl.evaluate(bare)
    assert not set(KEYS) & set(b) and "interval_level" not in b
    assert "stranker_coverage" not in table.var
    for k in ("pcc_all", "pcc_heg", "spearman_all", "pcc_median", "frac_positive", "mae", "mse", "n_genes"):
        assert b[k] == pytest.approx(a[k], nan_ok=True), k


def test_several_sections_mean_per_section_and_pooled(predicted):
    _, _, test = predicted
    a, b = _copy(test), _copy(test)
    tb = b.tables["table"]
    tb.layers["stranker_upper"] = tb.layers["stranker_lower"] - 1.0  # no spot inside its interval in b
    m = sr.tl.evaluate([a, b])
    ca, cb = (m["per_section"][n]["coverage_mean"] for n in m["per_section"])
    assert cb == 0.0 and ca > 0.0
    assert m["coverage_mean"] == pytest.approx((ca + cb) / 2)
    assert m["pooled"]["coverage_mean"] == pytest.approx((ca + cb) / 2)  # same spots in each
    np.testing.assert_array_equal(tb.var["stranker_coverage"].to_numpy(), 0.0)


def test_only_some_sections_with_intervals_warns_and_scores_none(predicted, caplog):
    _, _, test = predicted
    a, b = _copy(test), _copy(test)
    del b.tables["table"].layers["stranker_lower"]
    log = logging.getLogger("stranker")
    log.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="stranker")
    try:
        m = sr.tl.evaluate([a, b])
    finally:
        log.removeHandler(caplog.handler)
    assert "coverage_mean" not in m and "spearman_cv_pcc" in m
    assert any("lack the intervals" in r.getMessage() for r in caplog.records)


def test_coverage_counts_the_spots_inside_on_crafted_intervals():
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 20
    counts = rng.poisson(rng.uniform(2, 30, size=(n, 3))).astype(np.float32)
    true = lognorm(counts)
    a = ad.AnnData(counts, obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]),
                   var=pd.DataFrame(index=["A", "B", "C"]))
    a.obsm["spatial"] = rng.uniform(0, 100, size=(n, 2))
    a.layers["pred"] = (true + rng.normal(0, 0.2, size=true.shape)).astype(np.float32)
    a.uns["pred"] = {"genes": ["A", "B", "C"], "interval_level": 0.8}
    inside = np.arange(n)[:, None] < np.array([20, 10, 0])[None, :]  # A: every spot, B: half, C: none
    a.layers["pred_lower"] = np.where(inside, true - 0.5, true + 0.5).astype(np.float32)
    a.layers["pred_upper"] = np.where(inside, true + 0.5, true + 1.5).astype(np.float32)
    a.var["pred_cv_pcc"] = [0.6, 0.3, np.nan]
    a.var["pred_reliable"] = [True, False, False]
    m = sr.tl.evaluate(a, key="pred", key_added="score")
    np.testing.assert_allclose(a.var["score_coverage"].to_numpy(), [1.0, 0.5, 0.0])
    assert m["coverage_mean"] == pytest.approx(0.5)
    assert m["coverage_sd"] == pytest.approx(np.std([1.0, 0.5, 0.0]))
    assert m["interval_width"] == pytest.approx(1.0)
    assert m["interval_level"] == 0.8
    r = a.var["score_pcc"].to_numpy()
    assert m["frac_positive_reliable"] == float(r[0] > 0)
    assert m["spearman_cv_pcc"] == pytest.approx(np.sign(r[0] - r[1]))  # two genes with an estimate
