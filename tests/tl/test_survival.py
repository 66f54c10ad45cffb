"""sr.tl.survival, sr.tl.classify, sr.pl.kaplan_meier and the attention MIL (fixture `slide_cohort`)."""

import numpy as np
import pandas as pd
import pytest
import torch

import stranker as sr
from stranker._errors import InputError
from stranker.model.mil import GatedAttentionMIL, cox_loss, pad_bags, predict_mil, train_mil


def _oracle(clinical, fold):
    from sksurv.metrics import concordance_index_censored

    t, e, r = (clinical[c].to_numpy() for c in ("time", "event", "risk"))
    return float(np.mean([concordance_index_censored(e[fold == k], t[fold == k], r[fold == k])[0]
                          for k in np.unique(fold)]))


@pytest.fixture
def cohort(slide_cohort):
    return slide_cohort[2].copy()


def test_coxnet_cindex_beats_chance_close_to_the_oracle(cohort, slide_cohort):
    clinical = slide_cohort[1]
    res = sr.tl.survival(cohort, method="coxnet", cv=5, seed=0)
    oracle = _oracle(clinical, res["fold"])
    assert res["c_index"] > 0.65 and res["c_index_pooled"] > 0.65
    assert res["c_index"] > oracle - 0.15, (res["c_index"], oracle)
    assert len(res["c_index_folds"]) == 5 and res["c_index_sd"] >= 0
    assert res["censoring"] > 0.2 and res["c_index_uno"] is not None and res["c_index_uno"] > 0.6
    # written: out-of-fold risk and the record under the model's name
    risk = cohort.obs["stranker_risk"].to_numpy()
    assert np.isfinite(risk).all()
    assert cohort.uns["stranker_survival"]["coxnet"]["c_index"] == res["c_index"]


def test_shuffled_survival_sits_near_half(cohort):
    rng = np.random.default_rng(0)
    cs = []
    for _ in range(3):
        c = cohort.copy()
        perm = rng.permutation(c.n_obs)
        c.obs["time"] = c.obs["time"].to_numpy()[perm]
        c.obs["event"] = c.obs["event"].to_numpy()[perm]
        cs.append(sr.tl.survival(c)["c_index"])
    assert 0.4 < np.mean(cs) < 0.6, cs


def test_folds_are_seeded_and_stratified_by_event(cohort):
    a = sr.tl.survival(cohort, seed=3)
    b = sr.tl.survival(cohort.copy(), seed=3)
    c = sr.tl.survival(cohort.copy(), seed=4)
    np.testing.assert_array_equal(a["fold"], b["fold"])
    assert a["c_index"] == b["c_index"]
    assert not np.array_equal(a["fold"], c["fold"])
    e = cohort.obs["event"].to_numpy()
    per_fold = [e[a["fold"] == k].sum() for k in range(5)]
    assert max(per_fold) - min(per_fold) <= 1


def test_other_survival_models_and_attention_beside_them(cohort):
    for model, kw in (("coxph", {"n_pcs": 8}), ("rsf", {}), ("attention", {"epochs": 80})):
        res = sr.tl.survival(cohort, method=model, **kw)
        assert res["c_index"] > 0.6, (model, res["c_index"])
    assert set(cohort.uns["stranker_survival"]) == {"coxph", "rsf", "attention"}


def test_classify_auc_and_outputs(cohort):
    res = sr.tl.classify(cohort, label="label")
    assert res["auc"] > 0.8 and res["balanced_accuracy"] > 0.7
    assert res["classes"] == ["low", "high"]
    proba = cohort.obsm["stranker_proba"]
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
    assert list(cohort.obs["stranker_pred"].cat.categories) == ["low", "high"]
    att = sr.tl.classify(cohort, label="label", method="attention", epochs=80)
    assert att["auc"] > 0.65
    assert set(cohort.uns["stranker_classify"]) == {"logistic", "attention"}
    # several classes: one-vs-rest AUC
    cohort.obs["quartile"] = pd.qcut(cohort.obs["fraction"], 4, labels=["q1", "q2", "q3", "q4"])
    multi = sr.tl.classify(cohort, label="quartile", cv=3)
    assert multi["auc"] > 0.6 and cohort.obsm["stranker_proba"].shape == (cohort.n_obs, 4)


