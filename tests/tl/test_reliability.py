"""Which predictions to believe: what fit estimates by cross-fitting, and what predict writes with it."""

import logging

import numpy as np
import pytest

import stranker as sr
from stranker.tl._reliability import Reliability
from tests.conftest import make_sdata

TINY = dict(epochs=2, batch_size=8, patch_px=32, image_size=32, backbone="test_resnet", seed=0,
            pretrained=False)
GENES = ["G0", "G1", "G2", "G3", "G4"]


@pytest.fixture(scope="module")
def fitted():
    secs = [make_sdata(n=24, seed=s)[0] for s in range(3)]
    return sr.tl.fit(secs, genes=GENES, **TINY), secs


def test_fit_estimates_reliability_on_held_out_sections(fitted):
    model, secs = fitted
    table = model.reliability
    assert list(table.index) == GENES
    assert list(table.columns) == ["cv_pcc", "cv_pcc_lo", "cv_pcc_hi", "p", "reliable"]
    assert ((table.cv_pcc_lo <= table.cv_pcc) & (table.cv_pcc <= table.cv_pcc_hi)).all()
    rec = model.reliability_record
    assert rec.r_groups.shape == (3, 5) and rec.groups == ["table", "table_1", "table_2"]
    assert len(model.fold_models) == 3 and rec.fold_epochs == 2  # a quarter of 2 + 4 epochs, at least 1 each
    # the fit's own tables get the per-gene columns (no intervals: in-sample spots)
    var = secs[0].tables["table"].var
    np.testing.assert_allclose(var["stranker_cv_pcc"].to_numpy(), table.cv_pcc.to_numpy())
    assert "stranker_lower" not in secs[0].tables["table"].layers


def test_predict_writes_intervals_difficulty_and_shift(fitted):
    model, _ = fitted
    sd = make_sdata(n=16, seed=7)[0]
    sr.tl.predict(model, sd)
    t = sd.tables["table"]
    pred, lo, hi = (np.asarray(t.layers[k]) for k in ("stranker", "stranker_lower", "stranker_upper"))
    assert (lo <= pred).all() and (pred <= hi).all()
    d = t.obs["stranker_difficulty"].to_numpy()
    np.testing.assert_allclose(hi - pred, d[:, None] * model.reliability_record.q[None, :], rtol=1e-5)
    assert d.std() > 0  # the difficulty varies from spot to spot
    rec = t.uns["stranker"]
    assert rec["fdr"] == 0.1 and rec["interval_level"] == 0.9 and "held-out groups" in rec["reliability"]
    assert set(rec["shift"]) == {"score", "p_value", "shifted", "reasons", "calibration", "groups",
                                 "embedding", "colour", "coarser", "training_coarser", "patient",
                                 "training_patients"}
    assert t.var["stranker_reliable"].dtype == bool


def test_a_section_unlike_the_training_tissue_is_flagged_and_gets_wider_intervals(fitted, caplog):
    model, _ = fitted
    sd = make_sdata(n=16, seed=7)[0]
    rng = np.random.default_rng(0)
    img = sd.images["he"]
    img.data = rng.integers(0, 256, img.shape, dtype=np.uint8)  # no tissue like the training's anywhere
    with caplog.at_level(logging.WARNING, logger="stranker"):
        sr.tl.predict(model, sd)
    shift = sd.tables["table"].uns["stranker"]["shift"]
    assert shift["shifted"] and shift["score"] > max(shift["calibration"])
    assert any("may be optimistic" in r.getMessage() and "'table'" in r.getMessage() for r in caplog.records)
    same = make_sdata(n=24, seed=1)[0]  # a copy of a training section: not shifted
    sr.tl.predict(model, same)
    assert not same.tables["table"].uns["stranker"]["shift"]["shifted"]
    width = lambda s: float(np.median(s.tables["table"].obs["stranker_difficulty"]))  # noqa: E731
    assert width(sd) > width(same)


