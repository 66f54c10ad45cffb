"""The pure-torch model core: losses, retrieval, stain statistics, augmentation."""

import numpy as np
import pytest
import torch

from stranker.model import losses, make_config, retrieve
from stranker.model.augment import augment, dihedral
from stranker.model.stain import N_STAIN, rgb_to_hed, stain_features


def test_info_nce_prefers_true_pairs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 16, generator=g)
    aligned = losses.info_nce(a, a + 0.05 * torch.randn(32, 16, generator=g), 0.1)
    shuffled = losses.info_nce(a, a[torch.randperm(32, generator=g)], 0.1)
    assert aligned < 0.1 < shuffled


@pytest.mark.parametrize("mode", ["listwise", "pairwise"])
def test_rank_consistency_rewards_matching_orders(mode):
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(24, 30, generator=g)
    same = losses.rank_consistency(ref.clone(), ref, mode=mode)
    other = losses.rank_consistency(torch.randn(24, 30, generator=g), ref, mode=mode)
    assert same < other
    if mode == "listwise":
        assert same.abs() < 1e-5
    img = torch.randn(24, 30, generator=g, requires_grad=True)
    losses.rank_consistency(img, ref, mode=mode).backward()
    assert img.grad.abs().sum() > 0


def test_rank_consistency_rejects_unknown_mode():
    with pytest.raises(ValueError, match="listwise"):
        losses.rank_consistency(torch.randn(5, 3), torch.randn(5, 3), mode="x")


def test_retrieval_returns_exact_neighbours_and_is_chunk_invariant():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(100, 8, generator=g)
    values = torch.randn(100, 5, generator=g)
    out = retrieve(keys[:10], keys, values, k=1)
    torch.testing.assert_close(out, values[:10])
    q = torch.randn(37, 8, generator=g)
    torch.testing.assert_close(
        retrieve(q, keys, values, k=7, chunk=5), retrieve(q, keys, values, k=7, chunk=4096)
    )


def test_stain_features_match_scikit_image():
    from skimage.color import rgb2hed

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255
    ours = rgb_to_hed(x).permute(0, 2, 3, 1).numpy()
    ref = np.stack([rgb2hed(i) for i in img]).clip(min=0)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    f = stain_features(x)
    assert f.shape == (2, N_STAIN) and torch.isfinite(f).all()
    np.testing.assert_allclose(f[:, :3].numpy(), x.mean((2, 3)).numpy(), atol=1e-6)


def test_dihedral_group_and_augment_shapes():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    views = {tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(views) == 8
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(6, 2, 3, 8, 8)
    for strong in (False, True):
        out = augment(imgs, g, strong)
        assert out.shape == imgs.shape and out.min() >= 0 and out.max() <= 1


def test_make_config_validates():
    with pytest.raises(ValueError, match="Unknown model option"):
        make_config(foo=1)
    with pytest.raises(ValueError, match="`predict` must be"):
        make_config(predict="x")
    assert make_config("bleep").predict == "retrieval"
    assert make_config(scales=2).scales == (2.0,)