def test_classify_on_shuffled_labels_is_chance(cohort):
    cohort.obs["noise"] = np.random.default_rng(0).permutation(cohort.obs["label"].to_numpy())
    assert 0.3 < sr.tl.classify(cohort, label="noise")["auc"] < 0.7


def test_results_round_trip_through_h5ad(cohort, tmp_path):
    import anndata as ad

    res = sr.tl.survival(cohort)
    sr.tl.classify(cohort)
    cohort.write_h5ad(tmp_path / "cohort.h5ad")
    back = ad.read_h5ad(tmp_path / "cohort.h5ad")
    assert back.uns["stranker_survival"]["coxnet"]["c_index"] == res["c_index"]
    np.testing.assert_array_equal(back.obs["stranker_risk"], cohort.obs["stranker_risk"])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda o: o.assign(time=-o["time"]), "positive survival times"),
        (lambda o: o.assign(time=o["time"].where(o.index != o.index[2])), "missing or non-numeric times"),
        (lambda o: o.assign(event=False), "no event"),
        (lambda o: o.assign(event=2), "event indicators"),
        (lambda o: o.drop(columns="time"), "Column 'time'"),
    ],
)
def test_bad_survival_tables_raise_and_write_nothing(cohort, change, match):
    cohort.obs = change(cohort.obs)
    with pytest.raises(InputError, match=match):
        sr.tl.survival(cohort)
    assert "stranker_risk" not in cohort.obs and "stranker_survival" not in cohort.uns


def test_too_few_slides_and_missing_inputs(cohort):
    with pytest.raises(InputError, match="too few for cv=5"):
        sr.tl.survival(cohort[:8].copy(), cv=5)
    few_events = cohort.copy()
    few_events.obs["event"] = np.arange(few_events.n_obs) < 3
    with pytest.raises(InputError, match="stratum"):
        sr.tl.survival(few_events, cv=5)
    with pytest.raises(InputError, match="keep_tiles=True"):
        bare = cohort.copy()
        del bare.uns["stranker_tiles"]
        sr.tl.survival(bare, method="attention")
    with pytest.raises(InputError, match="embed_slides"):
        sr.tl.survival(cohort, use_rep="X_missing")
    with pytest.raises(InputError, match="`method` must be one of"):
        sr.tl.survival(cohort, method="cox")
    one = cohort.copy()
    one.obs["label"] = "x"
    with pytest.raises(InputError, match="single class"):
        sr.tl.classify(one)


def test_old_model_argument_still_works_with_a_future_warning(cohort):
    with pytest.warns(FutureWarning, match="`model=` is renamed `method=`"):
        old = sr.tl.survival(cohort.copy(), model="coxph", n_pcs=4)
    new = sr.tl.survival(cohort.copy(), method="coxph", n_pcs=4)
    assert old["c_index"] == new["c_index"] and new["method"] == "coxph"
    with pytest.warns(FutureWarning, match="`model=` is renamed `method=`"):
        assert sr.tl.classify(cohort.copy(), model="logistic")["method"] == "logistic"
    with pytest.raises(TypeError, match="both"):
        sr.tl.survival(cohort, model="coxph", method="coxph")


def test_one_log_line_names_what_was_written(cohort, caplog):
    import logging

    log = logging.getLogger("stranker")
    log.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="stranker")
    try:
        sr.tl.survival(cohort, method="coxph", n_pcs=4)
    finally:
        log.removeHandler(caplog.handler)
    written = [r.getMessage() for r in caplog.records if "stranker_risk" in r.getMessage()]
    assert written == ["Added obs['stranker_risk'], uns['stranker_survival'] to the cohort."]