def test_a_coarser_slide_or_another_patient_is_flagged_with_its_reason(fitted, monkeypatch, caplog):
    model, _ = fitted
    rec = model.reliability_record
    assert rec.coarser == pytest.approx(1.0) and rec.patients == [] and not rec.by_patient
    same = make_sdata(n=24, seed=1)[0]  # a copy of a training section
    sr.tl.predict(model, same)
    assert same.tables["table"].uns["stranker"]["shift"]["reasons"] == []
    # read with 3x less detail than any training section: no held-out section tested that
    monkeypatch.setattr(type(model), "coarser", lambda self, sp: 3.0)
    coarse = make_sdata(n=24, seed=1)[0]
    with caplog.at_level(logging.WARNING, logger="stranker"):
        sr.tl.predict(model, coarse)
    shift = coarse.tables["table"].uns["stranker"]["shift"]
    assert shift["shifted"] and shift["reasons"] == ["resolution"] and shift["coarser"] == 3.0
    assert any("less detail" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    # a patient the training tables did not name, when the estimates were made across sections of one
    # patient; training tables without patients say nothing of a new section's
    rec.patients, rec.by_patient = ["A"], False
    try:
        other = make_sdata(n=24, seed=1)[0]
        other.tables["table"].uns["patient"] = "B"
        sr.tl.predict(model, other)
        assert other.tables["table"].uns["stranker"]["shift"]["reasons"] == ["patient"]
        mine = make_sdata(n=24, seed=1)[0]
        mine.tables["table"].uns["patient"] = "A"
        sr.tl.predict(model, mine)
        assert not mine.tables["table"].uns["stranker"]["shift"]["shifted"]
        rec.by_patient = True  # held out by patient: a new patient is like the held-out ones
        sr.tl.predict(model, other)
        assert not other.tables["table"].uns["stranker"]["shift"]["shifted"]
    finally:
        rec.patients, rec.by_patient = [], False


def test_folds_are_patients_when_tables_name_them_and_the_record_keeps_them(tmp_path):
    secs = [make_sdata(n=24, seed=s)[0] for s in range(4)]
    for sd, p in zip(secs, ["P1", "P1", "P2", "P2"], strict=True):
        sd.tables["table"].uns["patient"] = p
    model = sr.tl.fit(secs, genes=GENES, **TINY)
    rec = model.reliability_record
    assert rec.groups == ["P1", "P2"] and rec.patients == ["P1", "P2"] and rec.by_patient
    model.save(tmp_path / "m")
    back = sr.Model.load(tmp_path / "m").reliability_record
    assert back.patients == ["P1", "P2"] and back.by_patient and back.coarser == rec.coarser
    assert back.shrink == rec.shrink and 0 < rec.shrink <= 1
    assert rec.fit_r.shape == (len(GENES),)  # the prior's evidence: the fit's r on its training spots
    np.testing.assert_array_equal(back.fit_r, rec.fit_r)


def test_a_default_fold_model_trains_a_tenth_of_the_epochs_and_one_sharp_epoch_single_view():
    from stranker.model import make_config
    from stranker.tl._reliability import fold_config

    cfg = make_config("stranker")
    fold = fold_config(cfg)
    assert (fold.epochs, fold.sharp_epochs) == (2, 1) and cfg.sharp_epochs == 4  # 10 % of 4 rounds to 0
    assert not fold.tta and not fold.reliability and cfg.tta
    assert fold_config(make_config("stranker", sharp_epochs=0)).sharp_epochs == 0  # no finish: none


def test_save_load_keeps_reliability_and_old_models_say_it_is_absent(fitted, tmp_path):
    model, _ = fitted
    model.save(tmp_path / "m")
    back = sr.Model.load(tmp_path / "m")
    assert back.reliability.equals(model.reliability)
    a, b = make_sdata(n=16, seed=7)[0], make_sdata(n=16, seed=7)[0]
    sr.tl.predict(model, a)
    sr.tl.predict(back, b)
    for k in ("stranker_lower", "stranker_upper"):
        np.testing.assert_allclose(a.tables["table"].layers[k], b.tables["table"].layers[k], rtol=1e-5)
    # a record saved before it kept the fit's in-sample r (or coarser, patients, shrink) still reads
    early = {k: v for k, v in back.bank.items()
             if k not in ("rel_fit_r", "rel_coarser", "rel_patients", "rel_by_patient", "rel_shrink")}
    rec = Reliability.from_bank(early)
    assert rec.fit_r.size == 0 and np.isnan(rec.coarser) and rec.shrink == 1.0
    np.testing.assert_array_equal(rec.estimate, back.reliability_record.estimate)
    # a model saved before stranker estimated reliability: no columns, a note saying why
    old = sr.Model(back.config, back.genes, aligner=back.aligner, meta=back.meta,
                   bank={k: v for k, v in back.bank.items() if not k.startswith("rel_")})
    assert old.reliability is None and Reliability.from_bank(old.bank) is None
    c = make_sdata(n=16, seed=7)[0]
    sr.tl.predict(old, c)
    t = c.tables["table"]
    assert "stranker_cv_pcc" not in t.var and "stranker_lower" not in t.layers
    assert "not estimated" in t.uns["stranker"]["reliability"]
    np.testing.assert_allclose(t.layers["stranker"], a.tables["table"].layers["stranker"], rtol=1e-5)


def test_reliability_false_and_a_single_section(caplog):
    off = sr.tl.fit([make_sdata(n=16, seed=s)[0] for s in range(2)], genes=GENES, reliability=False, **TINY)
    assert off.reliability is None and off.fold_models == []
    with caplog.at_level(logging.WARNING, logger="stranker"):
        one = sr.tl.fit(make_sdata(n=16, seed=0)[0], genes=GENES, **TINY)
    assert one.reliability is None
    assert any("needs at least two training sections" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="reliability_epochs"):
        sr.tl.fit(make_sdata(n=16, seed=0)[0], genes=GENES, reliability_epochs=0, **TINY)


def test_genes_without_image_signal_are_not_called_reliable():
    """make_sdata's counts are Poisson noise, independent of the image: at FDR 0.1 at most a tenth of
    such genes may be called reliable (here: none)."""
    rng = np.random.default_rng(5)
    genes = [f"N{j}" for j in range(30)]
    secs = [make_sdata(n=20, seed=s, counts=rng.poisson(4.0, (20, 30)).astype(np.float32), genes=genes)[0]
            for s in range(3)]
    model = sr.tl.fit(secs, genes=genes, **TINY)
    assert model.reliability["reliable"].sum() <= 3
    assert model.reliability["reliable"].sum() == 0


def test_image_only_slide_gets_intervals_and_a_shift_score(fitted):
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    model, _ = fitted
    tissue = np.random.default_rng(0).integers(60, 200, (3, 128, 128), dtype=np.uint8)
    sdata = SpatialData(images={"he": Image2DModel.parse(tissue, dims=("c", "y", "x"))})
    sr.tl.predict(model, sdata, tile_px=16)
    t = sdata.tables["stranker_table"]
    assert {"stranker_lower", "stranker_upper"} <= set(t.layers) and "shift" in t.uns["stranker"]
    assert "stranker_reliable" in t.var


def test_intervals_respect_the_dense_layer_limit(fitted, monkeypatch):
    from scipy import sparse

    model, _ = fitted
    sd = make_sdata(n=16, seed=7, counts=np.ones((16, 40), np.float32),
                    genes=GENES + [f"X{j}" for j in range(35)])[0]
    monkeypatch.setattr(sr.settings, "max_dense_layer", 100)
    sr.tl.predict(model, sd)
    t = sd.tables["table"]
    assert all(sparse.issparse(t.layers[k]) for k in ("stranker", "stranker_lower", "stranker_upper"))
    lo = t.layers["stranker_lower"][:, :5].toarray()
    assert (lo <= t.layers["stranker"][:, :5].toarray()).all()


def test_a_later_prediction_without_reliability_removes_the_earlier_outputs(fitted):
    """Intervals of an earlier model under the same key would be read against the new predictions."""
    model, _ = fitted
    sd = make_sdata(n=16, seed=7)[0]
    sr.tl.predict(model, sd)
    old = sr.Model(model.config, model.genes, aligner=model.aligner, meta=model.meta,
                   bank={k: v for k, v in model.bank.items() if not k.startswith("rel_")})
    sr.tl.predict(old, sd)
    t = sd.tables["table"]
    assert "stranker_lower" not in t.layers and "stranker_difficulty" not in t.obs
    assert not any(c.startswith("stranker_cv_pcc") or c == "stranker_reliable" for c in t.var.columns)
    assert "counts" in t.layers  # what stranker did not write stays
