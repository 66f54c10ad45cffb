"""Options for another slide than the training slides: resolution jitter, per-section targets, adaptation."""

import numpy as np
import pytest
import torch

import stranker as sr
from stranker.model.adapt import adapt_norm, has_batchnorm
from stranker.model.augment import augment, degrade, random_crop
from stranker.tl._training import standardise

TINY = dict(backbone="test_resnet", pretrained=False, epochs=1, patch_px=64, image_size=32)


def test_degrade_blurs_some_images_and_keeps_shape():
    x = torch.rand(64, 1, 3, 32, 32)
    y = degrade(x, torch.Generator().manual_seed(0), 4.0)
    assert y.shape == x.shape
    changed = (y - x).abs().flatten(1).mean(1) > 1e-3
    assert 0 < int(changed.sum()) < 64  # the step 1 leaves an image as it is
    # a downsampled image has lost fine detail: less energy in neighbour differences
    assert (y[changed].diff(dim=-1).abs().mean() < x[changed].diff(dim=-1).abs().mean() * 0.8)
    assert degrade(x, torch.Generator().manual_seed(0), 1.0) is x


def test_degrade_keeps_the_asked_share_sharp_and_spreads_the_rest_over_the_steps():
    x = torch.rand(4000, 1, 3, 8, 8)
    for keep in (0.0, 0.5, 0.8):
        y = degrade(x, torch.Generator().manual_seed(1), 3.0, keep=keep)
        sharp = (y - x).abs().flatten(1).amax(1) < 1e-6
        assert abs(float(sharp.float().mean()) - keep) < 0.03
        blur = (y - x).abs().flatten(1).mean(1)[~sharp]
        # the lowered images are spread over steps, not all at one
        assert len(torch.unique(blur.round(decimals=2))) > 3
    assert torch.equal(degrade(x, torch.Generator().manual_seed(1), 3.0, keep=1.0), x)
    # keep=None: each of the five steps alike, one in five sharp
    y = degrade(x, torch.Generator().manual_seed(2), 3.0)
    assert abs(float(((y - x).abs().flatten(1).amax(1) < 1e-6).float().mean()) - 0.2) < 0.03
    # a process's rows are degraded as the whole batch's are
    whole = degrade(x[:16], torch.Generator().manual_seed(5), 3.0, keep=0.5)
    part = degrade(x[4:8], torch.Generator().manual_seed(5), 3.0, part=(4, 8, 16), keep=0.5)
    torch.testing.assert_close(part, whole[4:8])


def test_resolution_keep_out_of_range_is_refused():
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="resolution_keep"):
            sr.model.make_config(resolution_keep=bad)
    assert sr.model.make_config(resolution_keep=0.5).resolution_keep == 0.5


def test_augment_without_resolution_jitter_draws_as_before():
    x = torch.rand(8, 1, 3, 16, 16)
    a = augment(x, torch.Generator().manual_seed(3), strong=True)
    b = augment(x, torch.Generator().manual_seed(3), strong=True, resolution=1.0)
    assert torch.equal(a, b)


def test_random_crop_zooms_in_around_the_centre_and_splits_across_processes():
    # a patch whose pixels hold their own coordinate: a crop shows a narrower range, centre kept
    ramp = torch.linspace(0, 1, 32)
    x = torch.stack([ramp.expand(32, 32), ramp[:, None].expand(32, 32), torch.zeros(32, 32)])
    x = x.expand(16, 2, 3, 32, 32).contiguous()
    y = random_crop(x, torch.Generator().manual_seed(0), 0.4)
    assert y.shape == x.shape
    span = y[:, :, 0, 0, -1] - y[:, :, 0, 0, 0]  # range of x-coordinates seen along a row
    assert torch.all(span >= 0.6 - 0.05) and torch.all(span <= 1.0 + 1e-4) and span.min() < 0.9
    assert torch.equal(y[:, 0], y[:, 1])  # every scale of a sample is cropped alike
    centre = y[:, 0, :2, 15:17, 15:17].mean((-2, -1))
    assert torch.all((centre - 0.5).abs() < 0.4 / 2 + 0.05)  # the spot's centre stays inside
    part = random_crop(x[5:9], torch.Generator().manual_seed(0), 0.4, part=(5, 9, 16))
    torch.testing.assert_close(part, y[5:9])
    assert random_crop(x, torch.Generator(), 0.0) is x


