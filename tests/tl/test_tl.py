"""sr.tl.fit / predict / evaluate and sr.Model on the synthetic dataset (tiny settings)."""

import numpy as np
import pytest

import stranker as sr
from stranker._errors import InputError
from stranker._expression import lognorm

FAST = dict(epochs=6, batch_size=32, patch_px=64, image_size=32, backbone="test_resnet", pretrained=False,
            n_top_genes=40, genes="heg")
ALL_TERMS = dict(w_corr=0.1, w_rank=0.03, w_distill=0.03)  # options (off by default): on here, all tested


def _copy(secs):
    from spatialdata import deepcopy

    return [deepcopy(s) for s in secs]


@pytest.fixture(scope="module")
def fitted(synthetic_small):
    secs = _copy(synthetic_small)
    model = sr.tl.fit(secs[:3], seed=0, **FAST, **ALL_TERMS)
    return model, secs


def _truth(sdata, genes):
    t = sdata.tables["table"]
    return lognorm(t.X)[:, t.var_names.get_indexer(genes)]


def _pcc(pred, true):
    from stranker._metrics import pearson_per_gene

    return float(np.nanmean(pearson_per_gene(pred, true)))


def test_fit_writes_results_in_training_tables(fitted):
    model, secs = fitted
    for s in secs[:3]:
        t = s.tables["table"]
        assert t.obsm["X_stranker"].shape == (t.n_obs, model.config.embed_dim)
        layer = t.layers["stranker"]
        idx = t.var_names.get_indexer(model.genes)
        assert np.isfinite(layer[:, idx]).all()
        others = np.setdiff1d(np.arange(t.n_vars), idx)
        assert np.isnan(layer[:, others]).all()
        rec = t.uns["stranker"]
        assert rec["in_sample"] is True
        assert rec["genes"] == model.genes
        assert set(rec["history"]) >= {"regression", "clip", "rank", "distill", "total"}
        assert rec["params"]["method"] == "stranker" and rec["device"] == "cpu"
        assert rec["weights_source"] == "random"
    assert "stranker" not in secs[3].tables["table"].layers  # never touched


def test_each_loss_term_decreases(fitted):
    model, _ = fitted
    h = model.history
    for term in ("regression", "clip", "rank", "distill", "total"):
        first, last = h[0][term], min(x[term] for x in h[-2:])
        assert last < first, f"{term}: {first:.3f} -> {last:.3f}"


def test_heldout_prediction_beats_mean_and_shuffled_pairs(fitted, synthetic_small):
    model, secs = fitted
    test = secs[3]
    sr.tl.predict(model, test)
    m = sr.tl.evaluate(test)
    genes = model.genes
    true = _truth(test, genes)
    train_mean = np.concatenate([_truth(s, genes) for s in secs[:3]]).mean(0)
    mse_mean = float(np.mean((true - train_mean) ** 2))
    assert m["mse"] < 0.9 * mse_mean
    # control: the same fit with image and expression paired at random
    shuffled = _copy(synthetic_small[:3])
    rng = np.random.default_rng(0)
    for s in shuffled:
        t = s.tables["table"]
        perm = rng.permutation(t.n_obs)
        t.X = t.X[perm]
    control = sr.tl.fit(shuffled, seed=0, **FAST)
    pc = _pcc(control.predict(test), true)
    # measured (seeds 0, 1): model r 0.50 / 0.51, shuffled control -0.01 / 0.18, MSE 0.69x the mean's
    assert m["pcc_all"] > pc + 0.2, (m["pcc_all"], pc)
    assert m["pcc_all"] > 0.3


