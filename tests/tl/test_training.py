"""The training object (sr.Model(config, genes).train) and its typed run record (Model.meta)."""

import hashlib
import json

import numpy as np
import pytest
import torch

import stranker as sr
from stranker._errors import InputError
from stranker.model import make_config
from stranker.tl._record import RunRecord

NET = dict(backbone="test_resnet", pretrained=False, epochs=1, batch_size=32, patch_px=64, image_size=32)


def _copies(secs):
    from spatialdata import deepcopy

    return [deepcopy(s) for s in secs]


def _layers(secs):
    return [s.tables["table"].layers.get("stranker") for s in secs]


@pytest.fixture(scope="module")
def trained(synthetic_small):
    secs = _copies(synthetic_small[:2])
    model = sr.Model(make_config("stranker", **NET), "heg", n_top_genes=8).train(secs, seed=3)
    return model, secs


def test_training_the_object_gives_the_model_of_fit(trained, synthetic_small):
    model, secs = trained
    assert all(layer is None for layer in _layers(secs))  # train() alone writes nothing
    fitted = _copies(synthetic_small[:2])
    ref = sr.tl.fit(fitted, genes="heg", n_top_genes=8, seed=3, **NET)
    assert model.genes == ref.genes
    for a, b in zip(model.aligner.state_dict().values(), ref.aligner.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for k in ("keys", "values"):
        np.testing.assert_array_equal(model.bank[k], ref.bank[k])
    held = synthetic_small[2]
    np.testing.assert_array_equal(model.predict(held), ref.predict(held))
    # key_added= writes the in-sample results fit writes, bit for bit
    again = _copies(synthetic_small[:2])
    sr.Model(make_config("stranker", **NET), "heg", n_top_genes=8).train(again, seed=3, key_added="stranker")
    for a, b in zip(_layers(again), _layers(fitted), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_untrained_model_says_what_to_do(synthetic_small, trained):
    model = sr.Model(make_config("stranker", **NET), ["EPCAM", "CD74"])
    assert "not trained" in repr(model) and model.genes == ["EPCAM", "CD74"]
    with pytest.raises(InputError, match=r"model.train\(data\)"):
        model.predict(synthetic_small[2])
    with pytest.raises(InputError, match="not trained"):
        model.save("never")
    with pytest.raises(InputError, match="trained already"):
        trained[0].train(synthetic_small[2])
    with pytest.raises(InputError, match="make_config"):
        sr.Model({"epochs": 1})


def test_a_named_backbone_sets_the_fields_the_config_leaves_at_the_preset():
    from stranker.model.backbones import named
    from stranker.tl._training import backbone_defaults

    spec = named("uni")
    got = backbone_defaults(make_config(backbone="uni"), [0.5])
    assert got.image_size == spec.input_px and got.patch_um == spec.patch_um
    assert got.chosen == {"backbone"}  # the defaults are not recorded as chosen
    # a value asked for is kept, also the preset's own (112)
    assert backbone_defaults(make_config(backbone="uni", image_size=112), [0.5]).image_size == 112
    cfg = make_config(backbone="h-optimus-0", image_size=448)  # a ViT of one input size
    assert backbone_defaults(make_config(backbone="h-optimus-0"), [0.5]).image_size == 224
    with pytest.raises(InputError, match="takes 224 px images only"):
        backbone_defaults(cfg, [0.5])


def test_the_run_record_is_typed_and_round_trips(trained, tmp_path):
    model, _ = trained
    meta = model.meta
    assert isinstance(meta, RunRecord)
    assert meta.sections == ["S0", "S1"] and meta.n_spots == 240 and meta.seed == 3
    assert meta.microns_per_pixel == pytest.approx(3.125) and meta.patch_um == pytest.approx(200.0)
    assert meta.device == "cpu" and meta.world_size == 1 and meta.fit_seconds > 0
    assert meta["device"] == meta.get("device") == "cpu"  # read by key, as the dict it replaces
    model.save(tmp_path / "m")
    loaded = sr.Model.load(tmp_path / "m")
    assert isinstance(loaded.meta, RunRecord) and loaded.meta.to_dict() == meta.to_dict()
    assert loaded.meta.target_mean.dtype == np.float32 and loaded.history == model.history
    saved = json.loads((tmp_path / "m" / "model.json").read_text())["meta"]
    assert saved == json.loads(json.dumps(meta.to_dict()))  # one JSON key per field


def _rewrite_meta(folder, meta):
    """Replace ``model.json``'s meta and store its new checksum, as a save by that version would."""
    info = json.loads((folder / "model.json").read_text())
    info["meta"] = meta
    text = json.dumps(info).encode()
    (folder / "model.json").write_bytes(text)
    blob = torch.load(folder / "model.pt", weights_only=True)
    blob["meta_sha256"] = hashlib.sha256(text).hexdigest()
    torch.save(blob, folder / "model.pt")


def test_a_model_saved_with_the_former_meta_dict_loads(trained, tmp_path):
    model, secs = trained
    model.save(tmp_path / "m")
    # the dict (and key order) fit wrote before the typed record, before microns_per_pixel was
    # recorded, and a key this version does not know
    old = {
        "genes_source": "heg", "target": "log1p(counts / total * 10000) over all genes of the table",
        "target_sum": 10000.0, "layer": None, "target_mean": model.meta.target_mean.tolist(),
        "target_std": model.meta.target_std.tolist(), "history": model.history, "sections": ["S0", "S1"],
        "n_spots": 240, "patch_px": 64.0, "patch_um": 200.0, "spot_diameter_px": 32.0,
        "spot_diameter_um": 100.0, "weights_source": "random", "device": "cpu", "seed": 3,
        "feature_dim": None, "features": None, "torch": torch.__version__, "train_seconds": 1.0,
        "streamed": False, "fit_seconds": 2.0, "from_the_future": {"x": 1},
    }
    _rewrite_meta(tmp_path / "m", old)
    loaded = sr.Model.load(tmp_path / "m")
    assert loaded.meta.weights_source == "random" and loaded.meta.sections == ["S0", "S1"]
    assert loaded.meta.microns_per_pixel is None and loaded.meta.world_size is None
    assert loaded.meta.extra == {"from_the_future": {"x": 1}}
    np.testing.assert_array_equal(loaded.predict(secs[0]), model.predict(secs[0]))
    loaded.save(tmp_path / "again")  # the unknown key is saved again
    assert json.loads((tmp_path / "again" / "model.json").read_text())["meta"]["from_the_future"] == {"x": 1}


def test_a_fit_on_features_records_the_sections_resolution(synthetic_small):
    # the record's microns_per_pixel was written only by fits on pixels
    secs = _copies(synthetic_small[:2])
    rng = np.random.default_rng(0)
    for s in secs:
        t = s.tables["table"]
        t.obsm["feat"] = rng.normal(size=(t.n_obs, 6)).astype(np.float32)
    model = sr.tl.fit(secs, image_features="feat", epochs=1, genes="heg", n_top_genes=5, seed=0)
    assert model.meta.microns_per_pixel == pytest.approx(3.125)


def test_a_train_that_fails_writing_leaves_model_and_data_as_they_were(synthetic_small, monkeypatch):
    from stranker.tl import _model

    secs = _copies(synthetic_small[:2])
    model = sr.Model(make_config("stranker", **NET), "heg", n_top_genes=8)

    def full_disk(sp, *args, **kwargs):
        if sp.name == "S1":  # after S0 was written
            raise OSError(28, "No space left on device")
        return real(sp, *args, **kwargs)

    real = _model.write_outputs
    monkeypatch.setattr(_model, "write_outputs", full_disk)
    with pytest.raises(OSError, match="No space"):
        model.train(secs, seed=0, key_added="stranker")
    assert not model.is_trained and model.aligner is None and model.genes == [] and model.bank == {}
    assert all(layer is None for layer in _layers(secs)) and "stranker" not in secs[0].tables["table"].uns


def test_a_training_of_five_steps_runs():
    # torch's OneCycleLR divided by zero when its warm-up (a fifth of the steps) was exactly one step
    from stranker.train import TrainData, train
    from tests._ddp_worker import tiny_aligner, tiny_data

    d = tiny_data()
    keep = slice(0, len(d.expr) - 1)  # 13, 11 and 8 spots: 2 + 2 + 1 batches of 8
    data = TrainData(images=d.images[keep], expr=d.expr[keep], pos=d.pos[keep], section=d.section[keep])
    hist = train(tiny_aligner(epochs=1, sharp_epochs=0), data, device=torch.device("cpu"), progress=False)
    assert [h["epoch"] for h in hist] == [1]
