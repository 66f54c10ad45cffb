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


def test_gene_correlation_is_blind_to_level_and_scale_and_scores_order():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(40, 12, generator=g)
    # each gene rescaled and shifted on its own: still a perfect prediction
    assert losses.gene_correlation(t * torch.rand(12, generator=g) * 5 + 3, t) < 1e-5
    assert abs(float(losses.gene_correlation(-t, t)) - 2.0) < 1e-5
    noise = losses.gene_correlation(torch.randn(40, 12, generator=g), t)
    assert 0.7 < noise < 1.3
    p = torch.randn(40, 12, generator=g, requires_grad=True)
    losses.gene_correlation(p, t).backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # a gene constant in the batch counts as r = 0, without NaN
    t[:, 0] = 1.0
    assert torch.isfinite(losses.gene_correlation(p.detach(), t))


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
    # a prediction path whose branch no loss trains is refused, not computed from random weights
    with pytest.raises(ValueError, match="untrained embeddings.*predict='head'"):
        make_config(w_clip=0.0)
    with pytest.raises(ValueError, match="untrained.*predict='retrieval'"):
        make_config(w_regression=0.0)
    assert make_config(w_clip=0.0, predict="head").w_clip == 0.0
    assert make_config(w_regression=0.0, predict="retrieval").predict == "retrieval"
    # so is a configuration built by hand, before any training
    import stranker as sr
    from stranker.model import Config

    with pytest.raises(ValueError, match="untrained embeddings"):
        sr.Model(Config(w_clip=0.0))
    assert make_config(scales=2).scales == (2.0,)
    for w in ("w_regression", "w_corr", "w_clip", "w_rank", "w_distill"):
        with pytest.raises(ValueError, match=f"`{w}` must be a number >= 0"):
            make_config(**{w: -0.1, "predict": "head" if w == "w_clip" else "blend"})
        with pytest.raises(ValueError, match=f"`{w}`"):
            make_config(**{w: float("nan")})


# --------------------------------------------------------------------------------------------
# stain shift: HED jitter and Reinhard normalisation
# --------------------------------------------------------------------------------------------
def test_colour_conversions_match_scikit_image_and_invert():
    from skimage.color import rgb2lab

    from stranker.model.stain import hed_to_rgb, lab_to_rgb, rgb_to_lab

    rng = np.random.default_rng(1)
    img = rng.integers(1, 256, (2, 12, 12, 3), dtype=np.uint8)
    x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255
    lab = rgb_to_lab(x)
    ref = np.stack([rgb2lab(i) for i in img])
    np.testing.assert_allclose(lab.permute(0, 2, 3, 1).numpy(), ref, atol=2e-3)
    np.testing.assert_allclose(lab_to_rgb(lab).numpy(), x.numpy(), atol=1e-4)
    np.testing.assert_allclose(hed_to_rgb(rgb_to_hed(x, clamp=False)).numpy(), x.numpy(), atol=1e-4)