def test_evaluate_metrics_and_pooled(fitted):
    model, secs = fitted
    sr.tl.predict(model, secs[3])
    m1 = sr.tl.evaluate(secs[3])
    assert {"pcc_all", "pcc_heg", "pcc_median", "frac_positive", "mae", "mse"} <= set(m1)
    assert len(m1["heg_genes"]) == min(50, len(model.genes))
    t = secs[3].tables["table"]
    assert np.isfinite(t.var["stranker_pcc"][model.genes]).all()
    assert t.uns["stranker"]["metrics"]["pcc_all"] == m1["pcc_all"]
    m = sr.tl.evaluate(secs[2:4])
    assert set(m["per_section"]) and "pooled" in m and "scope" in m
    assert np.isclose(m["pcc_all"], np.mean([v["pcc_all"] for v in m["per_section"].values()]))


def test_large_tables_get_a_sparse_layer_of_the_modelled_genes(fitted, monkeypatch):
    # a dense NaN layer over all genes of a Visium HD table would not fit in memory: beyond
    # settings.max_dense_layer the same predictions are written as CSR over the modelled genes
    from scipy import sparse

    model, secs = fitted
    dense_sd, sparse_sd = _copy([secs[3]])[0], _copy([secs[3]])[0]
    sr.tl.predict(model, dense_sd)
    monkeypatch.setattr(sr.settings, "max_dense_layer", 1024)
    sr.tl.predict(model, sparse_sd)
    d, s = dense_sd.tables["table"], sparse_sd.tables["table"]
    assert d.uns["stranker"]["layer_format"] == "dense" and s.uns["stranker"]["layer_format"] == "sparse"
    assert sparse.issparse(s.layers["stranker"]) and s.layers["stranker"].nnz == s.n_obs * len(model.genes)
    assert s.n_vars > len(model.genes)
    cols = s.var_names.get_indexer(model.genes)
    np.testing.assert_array_equal(s.layers["stranker"][:, cols].toarray(), d.layers["stranker"][:, cols])
    assert sr.tl.evaluate(sparse_sd)["pcc_all"] == pytest.approx(
        sr.tl.evaluate(dense_sd)["pcc_all"], abs=1e-6
    )
    other = next(g for g in s.var_names if g not in model.genes)
    with pytest.raises(InputError, match="no prediction"):
        sr.tl.evaluate(sparse_sd, genes=[model.genes[0], other])
    # the plots read it as they read the dense layer
    import matplotlib

    matplotlib.use("Agg")
    sr.pl.correlation(sparse_sd, show=False)
    sr.pl.gene_map(sparse_sd, genes=model.genes[:2], show=False)


def test_evaluate_without_predictions_names_the_fix(synthetic_small):
    with pytest.raises(InputError, match="sr.tl.predict"):
        sr.tl.evaluate(synthetic_small[0], genes=["EPCAM"])


def test_save_load_round_trip(fitted, tmp_path):
    model, secs = fitted
    p1 = model.predict(secs[3])
    model.save(tmp_path / "m")
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "m")
    loaded = sr.Model.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.predict(secs[3]), p1)
    np.testing.assert_array_equal(loaded.embed(secs[3]), model.embed(secs[3]))
    assert loaded.genes == model.genes and loaded.history == model.history
    assert loaded.config.chosen == model.config.chosen and "image_size" in loaded.config.chosen


def test_same_seed_same_model(synthetic_small):
    kw = dict(FAST, epochs=2)
    a = sr.tl.fit(_copy(synthetic_small[:2]), seed=3, **kw)
    b = sr.tl.fit(_copy(synthetic_small[:2]), seed=3, **kw)
    np.testing.assert_array_equal(a.predict(synthetic_small[3]), b.predict(synthetic_small[3]))


