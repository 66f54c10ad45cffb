"""Weights that are silently empty, wrong or NaN, and the foundation-model path: refused, with the remedy.

No test uses the network: Hugging Face cache folders and torch hub files are built in a temp dir.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import stranker as sr
from stranker._errors import InputError
from stranker.model import backbones as bb

from ..conftest import make_sdata

TINY = dict(epochs=1, batch_size=8, patch_px=32, image_size=32, backbone="test_resnet", seed=0,
            pretrained=False, genes=["G0", "G1", "G2", "G3", "G4"])
REPO = "stranker-test/tiny-vit"
MAIN, TAGGED = "a" * 40, "b" * 40  # the commits of the main branch and of tag v1


def _section(n=16, seed=0):
    return make_sdata(n=n, seed=seed)[0]


def _state(sdata):
    t = sdata.tables["table"]
    return (sorted(sdata.tables), sorted(t.layers), sorted(t.obsm), sorted(t.uns), np.asarray(t.X.sum()))


@pytest.fixture(scope="module")
def model():
    return sr.tl.fit(_section(), **TINY)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


@pytest.fixture
def two_revisions(offline_cache):
    """A hub cache holding ``REPO`` at two commits: ``main`` and tag ``v1`` (refs/ and snapshots/ layout)."""
    import timm
    from safetensors.torch import save_file

    root = offline_cache / f"models--{REPO.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    nets = {}
    for ref, commit, seed in (("main", MAIN, 1), ("v1", TAGGED, 2)):
        snap = root / "snapshots" / commit
        snap.mkdir(parents=True)
        (root / "refs" / ref).write_text(commit)
        torch.manual_seed(seed)
        nets[commit] = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
        save_file(nets[commit].state_dict(), str(snap / "model.safetensors"))
        (snap / "config.json").write_text(json.dumps({
            "architecture": "test_vit", "num_classes": 0, "model_args": {"img_size": 32},
            "pretrained_cfg": {"input_size": [3, 32, 32]},
        }))
    return nets


def _same(a, b):
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


# ------------------------------------------------------------------ 1. a fit that takes no step
def test_batch_size_of_one_is_refused_before_any_data_is_read():
    # before: every batch of one spot was dropped, so fit returned random heads and an empty history
    sdata = _section()
    before = _state(sdata)
    with pytest.raises(ValueError, match="`batch_size` must be at least 2"):
        sr.tl.fit(sdata, **{**TINY, "batch_size": 1})
    assert _state(sdata) == before


def test_training_without_an_optimisation_step_is_refused():
    # before: sections of one spot each gave no batch; train returned a history of no loss
    from stranker.model import Aligner, make_config
    from stranker.train import TrainData, train

    cfg = make_config(backbone="test_resnet", pretrained=False, image_size=16, epochs=1, batch_size=4,
                      embed_dim=8, gene_hidden=8)
    data = TrainData(images=torch.zeros(3, 1, 16, 16, 3, dtype=torch.uint8), expr=torch.randn(3, 4),
                     pos=torch.rand(3, 2), section=torch.arange(3))
    with pytest.raises(ValueError, match=r"no optimisation step.*sections of 1, 1, 1 spot"):
        train(Aligner(cfg, 4), data, device=torch.device("cpu"), progress=False)


# ------------------------------------------------------------------ 2. NaN weights, NaN predictions
def test_training_that_diverges_stops_with_an_error_naming_lr():
    # before: a FloatingPointError at the end of the epoch, which is no ValueError (the CLI's errors)
    sdata = _section()
    before = _state(sdata)
    with pytest.raises(ValueError, match=r"Training diverged: the loss became nan.*Lower `lr`") as err:
        sr.tl.fit(sdata, **{**TINY, "lr": 1e8})
    from stranker.train.loop import TrainingDiverged

    assert isinstance(err.value, TrainingDiverged) and isinstance(err.value, FloatingPointError)
    assert _state(sdata) == before


def _poisoned(model):
    """A copy of ``model`` whose weights are NaN (as a diverged training leaves them)."""
    import copy

    bad = copy.copy(model)
    bad.aligner = copy.deepcopy(model.aligner)
    with torch.no_grad():
        for p in bad.aligner.parameters():
            p.fill_(float("nan"))
    return bad


def test_a_model_with_nan_weights_neither_predicts_nor_saves(model, tmp_path):
    # before: predict wrote an all-NaN layer listing every gene as written; save kept the NaN weights
    bad = _poisoned(model)
    sdata = _section(seed=3)
    before = _state(sdata)
    with pytest.raises(InputError, match=r"NaN or infinite values .*weights hold NaN.*nothing was written"):
        sr.tl.predict(bad, sdata)
    assert _state(sdata) == before
    with pytest.raises(InputError, match="NaN or infinite"):
        bad.predict(sdata)
    with pytest.raises(InputError, match="Refusing to save the model: its weights hold NaN"):
        bad.save(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_saved_model_with_nan_weights_is_not_loaded(model, tmp_path):
    # before: model.pt with NaN weights (its checksum covers model.json only) loaded, then predicted NaN
    model.save(tmp_path / "m")
    blob = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    first = next(k for k, v in blob["state_dict"].items() if v.is_floating_point())
    blob["state_dict"][first] = torch.full_like(blob["state_dict"][first], float("inf"))
    torch.save(blob, tmp_path / "m" / "model.pt")
    with pytest.raises(InputError, match=rf"Refusing to load .*NaN or infinite values .*{first}"):
        sr.Model.load(tmp_path / "m")


def test_a_weights_file_with_nan_is_refused(tmp_path):
    import timm

    state = timm.create_model("test_resnet", pretrained=False, num_classes=0).state_dict()
    state["conv1.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"NaN or infinite values in 1 tensor\(s\) \(conv1\.0\.weight\)"):
        bb.create_backbone("test_resnet", weights=str(tmp_path / "w.pth"))


# ------------------------------------------------------------------ 3. hf-hub:ORG/NAME@REV
def test_a_hub_revision_is_read_and_its_commit_recorded(two_revisions):
    # before: '@v1' was dropped, the main branch's weights were loaded, and the record said 'hf:ORG/NAME'
    for rev in ("v1", TAGGED):
        net, source = bb.create_backbone(f"hf-hub:{REPO}@{rev}")
        assert source == f"hf:{REPO}@{TAGGED}" and _same(net, two_revisions[TAGGED])
    net, source = bb.create_backbone(f"hf-hub:{REPO}")
    assert source == f"hf:{REPO}@{MAIN}" and _same(net, two_revisions[MAIN])
    with pytest.raises(bb.WeightsNotFoundError, match=r"at revision 'v2'.*--revision v2"):
        bb.create_backbone(f"hf-hub:{REPO}@v2")
    # a registry repository at a revision keeps its entry, at that revision
    assert bb.lookup("hf-hub:MahmoodLab/UNI@v0").revision == "v0" and bb.lookup("uni").revision is None


def test_a_fit_records_the_commit_of_the_revision_it_read(two_revisions, tmp_path):
    model = sr.tl.fit(_section(), **{**TINY, "backbone": f"hf-hub:{REPO}@v1", "pretrained": True})
    assert model.meta.weights_source == f"hf:{REPO}@{TAGGED}"
    assert model.config.backbone == f"hf-hub:{REPO}@v1"
    model.save(tmp_path / "m")  # the saved model builds its architecture from that revision's config
    assert sr.Model.load(tmp_path / "m").meta.weights_source == f"hf:{REPO}@{TAGGED}"


# ------------------------------------------------------------------ 4. the hub cannot be reached
def test_an_unreachable_hub_is_said_so_with_the_remedies(offline_cache, monkeypatch):
    # before: "Repository 'MahmoodLab/UNI' holds none of [...]" after trying every file name
    import importlib

    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []
    connect_error = ConnectionError  # the client's own (httpx2 in huggingface_hub 2, httpx before)
    for client in ("httpx2", "httpx"):
        try:
            connect_error = importlib.import_module(client).ConnectError
            break
        except ImportError:
            continue

    def no_network(repo, filename, *, local_files_only=False, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache.")
        calls.append(filename)
        try:  # what huggingface_hub raises when its HEAD call cannot connect
            raise connect_error("[Errno -3] Temporary failure in name resolution")
        except connect_error as err:
            raise LocalEntryNotFoundError(
                "An error happened while trying to locate the file on the Hub and we cannot find the "
                "requested files in the local cache."
            ) from err

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(bb.WeightsNotFoundError) as err:
        bb.create_backbone("uni", download=True)
    msg = str(err.value)
    assert "holds none of" not in msg and calls == ["model.safetensors"]  # no retry of the other names
    for part in ("the Hugging Face hub could not be reached", connect_error.__name__, "hf auth login",
                 "https://huggingface.co/MahmoodLab/UNI", "hf download MahmoodLab/UNI", "`weights=`"):
        assert part in msg, part


# ------------------------------------------------------------------ 5. the remedy: hf, login only where gated
def test_the_remedy_names_the_installed_cli_and_a_login_only_for_gated_repositories(offline_cache):
    # before: `huggingface-cli login` for every repository, gated or not
    import huggingface_hub

    msgs = {}
    for name in ("uni", "resnet50"):
        with pytest.raises(bb.WeightsNotFoundError) as err:
            bb.find_weights(bb.resolve(name), None, True, download=False)
        msgs[name] = str(err.value)
    assert "accept its licence on https://huggingface.co/MahmoodLab/UNI" in msgs["uni"]
    assert "`hf auth login`" in msgs["uni"] and "`hf download MahmoodLab/UNI`" in msgs["uni"]
    ungated = msgs["resnet50"]
    assert "`hf download timm/resnet50.tv_in1k`" in ungated and "no login needed" in ungated
    assert "auth login" not in ungated and "licence" not in ungated
    assert not any("huggingface-cli" in m for m in msgs.values())
    with pytest.raises(bb.WeightsNotFoundError, match="if the repository is gated"):  # unknown: conditional
        bb.resolve("hf-hub:some-org/some-model")
    major, minor = (int(v) for v in huggingface_hub.__version__.split(".")[:2])
    assert (major, minor) >= (0, 34)  # the installed client ships `hf` (hf auth login, hf download)
    assert bb.hub_commands() == ("hf auth login", "hf download")


def test_the_registry_gating_is_the_documented_one():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "backbones.md").read_text()
    for name, spec in bb.REGISTRY.items():
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{name}` |"))
        assert row.split("|")[-2].strip().startswith("yes" if spec.gated else "no"), name


# ------------------------------------------------------------------ 6. resnet50: the documented weights only
def test_resnet50_takes_only_its_documented_weights_from_torch_hub(offline_cache, tmp_path, monkeypatch):
    # before: with the hub cache empty, timm's default resnet50 weights (a1_in1k) were loaded as 'resnet50'
    import timm

    hub = tmp_path / "torch_hub"
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    other = Path(timm.models.get_pretrained_cfg("resnet50.a1_in1k").url).name
    documented = Path(timm.models.get_pretrained_cfg("resnet50.tv_in1k").url).name
    (hub / "checkpoints" / other).write_bytes(b"not these")
    spec = bb.REGISTRY["resnet50"]
    with pytest.raises(bb.WeightsNotFoundError, match="timm/resnet50.tv_in1k"):
        bb.find_weights(spec, None, True, download=False)
    (hub / "checkpoints" / documented).write_bytes(b"these")
    path, source = bb.find_weights(spec, None, True, download=False)
    assert Path(path).name == documented and source == f"torch-hub-cache:{documented}"


# ------------------------------------------------------------------ 7. one image_size check for fit and embed
def test_a_fixed_input_vit_refuses_another_image_size_in_embed_and_fit(monkeypatch):
    # before: embed_patches failed inside timm (an AssertionError on the input height)
    entry = bb.Backbone("tiny-fixed", None, "test_vit", dict(img_size=32, dynamic_img_size=False),
                        input_px=32, mpp=None, dim=64)
    monkeypatch.setitem(bb.REGISTRY, "tiny-fixed", entry)
    sdata = _section()
    before = _state(sdata)
    with pytest.raises(InputError, match=r"'tiny-fixed' takes 32 px images only; got `image_size=16`"):
        sr.pp.embed_patches(sdata, "tiny-fixed", pretrained=False, size=32, image_size=16)
    with pytest.raises(InputError, match=r"'tiny-fixed' takes 32 px images only; got `image_size=16`"):
        sr.tl.fit(sdata, **{**TINY, "backbone": "tiny-fixed", "image_size": 16})
    assert _state(sdata) == before
    sr.pp.embed_patches(sdata, "tiny-fixed", pretrained=False, size=32)  # its own size: embeds
    assert sdata.tables["table"].obsm["X_tiny-fixed"].shape[1] == 64
    # a timm name outside the registry is checked too (fit's default image_size is 112)
    with pytest.raises(InputError, match="takes 224 px images only; got `image_size=112`"):
        sr.tl.fit(_section(), **{**TINY, "backbone": "deit_tiny_patch16_224", "image_size": 112})


# ------------------------------------------------------------------ 8. documented scales and licences
def test_docs_say_virchow2_is_mixed_magnification_and_phikon_non_commercial():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "backbones.md").read_text()
    assert "mixed magnifications" in doc and "non-commercial" in doc
    assert "huggingface-cli login" not in doc.split("older versions")[0]
    assert "mixed magnifications" in bb.REGISTRY["virchow2"].note
    phikon = bb.REGISTRY["phikon"].note
    assert "non-commercial" in phikon and "open" not in phikon


# ------------------------------------------------------------------ 9. errors that said nothing useful
def test_adapt_on_a_one_spot_section_is_refused_and_no_batch_holds_one_patch(model):
    # before: torch's "Expected more than 1 value per channel when training"
    one = _section(n=1, seed=4)
    before = _state(one)
    with pytest.raises(InputError, match="has 1 spot.*fewer than 2: predict it with adapt=False"):
        sr.tl.predict(model, one, adapt=True)
    assert _state(one) == before
    # 5 spots in batches of 4 once left a batch of one patch: now 3 + 2
    from stranker.section import as_sections

    five = as_sections(_section(n=5, seed=5))[0]
    emb, pred = model.infer(five, adapt=True, batch_size=4)
    assert np.isfinite(pred).all() and pred.shape == (5, 5)


def test_an_unknown_timm_tag_lists_the_tags():
    # before: timm's RuntimeError "Invalid pretrained tag (not_a_tag) for resnet18."
    with pytest.raises(ValueError, match=r"no pretrained tag 'not_a_tag' for 'resnet18'.*'tv_in1k'"):
        bb.resolve("resnet18.not_a_tag")
    sdata = _section()
    with pytest.raises(ValueError, match="no pretrained tag 'not_a_tag'"):
        sr.tl.fit(sdata, **{**TINY, "backbone": "resnet18.not_a_tag"})


def test_embed_slides_refuses_a_slide_id_with_two_rows_of_obs(model):
    # before: the repeated row was joined twice, and the call failed after embedding every slide
    import pandas as pd

    slides = [_section(seed=6), _section(seed=7)]
    for sid, s in zip(("a", "b"), slides, strict=True):
        s.attrs["slide_id"] = sid
    obs = pd.DataFrame({"grade": [1, 2, 3]}, index=["a", "a", "b"])
    with pytest.raises(InputError, match=r"`obs` has more than one row for slide id\(s\) \['a'\]"):
        sr.tl.embed_slides(model, slides, obs=obs)


def _rewrite(folder, edit):
    info = json.loads((folder / "model.json").read_text())
    edit(info)
    text = json.dumps(info).encode()
    (folder / "model.json").write_bytes(text)
    blob = torch.load(folder / "model.pt", weights_only=True)
    blob["meta_sha256"] = hashlib.sha256(text).hexdigest()
    torch.save(blob, folder / "model.pt")


def test_a_model_folder_lacking_what_predicting_needs_names_its_writer(model, tmp_path):
    # before: a model.json without meta raised KeyError('meta'); without target_mean it loaded and
    # failed at the first prediction
    model.save(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "model.json").read_text())

    def old(info):  # as a stranker before the run record and the version record would have written it
        info.pop("stranker_version", None)
        for k in ("target_mean", "target_std"):
            del info["meta"][k]

    _rewrite(tmp_path / "m", old)
    with pytest.raises(InputError, match=r"written by a stranker older than 0\.1\.0 .*meta\['target_mean'\]"):
        sr.Model.load(tmp_path / "m")
    def older(info):  # a version that recorded itself, before a run record
        del info["meta"]
        info["stranker_version"] = "0.0.9"

    _rewrite(tmp_path / "m", older)
    with pytest.raises(InputError, match=r"written by stranker 0\.0\.9 .*model\.json: 'meta'.*Fit and save"):
        sr.Model.load(tmp_path / "m")
    assert saved["stranker_version"] == sr.__version__  # a model saved now records its writer