def test_hed_jitter_scales_and_shifts_each_stain_channel_within_sigma():
    from stranker.model.augment import hed_jitter

    g = torch.Generator().manual_seed(0)
    x = 0.2 + 0.3 * torch.rand(16, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    sigma = 0.02
    out = hed_jitter(x, g, sigma)
    assert out.shape == x.shape and not torch.allclose(out, x)
    assert 0 < out.min() and out.max() < 1  # nothing clipped: the map is exactly affine in HED
    h_in, h_out = rgb_to_hed(x, clamp=False).double(), rgb_to_hed(out, clamp=False).double()
    for i in range(len(x)):
        for c in range(3):
            a = h_in[i, c].flatten()
            slope, icpt = np.polyfit(a.numpy(), h_out[i, c].flatten().numpy(), 1)
            assert 1 - sigma - 1e-4 <= slope <= 1 + sigma + 1e-4 and abs(icpt) <= sigma + 1e-4
    # per-sample draws, and a process's rows are those of the whole batch (distributed training)
    assert not torch.allclose(out[0] - x[0], out[1] - x[1])
    whole = hed_jitter(x, torch.Generator().manual_seed(5), sigma)
    part = hed_jitter(x[4:9], torch.Generator().manual_seed(5), sigma, part=(4, 9, 16))
    torch.testing.assert_close(part, whole[4:9])


def test_augment_without_hed_draws_as_before():
    """hed=0 takes no random draws, so default fits reproduce the earlier augmentation exactly."""
    x = torch.rand(6, 1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = augment(x, torch.Generator().manual_seed(3), True)
    b = augment(x, torch.Generator().manual_seed(3), True, hed=0.0)
    torch.testing.assert_close(a, b)
    c = augment(x, torch.Generator().manual_seed(3), True, hed=0.05)
    assert not torch.allclose(a, c)


def test_reinhard_sets_tissue_statistics_and_ignores_black_background():
    from stranker.model.stain import REINHARD_TARGET, reinhard, rgb_to_lab

    g = torch.Generator().manual_seed(0)
    base = torch.tensor([0.55, 0.45, 0.7]).view(1, 3, 1, 1)
    tissue = (base + 0.08 * torch.randn(2, 3, 16, 16, generator=g)).clamp(0.2, 0.9)
    out = rgb_to_lab(reinhard(tissue))
    np.testing.assert_allclose(out.mean((2, 3)).numpy(), np.tile(REINHARD_TARGET[0], (2, 1)), atol=1.5)
    np.testing.assert_allclose(out.std((2, 3), unbiased=False).numpy(), np.tile(REINHARD_TARGET[1], (2, 1)),
                               rtol=0.15)
    # a blacked-out band (as on her2st A1) does not change how the tissue pixels are mapped
    framed = tissue.clone()
    framed[:, :, :, :4] = 0.0
    np.testing.assert_allclose(reinhard(framed)[:, :, :, 4:].numpy(),
                               reinhard(tissue[:, :, :, 4:]).numpy(), atol=1e-4)


def test_make_config_validates_stain_options():
    with pytest.raises(ValueError, match="`stain_norm` must be None or 'reinhard'"):
        make_config(stain_norm="macenko")
    with pytest.raises(ValueError, match="`hed_jitter`"):
        make_config(hed_jitter=-0.1)
    c = make_config()
    assert c.stain_norm is None and c.hed_jitter == 0.0
    assert make_config(stain_norm="reinhard", hed_jitter=0.02).to_dict()["stain_norm"] == "reinhard"


def test_image_branch_normalises_before_the_backbone():
    """With stain_norm='reinhard', two patches that differ only by a colour cast embed alike."""
    from stranker.model.encoders import ImageBranch

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = (torch.tensor([0.55, 0.45, 0.7]).view(1, 1, 3, 1, 1)
         + 0.1 * torch.randn(2, 1, 3, 16, 16, generator=g)).clamp(0.1, 0.95)
    cast = (x * torch.tensor([0.9, 0.8, 1.0]).view(1, 1, 3, 1, 1)).clamp(0, 1)
    gap = {}
    for norm in (None, "reinhard"):
        torch.manual_seed(0)
        br = ImageBranch(5, backbone="test_resnet", pretrained=False, use_stain=False, stain_norm=norm).eval()
        with torch.no_grad():
            gap[norm] = (br(x)[0] - br(cast)[0]).norm() / br(x)[0].norm()
    assert gap["reinhard"] < 0.5 * gap[None]  # 1.0 if the option were not wired through


def test_a_saved_configuration_without_a_newer_field_reads_as_trained_then():
    from stranker.model import Config

    today = make_config().to_dict()
    old = {k: v for k, v in today.items()
           if k not in ("resolution_jitter", "crop_jitter", "hed_jitter", "w_corr", "w_consistency")}
    cfg = Config.from_dict(old)
    # a model saved before resolution jitter existed was trained on sharp patches only: predict's
    # warning about coarser slides must use 1, not today's default of 3
    assert cfg.resolution_jitter == 1.0 and cfg.w_corr == 0.0 and cfg.w_consistency == 0.0
    assert cfg.crop_jitter == 0.0 and cfg.hed_jitter == 0.0
    assert Config.from_dict(today) == make_config()  # a configuration saved today reads back as it was


def test_a_configuration_records_the_fields_the_user_set_through_a_saved_model():
    import json
    from dataclasses import replace

    from stranker.model import Config
    from stranker.model.config import validate

    cfg = make_config("bleep", backbone="uni", image_size=112, patch_um=None)  # None: not set
    assert cfg.chosen == {"backbone", "image_size"} and cfg.chosen_fields() == cfg.chosen
    assert make_config().chosen == frozenset()
    # model.json carries the configuration: the record survives a JSON round trip, as a sorted list
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["chosen"] == ["backbone", "image_size"]
    back = Config.from_dict(d)
    assert back == cfg and back.chosen == cfg.chosen and isinstance(back.chosen, frozenset)
    # derived configurations keep it; it is no part of equality (how a configuration came about)
    assert replace(cfg, image_size=224).chosen == cfg.chosen
    assert replace(cfg, chosen=None) == cfg
    # saved before the record existed: unknown, and the fields off the preset count as chosen
    old = Config.from_dict({k: v for k, v in d.items() if k != "chosen"})
    assert old.chosen is None and old == cfg
    assert old.chosen_fields() == {"backbone"}  # 112 is the preset's: not seen as chosen
    assert Config(backbone="uni").chosen is None  # built by hand: unknown likewise
    assert Config(backbone="uni").chosen_fields() == {"backbone"}
    with pytest.raises(ValueError, match="`chosen` must name fields"):
        validate(Config(chosen={"image_sise"}))
    with pytest.raises(ValueError, match="Unknown model option"):
        make_config(chosen={"image_size"})


def test_presets_keep_their_published_loss_terms_whatever_the_default():
    from stranker.model import Aligner

    want = {
        "stnet": ["regression"], "bleep": ["clip"], "mclstexp": ["clip"],
        "rankbygene": ["regression", "clip", "rank", "distill"],
        "stranker": ["regression", "corr", "clip"],
    }
    for method, terms in want.items():
        cfg = make_config(method, backbone="test_resnet", pretrained=False)
        assert Aligner(cfg, 4).loss_terms() == terms, method