def test_model_train_and_fit_give_the_same_model_for_the_same_options(synthetic_small, monkeypatch):
    # before: Model.train took the options the user set to be those off the preset, so
    # `image_size=112` (the preset's) gave way to the named backbone's 48 px, while sr.tl.fit,
    # which knew its options, kept 112: two models from the same arguments
    import torch

    import stranker.model.backbones as bb

    entry = bb.Backbone("tiny-cnn", None, "test_resnet", {}, input_px=48, mpp=1.0, frozen=False)
    monkeypatch.setitem(bb.REGISTRY, "tiny-cnn", entry)  # a named backbone, random weights, offline
    opts = dict(backbone="tiny-cnn", image_size=112, pretrained=False, epochs=1, batch_size=32,
                resolution_jitter=1.0)
    genes = dict(genes="heg", n_top_genes=20)
    a = sr.Model(sr.model.make_config(**opts), **genes)
    a.train(_copy(synthetic_small[:2]), seed=5)
    b = sr.tl.fit(_copy(synthetic_small[:2]), seed=5, **genes, **opts)
    assert a.config.image_size == b.config.image_size == 112  # asked for, though the preset's value
    assert a.config.patch_um == b.config.patch_um == pytest.approx(entry.patch_um)  # left: the backbone's
    assert a.config == b.config and a.genes == b.genes
    assert a.geometry == b.geometry and a.meta.patch_px == b.meta.patch_px
    sa, sb = a.aligner.state_dict(), b.aligner.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_interrupted_fit_resumes_to_the_same_result(synthetic_small, tmp_path, monkeypatch):
    import stranker.train.loop as loop

    # 2 epochs with resolution jitter, then 2 of the sharp finish; the fit is cut in the finish's 2nd
    kw = dict(FAST, epochs=2, sharp_epochs=2, checkpoint_dir=str(tmp_path / "ckpt"))
    full = sr.tl.fit(_copy(synthetic_small[:2]), seed=1, **dict(kw, checkpoint_dir=str(tmp_path / "full")))
    secs = _copy(synthetic_small[:2])
    real = loop.batches
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # 1 call to count steps, then epochs 1, 2, 3; the 4th epoch is interrupted
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "batches", interrupting)
    with pytest.raises(KeyboardInterrupt):
        sr.tl.fit(secs, seed=1, **kw)
    assert "stranker" not in secs[0].tables["table"].layers  # nothing written by the failed call
    monkeypatch.setattr(loop, "batches", real)
    resumed = sr.tl.fit(secs, seed=1, resume=True, **kw)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    np.testing.assert_allclose(
        resumed.predict(synthetic_small[3]), full.predict(synthetic_small[3]), atol=1e-5
    )


@pytest.mark.parametrize("method", ["bleep", "mclstexp", "rankbygene"])
def test_presets_run(method, synthetic_small):
    secs = _copy(synthetic_small[:2])
    model = sr.tl.fit(secs, method=method, **dict(FAST, epochs=1))
    assert model.config.method == method
    pred = model.predict(synthetic_small[3])
    assert pred.shape == (synthetic_small[3].tables["table"].n_obs, len(model.genes))
    assert np.isfinite(pred).all()


def test_precomputed_features_without_pixels(synthetic_small):
    import anndata as ad

    rng = np.random.default_rng(0)
    tabs = []
    for s in synthetic_small:
        t = s.tables["table"]
        a = ad.AnnData(t.X.copy(), obs=t.obs[[]].copy(), var=t.var[[]].copy())
        a.obsm["spatial"] = t.obsm["spatial"].copy()
        a.obsm["X_uni"] = t.obsm["programs"] + 0.05 * rng.normal(size=t.obsm["programs"].shape)
        tabs.append(a)
    model = sr.tl.fit(tabs[:3], image_features="X_uni", **dict(FAST, epochs=20, batch_size=64, lr=1e-2))
    assert "X_stranker" in tabs[0].obsm
    pred = model.predict(tabs[3])
    assert _pcc(pred, lognorm(tabs[3].X)[:, tabs[3].var_names.get_indexer(model.genes)]) > 0.3


