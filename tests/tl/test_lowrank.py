"""Predictions projected onto the principal axes of the training targets (``predict_rank``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stranker as sr
from stranker.model import make_config
from stranker.model.lowrank import expression_axes, noise_threshold, project

TINY = dict(backbone="test_resnet", pretrained=False, epochs=1, patch_px=64, image_size=32, sharp_epochs=0)


def low_rank(n, g, rank, noise, seed=0):
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, g)) * 3
    return signal + 2.0, signal + 2.0 + noise * rng.normal(size=(n, g))


@pytest.mark.parametrize("n, g", [(400, 60), (40, 300)])
def test_auto_finds_the_rank_of_a_noisy_low_rank_matrix(n, g):
    _, noisy = low_rank(n, g, 4, 1.0)
    center, axes = expression_axes(noisy, "auto")
    assert axes.shape == (g, 4) and center.shape == (g,)
    np.testing.assert_allclose(axes.T @ axes, np.eye(4), atol=1e-4)
    # the same axes as an SVD of the centred matrix, whichever Gram matrix they came from
    vt = np.linalg.svd(noisy - noisy.mean(0), full_matrices=False)[2][:4]
    np.testing.assert_allclose(np.abs(vt @ axes), np.eye(4), atol=1e-3)
    assert expression_axes(noisy, 2)[1].shape == (g, 2)
    _, pure_noise = low_rank(n, g, 1, 50.0)  # signal far below the noise: one axis is the least kept
    assert expression_axes(pure_noise, "auto")[1].shape[1] <= 2


def test_axes_are_the_same_when_the_gram_matrix_is_built_in_blocks(monkeypatch):
    import stranker.model.lowrank as lowrank

    _, noisy = low_rank(300, 40, 3, 1.0)
    whole = expression_axes(noisy.astype(np.float32), "auto")
    monkeypatch.setattr(lowrank, "_CHUNK", 64)  # 300 spots in 5 blocks
    blocks = expression_axes(noisy.astype(np.float32), "auto")
    np.testing.assert_allclose(blocks[0], whole[0], atol=1e-6)
    np.testing.assert_allclose(np.abs(blocks[1].T @ whole[1]), np.eye(3), atol=1e-5)


def test_noise_threshold_matches_gavish_donoho_for_a_square_matrix():
    assert noise_threshold(np.array([1.0, 2.0, 3.0]), (50, 50)) == pytest.approx(2.86 * 2.0)


def test_projection_keeps_the_span_and_removes_what_lies_outside():
    clean, noisy = low_rank(300, 50, 3, 0.0)
    center, axes = (torch.from_numpy(a) for a in expression_axes(noisy, 3))
    x = torch.from_numpy(clean).float()
    torch.testing.assert_close(project(x, center, axes), x, atol=1e-3, rtol=1e-4)  # already in the span
    off = torch.randn(300, 50)
    once = project(x + off, center, axes)
    torch.testing.assert_close(project(once, center, axes), once, atol=1e-3, rtol=1e-4)
    assert (once - x).norm() < 0.35 * off.norm()  # 3 of 50 directions of the noise are left: sqrt(3/50)


def test_projection_raises_the_per_gene_correlation_of_noisy_predictions():
    rng = np.random.default_rng(1)
    loadings = rng.normal(size=(3, 80))  # three programmes over 80 genes, shared by training and test spots
    train = rng.normal(size=(500, 3)) @ loadings + rng.normal(size=(500, 80))
    test = rng.normal(size=(200, 3)) @ loadings
    pred = test + 2.0 * rng.normal(size=test.shape)  # a prediction with noise in every direction
    center, axes = (torch.from_numpy(a) for a in expression_axes(train, "auto"))
    assert axes.shape[1] == 3

    def mean_r(p):
        p, t = p - p.mean(0), test - test.mean(0)
        return float(((p * t).sum(0) / np.sqrt((p**2).sum(0) * (t**2).sum(0))).mean())

    projected = project(torch.from_numpy(pred).float(), center, axes).numpy()
    assert mean_r(projected) > mean_r(pred) + 0.05


def test_predict_rank_is_validated_and_off_in_presets_and_old_models():
    for bad in (-1, 2.5, "all", True):
        with pytest.raises(ValueError, match="predict_rank"):
            make_config(predict_rank=bad)
    assert make_config().predict_rank == "auto" and make_config(predict_rank=8).predict_rank == 8
    for method in ("stnet", "bleep", "mclstexp", "rankbygene"):
        assert make_config(method).predict_rank == 0
    assert sr.model.Config.from_dict({"epochs": 20}).predict_rank == 0  # saved before it: not projected


def test_predictions_lie_on_the_axes_the_model_reports(tmp_path):
    train, test = sr.datasets.synthetic(2, 30, n_genes=10, seed=0)
    model = sr.tl.fit(train, **TINY, predict_rank=2)
    assert model.expression_rank == 2
    pred = model.predict(test)
    centred = pred - model._axes()[0]
    assert np.linalg.matrix_rank(centred, tol=1e-4 * np.abs(centred).max()) == 2
    table = sr.tl.predict(model, test, copy=True).tables["table"]
    assert table.uns["stranker"]["expression_rank"] == 2
    model.save(tmp_path / "m")
    again = sr.Model.load(tmp_path / "m")
    np.testing.assert_allclose(again.predict(test), pred, rtol=1e-5, atol=1e-5)
    # the same weights unprojected: full rank, and nothing recorded
    again.config.predict_rank = 0
    free = again.predict(test)
    assert again.expression_rank is None
    assert np.linalg.matrix_rank(free - free.mean(0), tol=1e-4 * np.abs(free).max()) > 2
    # projecting the unprojected predictions gives the model's
    center, axes = (torch.from_numpy(a) for a in model._axes())
    np.testing.assert_allclose(project(torch.from_numpy(free), center, axes).numpy(), pred, atol=1e-4)


def test_the_axes_follow_the_bank_and_the_rank():
    model = sr.Model(make_config(predict_rank=2))
    first, second = low_rank(100, 20, 2, 0.1, seed=3)[1], low_rank(100, 20, 2, 0.1, seed=4)[1]
    model.bank = {"values": first.astype(np.float32)}
    a = model._axes()
    assert a[1].shape == (20, 2) and model._axes() is a  # kept, not recomputed
    model.bank = {"values": second.astype(np.float32)}  # trained again: new targets, new axes
    np.testing.assert_allclose(model._axes()[0], second.mean(0), atol=1e-5)
    model.config.predict_rank = 3
    assert model._axes()[1].shape == (20, 3)
    model.config.predict_rank = 0
    assert model._axes() is None
