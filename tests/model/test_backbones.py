"""Backbones: the registry, weights from a file / the Hugging Face cache / an error, never silent random."""

import json
import logging

import numpy as np
import pytest

import stranker as sr
from stranker.model import backbones as bb

TINY = dict(epochs=1, batch_size=32, genes="heg", n_top_genes=10, tta=False)
REPO = "stranker-test/tiny-vit"
MEAN, STD = (0.6, 0.5, 0.7), (0.2, 0.25, 0.15)




@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache (hub layout) holding a tiny timm ViT under ``hf-hub:stranker-test/tiny-vit``."""
    import timm
    import torch
    from safetensors.torch import save_file

    cache = tmp_path / "hub"
    root = cache / f"models--{REPO.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    (root / "blobs").mkdir()
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    torch.manual_seed(1)
    net = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
    save_file(net.state_dict(), str(snap / "model.safetensors"))
    (snap / "config.json").write_text(json.dumps({
        "architecture": "test_vit", "num_classes": 0, "model_args": {"img_size": 32},
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": list(MEAN), "std": list(STD)},
    }))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return net


@pytest.fixture
def section(synthetic_small):
    from spatialdata import deepcopy

    s = deepcopy(synthetic_small[0])
    s.tables["table"].uns["microns_per_pixel"] = 1.0
    return s


@pytest.mark.parametrize("name", sorted(bb.REGISTRY))
def test_every_registry_entry_builds_with_its_feature_size(name):
    # the table's timm arguments build the architecture (on the meta device: no memory, no weights)
    import torch

    spec = bb.REGISTRY[name]
    with torch.device("meta"):
        net = bb.build(spec)
        out = net(torch.empty(2, 3, spec.input_px, spec.input_px))
    assert net.num_features == spec.dim and tuple(out.shape) == (2, spec.dim)
    assert tuple(net.pretrained_cfg["mean"]) == spec.mean and tuple(net.pretrained_cfg["std"]) == spec.std
    assert spec.patch_um == pytest.approx(224 * 0.5)  # all trained on 224 px at 0.5 µm/px
    assert bb.lookup(f"hf-hub:{spec.repo}") is spec and bb.lookup(name.upper()) is spec


def test_backbones_table():
    t = sr.tl.backbones()
    assert {"uni", "uni2-h", "h-optimus-0", "h-optimus-1", "virchow2", "gigapath", "resnet50",
            "densenet121"} <= set(t.index)
    assert t.loc["uni", "repo"] == "MahmoodLab/UNI" and t.loc["virchow2", "feature_dim"] == 2560
    assert not t.loc["phikon", "gated"] and t.loc["uni", "gated"]  # an open model needs no licence click
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "backbones.md").read_text()
    for name, row in t.iterrows():  # the documented table is the registry
        assert f"| `{name}` | {row['repo']}" in doc, name


def test_hf_hub_model_loads_offline_from_the_cache(hub_cache):
    import torch

    net, source = bb.create_backbone(f"hf-hub:{REPO}")
    assert source == f"hf:{REPO}@0123456789abcdef0123456789abcdef01234567"  # the commit read
    for (k, a), b in zip(net.state_dict().items(), hub_cache.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert tuple(net.pretrained_cfg["mean"]) == MEAN  # the repository's normalisation


@pytest.mark.parametrize("download", [False, True])
def test_uncached_gated_model_offline_says_how_to_get_it(hub_cache, download):
    # offline (HF_HUB_OFFLINE=1), or downloads off: one error naming the repository and every remedy
    with pytest.raises(bb.WeightsNotFoundError) as err:
        bb.create_backbone("uni", download=download)
    msg = str(err.value)
    for part in ("'MahmoodLab/UNI'", "https://huggingface.co/MahmoodLab/UNI", "hf auth login",
                 "`weights=`", "pretrained=False", "HF_HUB_OFFLINE" if download else "allow_download"):
        assert part in msg, part
    net, source = bb.create_backbone("resnet50", pretrained=False)  # random init only when asked
    assert source == "random" and net.num_features == 2048


def test_fit_never_trains_on_random_weights_unless_asked(section, stranker_log, hub_cache):
    # before: a backbone without cached weights trained from random initialisation without a word
    before = set(section.tables["table"].obsm) | set(section.tables["table"].layers)
    with pytest.raises(bb.WeightsNotFoundError, match="timm/test_resnet"):
        sr.tl.fit(section, backbone="test_resnet", patch_px=64, image_size=32, **TINY)
    assert set(section.tables["table"].obsm) | set(section.tables["table"].layers) == before
    # asked: trains, says so once, and the model shows where its weights came from
    model = sr.tl.fit(section, backbone="test_resnet", pretrained=False, patch_px=64, image_size=32, **TINY)
    warned = [r for r in stranker_log.records
              if r.levelno == logging.WARNING and "randomly initialised" in r.message]
    assert len(warned) == 1
    assert "weights='random'" in repr(model)


def test_fit_on_a_cached_hub_model_uses_its_size_and_scale(section, hub_cache, monkeypatch, stranker_log,
                                                             tmp_path):
    # a registry entry: its input size and physical patch size are the defaults; frozen by default
    import torch

    entry = bb.Backbone("tiny", REPO, "test_vit", dict(img_size=32), input_px=32, mpp=2.0, mean=MEAN, std=STD,
                        dim=64)
    monkeypatch.setitem(bb.REGISTRY, "tiny", entry)
    model = sr.tl.fit(section, backbone="tiny", **TINY)
    assert model.config.image_size == 32 and model.config.patch_um == pytest.approx(64.0)
    assert model.meta["weights_source"].startswith(f"hf:{REPO}@") and "weights='hf:" in repr(model)
    assert not any("randomly" in r.message for r in stranker_log.records)
    student = model.aligner.student
    assert not any(p.requires_grad for p in student.backbone.parameters())  # frozen by default
    for a, b in zip(student.backbone.state_dict().values(), hub_cache.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b)  # untouched by training
    torch.testing.assert_close(student.pix_mean.flatten(), torch.tensor(MEAN))
    assert model.aligner.teacher.backbone is student.backbone  # a frozen foundation model is held once
    # a saved model holds the backbone: it loads without the cache
    model.save(tmp_path / "m")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    again = sr.Model.load(tmp_path / "m")
    np.testing.assert_allclose(again.predict(section), model.predict(section), rtol=1e-5, atol=1e-5)


def test_embed_patches_then_fit_records_where_features_came_from(section, hub_cache):
    sr.pp.embed_patches(section, f"hf-hub:{REPO}", size=64, batch_size=50)
    t = section.tables["table"]
    assert t.obsm["X_tiny-vit"].shape == (t.n_obs, 64)
    rec = t.uns["X_tiny-vit"]
    assert rec["backbone"] == f"hf-hub:{REPO}" and rec["weights_source"].startswith(f"hf:{REPO}@")
    assert rec["patch_px"] == 64 and rec["patch_um"] == 64 and rec["image_size"] == 32
    assert rec["mean"] == pytest.approx(MEAN)
    model = sr.tl.fit(section, image_features="X_tiny-vit", **TINY)
    assert model.meta["features"]["weights_source"] == rec["weights_source"]


def test_weights_file_must_fill_the_backbone(tmp_path, stranker_log):
    # before: a file matching one tensor of the backbone was accepted silently
    import timm
    import torch

    state = timm.create_model("test_resnet", pretrained=False, num_classes=0).state_dict()
    few = {"conv1.0.weight": state["conv1.0.weight"], "other.weight": torch.zeros(3)}
    torch.save(few, tmp_path / "few.pth")
    with pytest.raises(ValueError, match=r"fills only .*missing: .*unexpected: other\.weight"):
        bb.create_backbone("test_resnet", weights=str(tmp_path / "few.pth"))
    del state["layer4.0.conv1.weight"]
    torch.save(state, tmp_path / "most.pth")
    net, source = bb.create_backbone("test_resnet", weights=str(tmp_path / "most.pth"))
    assert source == "file:most.pth"
    assert any("layer4.0.conv1.weight" in r.message and r.levelno == logging.WARNING
               for r in stranker_log.records)


def test_freeze_last_blocks_only():
    from stranker.model.encoders import ImageBranch

    br = ImageBranch(4, backbone="test_resnet", pretrained=False, freeze="last:1")
    grads = {n.split(".")[0] for n, p in br.backbone.named_parameters() if p.requires_grad}
    assert grads == {"layer4"} and not br.frozen
    full = ImageBranch(4, backbone="test_resnet", pretrained=False, freeze=True).train()
    assert full.frozen and not full.backbone.training  # its batch-norm statistics stay too
    with pytest.raises(ValueError, match="'last:N'"):
        ImageBranch(4, backbone="test_resnet", pretrained=False, freeze="some")
    from stranker.model import make_config

    with pytest.raises(ValueError, match="`freeze` must be"):  # checked before any work in fit
        make_config(freeze="last")


def test_embed_patches_leaves_the_users_module_where_it_was(section):
    # before: the module was moved to the embedding device and left there
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 4)

        def forward(self, x):
            return torch.zeros(len(x), 4)

    net = Net().train()
    moves = []  # where it is sent (the meta device stands for a GPU here; nothing is copied)
    net.to = lambda device: moves.append(torch.device(device)) or net
    sr.pp.embed_patches(section, net, size=32, image_size=16, device="meta")
    assert moves[0].type == "meta" and moves[-1].type == "cpu" and net.training
    assert section.tables["table"].obsm["X_net"].shape == (section.tables["table"].n_obs, 4)