def test_predict_on_image_only_slide_lays_tiles(fitted, synthetic_small):
    from spatialdata import SpatialData

    model, _ = fitted
    image_only = SpatialData(images={"he": synthetic_small[3].images["he"]})
    with pytest.raises(InputError, match="tile_px="):  # the model knows its µm/px, the image does not
        sr.tl.predict(model, image_only)
    mpp = synthetic_small[3].tables["table"].uns["microns_per_pixel"]
    image_only.attrs["microns_per_pixel"] = {"he": mpp}
    sr.tl.predict(model, image_only)
    assert "stranker_tiles" in image_only.shapes and "stranker_table" in image_only.tables
    t = image_only.tables["stranker_table"]
    assert t.n_obs > 50 and list(t.var_names) == model.genes
    assert np.isfinite(t.layers["stranker"]).all() and t.obsm["X_stranker"].shape[0] == t.n_obs
    assert t.X is None  # the predictions are held once, in the layer
    assert t.uns["stranker"]["in_sample"] is False
    # the tiles are usable as input again (one adapter)
    sr.tl.evaluate  # noqa: B018
    again = sr.pp.patches(image_only, size=32, table_key="stranker_table")
    assert again.shape[0] == t.n_obs


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(method="nope"), "`method` must be one of"),
        (dict(backbone="not_a_net"), "Unknown timm backbone"),
        (dict(genes=["EPCAM", "NOT_A_GENE"]), "NOT_A_GENE"),
        (dict(genes="xyz"), "`genes` must be"),
        (dict(device="cuda"), "no CUDA device"),
        (dict(device="tpu"), "not a torch device"),
        (dict(device="cuda:99"), "CUDA device"),
        (dict(epochs=0), "`epochs` must be at least 1"),
        (dict(resume=True), "`resume=True` needs `checkpoint_dir=`"),
        (dict(colour="blue"), "Unknown model option"),
        (dict(weights="/nonexistent/w.pth"), "does not exist"),
        (dict(image_features="X_missing"), "X_missing"),
    ],
)
def test_bad_arguments_raise_and_write_nothing(kwargs, match, synthetic_small):
    import torch

    if kwargs.get("device") == "cuda" and torch.cuda.is_available():  # cuda:99 is refused either way
        pytest.skip("a CUDA device is present")
    secs = _copy(synthetic_small[:1])
    before = set(secs[0].tables["table"].layers) | set(secs[0].tables["table"].obsm)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        sr.tl.fit(secs, **dict(dict(FAST, epochs=1), **kwargs))
    assert set(secs[0].tables["table"].layers) | set(secs[0].tables["table"].obsm) == before


def test_weights_from_a_local_file(synthetic_small, tmp_path):
    import timm
    import torch

    net = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(0.01)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    model = sr.tl.fit(_copy(synthetic_small[:1]), weights=str(tmp_path / "w.pth"), **dict(FAST, epochs=1))
    assert model.meta["weights_source"].startswith("file:w.pth")


def test_sparse_layer_of_one_library_keeps_the_rows_of_the_others():
    # several libraries share one squidpy table: each write fills its rows and keeps the others
    import anndata as ad
    from scipy import sparse

    from stranker.section import Section
    from stranker.write import write_results

    t = ad.AnnData(np.zeros((5, 4), dtype=np.float32))

    def lib(rows, vals):
        sp = Section(name="s", image=None, centers=np.zeros((len(rows), 2)), diameter=1.0, table=t,
                   rows=np.array(rows))
        write_results(sp, layers={"p": sparse.csr_matrix(np.array(vals, dtype=np.float32))})

    lib([0, 2], [[1, 0, 2, 0], [3, 0, 4, 0]])
    lib([4, 1], [[5, 0, 6, 0], [7, 0, 8, 0]])
    lib([2], [[9, 0, 9, 0]])
    assert sparse.issparse(t.layers["p"])
    np.testing.assert_array_equal(
        t.layers["p"].toarray(),
        [[1, 0, 2, 0], [7, 0, 8, 0], [9, 0, 9, 0], [0, 0, 0, 0], [5, 0, 6, 0]],
    )


def _drop_genes(sdata, genes):
    t = sdata.tables["table"]
    sdata.tables["table"] = t[:, ~t.var_names.isin(genes)].copy()
    return sdata.tables["table"]


