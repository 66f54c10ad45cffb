"""Many sections: streamed training patches, frozen-backbone features reused by fit, grouped splits."""

import numpy as np
import pytest

import stranker as sr
from stranker._errors import InputError

FAST = dict(epochs=2, batch_size=16, patch_px=64, image_size=32, backbone="test_resnet", pretrained=False,
            genes="heg", n_top_genes=20)


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
    """Two small synthetic sections written to zarr and read back (lazy dask images)."""
    import spatialdata as sd

    d = tmp_path_factory.mktemp("zarr")
    paths = []
    for i, s in enumerate(sr.datasets.synthetic(n_sections=3, n_spots=48, n_genes=30, seed=2)):
        s.write(d / f"s{i}.zarr")
        paths.append(d / f"s{i}.zarr")
    return lambda: [sd.read_zarr(p) for p in paths]


def test_streamed_fit_equals_in_memory_fit(on_disk, monkeypatch):
    import dask.array as da

    from stranker.section import as_sections
    from stranker.spots import SpotInputs

    secs = on_disk()
    assert isinstance(as_sections(secs[0])[0].image.levels[0], da.Array)  # lazily read from disk
    mem = sr.tl.fit(secs[:2], seed=0, stream=False, **FAST)
    assert mem.meta["streamed"] is False

    def no_read_all(self, *a, **k):
        raise AssertionError("streaming must not read every patch at once")

    monkeypatch.setattr(SpotInputs, "all", no_read_all)
    monkeypatch.setattr(sr.settings, "num_workers", 1)  # patches read in a DataLoader worker process
    monkeypatch.setattr(sr.settings, "max_patch_memory", 1000)  # stream=None streams beyond the budget
    streamed = sr.tl.fit(on_disk()[:2], seed=0, **FAST)
    assert streamed.meta["streamed"] is True
    # same batches, same reads, same random draws: the same model
    assert [h["total"] for h in streamed.history] == pytest.approx(
        [h["total"] for h in mem.history], rel=1e-6
    )
    test = on_disk()[2]
    np.testing.assert_allclose(streamed.predict(test), mem.predict(test), atol=1e-5)


def test_embed_patches_once_then_fit_on_the_features(on_disk):
    import timm
    import torch

    secs = on_disk()
    net = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    sr.pp.embed_patches(secs, net, size=64, image_size=32, key_added="X_test", batch_size=20)
    t = secs[0].tables["table"]
    assert t.obsm["X_test"].shape == (t.n_obs, net.num_features) and t.obsm["X_test"].dtype == np.float32
    # the features are the frozen network on the spot patches (eval mode, ImageNet normalisation)
    p = sr.pp.patches(secs[0], size=64, out_px=32)[:5]
    x = torch.from_numpy(p).permute(0, 3, 1, 2).float() / 255
    mean, std = (
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
    )
    with torch.no_grad():
        ref = net.eval()((x - mean) / std).numpy()
    np.testing.assert_allclose(t.obsm["X_test"][:5], ref, rtol=1e-4, atol=1e-5)
    model = sr.tl.fit(secs[:2], seed=0, image_features="X_test", **dict(FAST, epochs=1))
    assert model.meta["feature_dim"] == net.num_features and model.meta["weights_source"] == "features"
    assert np.isfinite(model.predict(secs[2])).all()
    # a timm name; a fitted model's own backbone; bad input
    copy = sr.pp.embed_patches(secs[2], "test_resnet", pretrained=False, size=64, image_size=32, copy=True)
    assert (
        "X_test_resnet" in copy.tables["table"].obsm and "X_test_resnet" not in secs[2].tables["table"].obsm
    )
    with pytest.raises(InputError, match="trained on precomputed features"):
        sr.pp.embed_patches(secs[2], model)
    with pytest.raises(InputError, match="`backbone` must be"):
        sr.pp.embed_patches(secs[2], 3)


def test_split_sections_keeps_each_group_on_one_side():
    sections = [f"sec{i}" for i in range(12)]
    patients = ["A", "A", "A", "B", "B", "C", "C", "C", "D", "E", "E", "F"]
    seen_test = set()
    for seed in range(6):
        train, test = sr.pp.split_sections(sections, groups=patients, test_size=0.34, seed=seed)
        assert sorted(train + test) == sorted(sections)  # a partition
        g_train = {patients[sections.index(s)] for s in train}
        g_test = {patients[sections.index(s)] for s in test}
        assert not g_train & g_test  # no patient straddles the split
        assert len(g_test) == 2  # round(0.34 * 6 groups)
        assert train == [s for s in sections if s in train]  # input order kept
        seen_test.add(frozenset(g_test))
    assert len(seen_test) > 1  # the seed changes the draw...
    assert sr.pp.split_sections(sections, groups=patients, seed=3) == sr.pp.split_sections(
        sections, groups=patients, seed=3
    )  # ...and the same seed repeats it
    train, test = sr.pp.split_sections(sections, test_size=3)  # no groups: sections on their own
    assert len(test) == 3 and len(train) == 9
    with pytest.raises(InputError, match="one label per section"):
        sr.pp.split_sections(sections, groups=patients[:-1])
    with pytest.raises(InputError, match="at least 2 groups"):
        sr.pp.split_sections(sections, groups=["A"] * 12)
    with pytest.raises(InputError, match="between 1 and 5"):
        sr.pp.split_sections(sections, groups=patients, test_size=6)