def test_augment_without_crop_jitter_draws_as_before():
    x = torch.rand(8, 1, 3, 16, 16)
    a = augment(x, torch.Generator().manual_seed(3), strong=False, resolution=2.0)
    b = augment(x, torch.Generator().manual_seed(3), strong=False, resolution=2.0, crop=0.0)
    assert torch.equal(a, b)
    c = augment(x, torch.Generator().manual_seed(3), strong=False, resolution=2.0, crop=0.3)
    assert not torch.equal(a, c)


def test_crop_jitter_out_of_range_is_refused():
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="crop_jitter"):
            sr.model.make_config(crop_jitter=bad)


def test_resolution_jitter_out_of_range_is_refused():
    with pytest.raises(ValueError, match="resolution_jitter"):
        sr.model.make_config(resolution_jitter=0.5)


def test_section_targets_remove_each_sections_level():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (50, 3)), rng.normal(5, 3, (40, 3))
    y, mean, std = standardise([a, b], "section")
    ya, yb = y[:50], y[50:]
    np.testing.assert_allclose(ya.mean(0), yb.mean(0), atol=1e-5)  # same level in both sections
    np.testing.assert_allclose(ya.std(0), yb.std(0), rtol=1e-5)
    np.testing.assert_allclose((ya - ya.mean(0)) / ya.std(0), (a - a.mean(0)) / a.std(0), atol=1e-5)
    y2, m2, s2 = standardise([a, b], "pooled")
    np.testing.assert_allclose(y2, np.concatenate([a, b]))
    np.testing.assert_allclose(m2, y2.mean(0))


def test_adapt_norm_renews_batchnorm_statistics_only():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    x = torch.rand(16, 3, 8, 8) * 5 + 2
    out = adapt_norm(net, [x[:8], x[8:]])
    assert has_batchnorm(net)
    assert torch.equal(net[1].running_mean, torch.zeros(4))  # the original is untouched
    conv = net[0](x)
    np.testing.assert_allclose(out[1].running_mean.numpy(), conv.mean((0, 2, 3)).detach().numpy(), rtol=1e-4)
    assert torch.equal(out[0].weight, net[0].weight)
    assert not out.training
    with pytest.raises(ValueError, match="no batch-norm"):
        adapt_norm(torch.nn.Sequential(torch.nn.Linear(2, 2)), [torch.zeros(1, 2)])


def test_predict_with_adapt_changes_predictions_not_the_model():
    train, test = sr.datasets.synthetic(2, 40, n_genes=20, seed=0)
    model = sr.tl.fit(train, **TINY)
    before = {k: v.clone() for k, v in model.aligner.state_dict().items()}
    plain_table = sr.tl.predict(model, test, copy=True).tables["table"]
    adapted_table = sr.tl.predict(model, test, adapt=True, copy=True).tables["table"]
    plain, adapted = plain_table.layers["stranker"], adapted_table.layers["stranker"]
    assert plain_table.uns["stranker"]["adapt"] is False  # the record says which model predicted
    assert adapted_table.uns["stranker"]["adapt"] is True
    assert not np.allclose(plain, adapted)
    after = sr.tl.predict(model, test, copy=True).tables["table"].layers["stranker"]
    np.testing.assert_array_equal(after, plain)
    assert all(torch.equal(v, model.aligner.state_dict()[k]) for k, v in before.items())
    again = sr.tl.predict(model, test, adapt=True, copy=True).tables["table"].layers["stranker"]
    np.testing.assert_array_equal(again, adapted)  # deterministic