@pytest.mark.parametrize("layer_format", ["dense", "sparse"])
def test_predict_on_a_table_lacking_modelled_genes_writes_only_their_own_columns(
    fitted, layer_format, monkeypatch, stranker_log
):
    # the table lacks 3 modelled genes: the others are written in their own columns, the 3 are listed
    import logging

    model, secs = fitted
    sd = _copy([secs[3]])[0]
    absent = [model.genes[0], model.genes[5], model.genes[-1]]
    t = _drop_genes(sd, absent)
    if layer_format == "sparse":
        monkeypatch.setattr(sr.settings, "max_dense_layer", 1024)
    expected = model.predict(sd)
    sr.tl.predict(model, sd)
    rec = t.uns["stranker"]
    present = [g for g in model.genes if g not in absent]
    assert rec["genes"] == present and rec["genes_absent"] == absent
    assert rec["layer_format"] == layer_format
    layer = t.layers["stranker"]
    layer = layer.toarray() if layer_format == "sparse" else layer
    keep = [model.genes.index(g) for g in present]
    np.testing.assert_allclose(layer[:, t.var_names.get_indexer(present)], expected[:, keep], rtol=1e-5)
    others = ~t.var_names.isin(present)
    fill = 0.0 if layer_format == "sparse" else np.nan
    np.testing.assert_array_equal(layer[:, others], np.full((t.n_obs, others.sum()), fill, np.float32))
    warned = [r.getMessage() for r in stranker_log.records if r.levelno == logging.WARNING]
    assert any("3 of the model's" in w and absent[0] in w for w in warned)
    # evaluate scores the genes both have and says which modelled genes it left out
    m = sr.tl.evaluate(sd)
    assert m["n_genes"] == len(present) and m["genes_not_scored"] == absent
    # the README's chain: the genes written are the ones to hand to squidpy
    assert np.isfinite(sr.write.read_predictions(
        sr.section.as_sections(sd)[0], "stranker", rec["genes"])).all()


def test_predict_refuses_a_table_with_none_of_the_modelled_genes(fitted):
    model, secs = fitted
    sd = _copy([secs[3]])[0]
    t = sd.tables["table"]
    t.var_names = [f"ENSG{i:011d}" for i in range(t.n_vars)]
    before = t.copy()
    with pytest.raises(InputError, match="none of the model's"):
        sr.tl.predict(model, sd)
    assert set(t.layers) == set(before.layers) and set(t.uns) == set(before.uns)


def test_evaluate_counts_genes_without_r_and_leaves_them_out_of_every_figure(fitted, stranker_log):
    # a constant prediction has no Pearson r: it used to drop out of ACG but count as 'not positive'
    model, secs = fitted
    sd = _copy([secs[3]])[0]
    sr.tl.predict(model, sd)
    t = sd.tables["table"]
    ref = sr.tl.evaluate(sd)
    flat = model.genes[:4]
    t.layers["stranker"][:, t.var_names.get_indexer(flat)] = 1.0
    m = sr.tl.evaluate(sd)
    assert m["n_genes_undefined"] == 4 and m["genes_undefined"] == sorted(flat)
    r = t.var["stranker_pcc"][model.genes].to_numpy()
    ok = np.isfinite(r)
    assert ok.sum() == len(model.genes) - 4
    assert m["frac_positive"] == pytest.approx(np.mean(r[ok] > 0))
    assert m["pcc_all"] == pytest.approx(np.mean(r[ok]))
    assert m["n_genes"] == ref["n_genes"] == len(model.genes)
    assert any("undefined" in r.getMessage() for r in stranker_log.records)


def test_predict_takes_a_saved_model_s_folder_and_names_the_fix_otherwise(fitted, tmp_path):
    model, secs = fitted
    sd = _copy([secs[3]])[0]
    before = sd.tables["table"].copy()
    for bad in (None, 3):
        with pytest.raises(InputError, match=r"sr.Model.load"):
            sr.tl.predict(bad, sd)
    assert set(sd.tables["table"].layers) == set(before.layers)
    model.save(tmp_path / "m")
    sr.tl.predict(str(tmp_path / "m"), sd)
    np.testing.assert_allclose(sd.tables["table"].obsm["X_stranker"], model.embed(sd), rtol=1e-5, atol=1e-6)