def test_copy_returns_a_written_copy_and_leaves_the_cohort(cohort):
    before = (set(cohort.obs), set(cohort.uns), set(cohort.obsm))
    out = sr.tl.survival(cohort, method="coxph", n_pcs=4, copy=True)
    assert out is not cohort and "stranker_risk" in out.obs and "coxph" in out.uns["stranker_survival"]
    out = sr.tl.classify(cohort, copy=True)
    assert "stranker_proba" in out.obsm and "logistic" in out.uns["stranker_classify"]
    assert (set(cohort.obs), set(cohort.uns), set(cohort.obsm)) == before


def test_seed_defaults_to_settings(cohort):
    before = sr.settings.seed
    try:
        sr.settings.seed = 4
        a = sr.tl.survival(cohort.copy())
    finally:
        sr.settings.seed = before
    np.testing.assert_array_equal(a["fold"], sr.tl.survival(cohort.copy(), seed=4)["fold"])
    assert not np.array_equal(a["fold"], sr.tl.survival(cohort.copy(), seed=before)["fold"])


def test_kaplan_meier_splits_by_risk(cohort, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sr.tl.survival(cohort)
    ax = sr.pl.kaplan_meier(cohort, show=False, save=str(tmp_path / "km.png"))
    assert (tmp_path / "km.png").stat().st_size > 0
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("low risk") and labels[1].startswith("high risk")
    assert ax.stranker_logrank[1] < 0.05  # the out-of-fold risk separates the curves
    title = ax.get_title()
    assert title.startswith("Slides by predicted risk (log-rank p = ") and "stranker_" not in title
    _, ax3 = plt.subplots()
    assert sr.pl.kaplan_meier(cohort, groups=3, ax=ax3) is ax3
    assert len(ax3.get_legend().get_texts()) == 3
    plt.close("all")
    with pytest.raises(InputError, match="sr.tl.survival"):
        sr.pl.kaplan_meier(cohort, risk="nope", show=False)


# ------------------------------------------------------------------------------ the MIL core
def test_cox_loss_matches_breslow_with_ties():
    rng = np.random.default_rng(0)
    t = np.array([5.0, 3.0, 3.0, 8.0, 1.0, 3.0, 9.0])
    e = np.array([1, 1, 0, 1, 1, 1, 0], dtype=bool)
    r = rng.standard_normal(len(t))
    ref = -np.mean([r[i] - np.log(np.exp(r[t >= t[i]]).sum()) for i in np.flatnonzero(e)])
    got = cox_loss(torch.tensor(r), torch.tensor(t), torch.tensor(e)).item()
    assert got == pytest.approx(ref, rel=1e-6)


def test_attention_ignores_padding_and_learns_a_key_instance():
    rng = np.random.default_rng(0)
    net = GatedAttentionMIL(4, n_out=2).eval()
    bag = rng.standard_normal((3, 4)).astype(np.float32)
    out1, att1, _ = predict_mil(net, [bag])
    out2, att2, _ = predict_mil(net, [bag, rng.standard_normal((9, 4)).astype(np.float32)])
    np.testing.assert_allclose(out1[0], out2[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(att1[0], att2[0], rtol=1e-5, atol=1e-6)
    x, mask = pad_bags([bag, bag[:1]])
    assert mask.sum().item() == 4
    # positive bags hold one tile shifted along the first axis
    bags, y = [], []
    for i in range(80):
        b = rng.standard_normal((int(rng.integers(5, 15)), 4)).astype(np.float32)
        if i % 2:
            b[rng.integers(len(b)), 0] += 4.0
        bags.append(b)
        y.append(i % 2)
    y = np.array(y)
    net = train_mil(bags[:60], y[:60], task="ce", epochs=200, lr=5e-3, seed=0)
    pred = predict_mil(net, bags[60:])[0].argmax(1)
    assert (pred == y[60:]).mean() >= 0.85