def test_predict_warns_when_a_slide_is_coarser_than_the_model_was_trained_on(stranker_log):
    train, test = sr.datasets.synthetic(2, 30, n_genes=10, seed=0)
    test.tables["table"].uns["microns_per_pixel"] *= 4  # the same pixels, read as a 4x coarser scan
    model = sr.tl.fit(train, **TINY, resolution_jitter=1.0)  # 64 px patches fed at 32 px; on the test 16 px
    sr.tl.predict(model, test, copy=True)
    assert any("coarser than any patch" in r.getMessage() for r in stranker_log.records)
    stranker_log.clear()
    model = sr.tl.fit(train, **TINY)  # the default resolution_jitter=3 covers 2x
    sr.tl.predict(model, test, copy=True)
    assert not any("coarser than any patch" in r.getMessage() for r in stranker_log.records)


def test_the_sharp_finish_keeps_the_jittered_teacher_as_the_coarse_branch():
    from stranker.train import train
    from tests._ddp_worker import tiny_aligner, tiny_data

    kw = dict(resolution_jitter=3.0, w_rank=0.0, w_distill=0.0)
    plain, finished = tiny_aligner(sharp_epochs=0, **kw), tiny_aligner(sharp_epochs=1, **kw)
    assert plain.coarse is None
    hist0 = train(plain, tiny_data(), device=torch.device("cpu"), seed=0, progress=False)
    hist1 = train(finished, tiny_data(), device=torch.device("cpu"), seed=0, progress=False)
    def curve(hist):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in hist]

    assert [h["epoch"] for h in hist1] == [1, 2, 3] and curve(hist1[:2]) == curve(hist0)  # the same 2 epochs
    state = finished.coarse.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in plain.teacher.state_dict().items())
    assert not all(torch.equal(v, state[k]) for k, v in finished.teacher.state_dict().items())
    # the gene branch, which the retrieval bank reads, is as the jittered training left it
    genes = finished.gene.state_dict()
    assert all(torch.equal(v, genes[k]) for k, v in plain.gene.state_dict().items())


def test_the_sharp_finish_is_off_where_nothing_is_jittered():
    from stranker.model import Aligner, make_config

    for opts in (dict(resolution_jitter=1.0), dict(image_features="X_uni")):
        al = Aligner(make_config(backbone="test_resnet", pretrained=False, **opts), 4, feature_dim=8)
        assert al.coarse is None
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="sharp_epochs"):
            make_config(sharp_epochs=bad)
    assert sr.model.Config.from_dict({"epochs": 20}).sharp_epochs == 0  # models saved before it: none


def test_predict_reads_a_coarser_slide_with_the_coarse_branch():
    from spatialdata import deepcopy

    train, test = sr.datasets.synthetic(2, 30, n_genes=10, seed=0)
    coarse = deepcopy(test)
    coarse.tables["table"].uns["microns_per_pixel"] *= 4  # 64 px patches fed at 32 px; here 16 px: 2x coarser
    model = sr.tl.fit(train, **TINY, sharp_epochs=1)
    tables = [sr.tl.predict(model, s, copy=True).tables["table"] for s in (test, coarse)]
    assert [t.uns["stranker"]["resampling"]["branch"] for t in tables] == ["sharp", "coarse"]
    assert tables[1].uns["stranker"]["resampling"]["coarser"] == pytest.approx(2.0)
    # the coarse slide's predictions are the coarse branch's: replacing its weights changes them alone
    model.aligner.coarse.load_state_dict(model.aligner.teacher.state_dict())
    again = [sr.tl.predict(model, s, copy=True).tables["table"].layers["stranker"] for s in (test, coarse)]
    np.testing.assert_array_equal(again[0], tables[0].layers["stranker"])
    assert not np.allclose(again[1], tables[1].layers["stranker"])