def test_infer_puts_the_weights_back_as_they_were(fitted):
    # inference used to leave the user's module on the device and in eval mode
    model, secs = fitted
    model.aligner.train()
    model.predict(secs[3])
    assert model.aligner.training
    model.aligner.eval()


@pytest.mark.gpu
def test_infer_on_cuda_leaves_the_weights_on_the_cpu(fitted):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, secs = fitted
    model.predict(secs[3], device="cuda")
    assert next(model.aligner.parameters()).device.type == "cpu"


def test_duplicated_gene_names_are_refused_naming_the_fix(fitted):
    # pandas used to raise InvalidIndexError from deep inside
    model, secs = fitted
    sd = _copy([secs[3]])[0]
    t = sd.tables["table"]
    names = list(t.var_names)
    names[1] = names[0] = model.genes[0]
    t.var_names = names
    before = t.copy()
    with pytest.raises(InputError, match=r"var_names_make_unique\(\)"):
        sr.tl.predict(model, sd)
    assert set(t.layers) == set(before.layers) and set(t.uns) == set(before.uns)
    with pytest.raises(InputError, match=r"var_names_make_unique\(\)"):
        sr.tl.fit([sd], **dict(FAST, epochs=1))


def test_spearman_per_gene_matches_scipy_and_ignores_scale():
    from scipy.stats import spearmanr

    from stranker._metrics import spearman_per_gene, summarise

    rng = np.random.default_rng(0)
    true = rng.poisson(2.0, (40, 5)).astype(float)  # ties, as in counts
    pred = true + rng.normal(0, 1.5, true.shape)
    rho = spearman_per_gene(pred, true)
    np.testing.assert_allclose(rho, [spearmanr(pred[:, j], true[:, j])[0] for j in range(5)], atol=1e-12)
    np.testing.assert_allclose(spearman_per_gene(np.exp(pred), true), rho, atol=1e-12)  # monotone map
    m = summarise(pred, true, list("abcde"), n_heg=2)
    assert m["spearman_all"] == pytest.approx(np.mean(rho))


def test_fit_with_unlabeled_trains_the_mean_teacher_on_their_patches(synthetic_small):
    secs = _copy(synthetic_small)
    opts = dict(FAST, epochs=2)
    before = secs[3].tables["table"].copy()
    model = sr.tl.fit(secs[:2], seed=0, unlabeled=secs[3], w_consistency=1.0, **opts)
    h = model.history
    assert all(np.isfinite(x["consistency"]) and x["consistency"] > 0 for x in h)
    assert model.config.w_consistency == 1.0
    after = secs[3].tables["table"]  # read for its H&E only: untouched
    assert list(after.layers) == list(before.layers) and set(after.uns) == set(before.uns)
    np.testing.assert_array_equal(after.X.toarray() if hasattr(after.X, "toarray") else after.X,
                                  before.X.toarray() if hasattr(before.X, "toarray") else before.X)
    # the unlabelled patches change the fit; without them it is the plain fit
    plain = sr.tl.fit(_copy(synthetic_small[:2]), seed=0, **opts)
    assert "consistency" not in plain.history[0]
    a, b = (m.predict(_copy(synthetic_small[3:])[0]) for m in (model, plain))
    assert not np.allclose(a, b)


def test_unlabeled_without_its_weight_and_the_reverse_are_refused(synthetic_small):
    secs = _copy(synthetic_small)
    with pytest.raises(InputError, match="no `unlabeled` sections were given"):
        sr.tl.fit(secs[:2], seed=0, w_consistency=1.0, **FAST)
    with pytest.raises(InputError, match="`w_consistency=0` would never read them"):
        sr.tl.fit(secs[:2], seed=0, unlabeled=secs[3], **FAST)
    for s in secs[:2]:  # refused before anything was written
        assert "stranker" not in s.tables["table"].layers
