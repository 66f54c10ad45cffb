"""What stranker promises about the files it reads and writes: checkpoints that cannot run code and resume
only their own fit, one fit per checkpoint folder, models saved whole and checked on load, the caller's
random state kept, and `stranker fit` refusing a bad `--out` / `--nproc` before any work.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import stranker as sr
from tests._ddp_worker import tiny_aligner, tiny_data

CPU = torch.device("cpu")


def _train(folder, data=None, resume=False, identity=None, **cfg):
    from stranker.train import train

    al = tiny_aligner(**cfg)
    kw = {} if identity is None else {"identity": identity}
    hist = train(al, tiny_data() if data is None else data, device=CPU, seed=0, checkpoint_dir=folder,
                 resume=resume, progress=False, **kw)
    return al, hist


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class _Payload:
    """Pickles to a call of ``open(marker, 'w')``: loading it without ``weights_only`` creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ------------------------------------------------------------------ checkpoints
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, synthetic_small):
    from spatialdata import deepcopy

    folder, marker = tmp_path / "ckpt", tmp_path / "pwned"
    folder.mkdir()
    torch.save({"aligner": _Payload(marker), "epoch": 1}, folder / "last.pt")
    before = _snapshot(folder)
    secs = [deepcopy(s) for s in synthetic_small[:1]]
    with pytest.raises(ValueError, match="could run code"):
        sr.tl.fit(secs, epochs=1, batch_size=32, patch_px=64, image_size=32, backbone="test_resnet",
                  pretrained=False, n_top_genes=10, genes="heg", checkpoint_dir=str(folder), resume=True)
    assert not marker.exists()  # the payload never ran
    assert _snapshot(folder) == before  # nor was the folder touched
    assert "stranker" not in secs[0].tables["table"].layers


def test_checkpoint_loads_without_pickle_and_leaves_only_itself(tmp_path):
    _train(tmp_path / "c")
    assert sorted(os.listdir(tmp_path / "c")) == ["last.pt"]  # no lock, no temporary file left
    state = torch.load(tmp_path / "c" / "last.pt", weights_only=True)
    assert state["epoch"] == 3 and state["identity"]["config"]["epochs"] == 2  # and 1 sharp epoch
    assert state["identity"]["config"]["sharp_epochs"] == 1


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(epochs=3), r"`epochs` 2 in the checkpoint, 3 now"),
        (dict(batch_size=16), r"`batch_size` 8 in the checkpoint, 16 now"),
        (dict(data="expr"), r"training data differ \(same shapes"),
        (dict(data="spots"), r"spots per section: \[13, 11, 9\] in the checkpoint, \[13, 11, 8\] now"),
        (dict(identity={"genes": ["G0", "G1", "G2", "G3", "G4", "X"]}), r"only in the checkpoint: \['G5'\]"),
    ],
)
def test_resume_refuses_a_checkpoint_of_another_fit(tmp_path, change, match):
    from stranker.train import TrainData

    genes = {"genes": [f"G{i}" for i in range(6)]} if "identity" in change else None
    _train(tmp_path / "c", identity=genes)
    before = _snapshot(tmp_path / "c")
    data, change = tiny_data(), dict(change)
    what = change.pop("data", None)
    if what == "expr":
        data.expr = data.expr.flip(0)
    elif what == "spots":
        keep = slice(0, len(data.expr) - 1)
        data = TrainData(images=data.images[keep], expr=data.expr[keep], pos=data.pos[keep],
                         section=data.section[keep])
    identity = change.pop("identity", genes)
    with pytest.raises(ValueError, match=match) as err:
        _train(tmp_path / "c", data=data, resume=True, identity=identity, **change)
    assert "resume=False" in str(err.value)  # the way to start afresh is named
    assert _snapshot(tmp_path / "c") == before
    # which is what it says: the same call without resume trains afresh over the old checkpoint
    _, hist = _train(tmp_path / "c", data=data, identity=identity, **change)
    assert hist[-1]["epoch"] == change.get("epochs", 2) + 1  # and the sharp epoch


def test_resume_with_other_genes_is_refused_by_fit(tmp_path, synthetic_small):
    from spatialdata import deepcopy

    kw = dict(epochs=1, batch_size=32, patch_px=64, image_size=32, backbone="test_resnet", pretrained=False,
              checkpoint_dir=str(tmp_path / "c"))
    names = list(synthetic_small[0].tables["table"].var_names)
    sr.tl.fit([deepcopy(synthetic_small[0])], genes=names[:5], **kw)
    secs = [deepcopy(synthetic_small[0])]
    with pytest.raises(ValueError, match="the genes differ"):
        sr.tl.fit(secs, genes=names[1:6], resume=True, **kw)
    assert "stranker" not in secs[0].tables["table"].layers


def test_a_checkpoint_of_patches_in_memory_resumes_streamed(tmp_path, synthetic_small):
    from spatialdata import deepcopy

    kw = dict(epochs=1, batch_size=32, patch_px=64, image_size=32, backbone="test_resnet", pretrained=False,
              n_top_genes=10, genes="heg", checkpoint_dir=str(tmp_path / "c"))
    a = sr.tl.fit([deepcopy(synthetic_small[0])], stream=False, **kw)
    b = sr.tl.fit([deepcopy(synthetic_small[0])], stream=True, resume=True, **kw)  # the same fit
    assert b.history == a.history and torch.equal(_weights(b), _weights(a))


def test_two_fits_cannot_share_a_checkpoint_folder(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    other = {"pid": os.getppid(), "host": socket.gethostname(), "started": "2026-01-01 00:00:00"}
    (folder / "fit.lock").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=rf"Another fit \(process {os.getppid()} on .*fit\.lock"):
        _train(folder)
    assert sorted(os.listdir(folder)) == ["fit.lock"]
    # a lock whose process has ended is taken over
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True)
    (folder / "fit.lock").write_text(json.dumps(dict(other, pid=int(done.stdout))))
    _train(folder)
    assert sorted(os.listdir(folder)) == ["last.pt"]


def test_a_fit_that_fails_leaves_no_checkpoint_folder(tmp_path, monkeypatch):
    import stranker.train.loop as loop

    def failing(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "batches", failing)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "new")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("kw", "match"),
    [(dict(checkpoint_every=0), "`checkpoint_every` must be at least 1"),
     (dict(checkpoint_dir="file"), "is a file")],
)
def test_checkpoint_arguments_are_checked_before_training(tmp_path, kw, match):
    from stranker.train import train

    (tmp_path / "file").write_text("x")
    kw = dict(dict(checkpoint_dir=tmp_path / "c"), **kw)
    if kw["checkpoint_dir"] == "file":
        kw["checkpoint_dir"] = tmp_path / "file"
    with pytest.raises(ValueError, match=match):
        train(tiny_aligner(), tiny_data(), device=CPU, progress=False, **kw)
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_fit_restores_the_global_random_state(tmp_path, synthetic_small):
    from spatialdata import deepcopy

    from stranker.train import train

    al = tiny_aligner()
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    train(al, tiny_data(), device=CPU, seed=0, checkpoint_dir=tmp_path / "c", progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    sr.tl.fit([deepcopy(synthetic_small[0])], epochs=1, batch_size=32, patch_px=64, image_size=32,
              backbone="test_resnet", pretrained=False, n_top_genes=10, genes="heg", seed=5)
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------ Model.save / Model.load
def _model(genes=("A", "B", "C"), seed=0):
    from stranker.model import Aligner, make_config

    cfg = make_config(backbone="test_resnet", pretrained=False, image_size=16, embed_dim=8, gene_hidden=8)
    torch.manual_seed(seed)
    al = Aligner(cfg, len(genes))
    meta = {"target_mean": np.zeros(len(genes), np.float32), "target_std": np.ones(len(genes), np.float32),
            "patch_px": 64.0}
    bank = {"keys": np.zeros((2, 8), np.float32), "values": np.zeros((2, len(genes)), np.float32)}
    return sr.Model(cfg, list(genes), aligner=al, meta=meta, bank=bank)


def _weights(model):
    return torch.cat([t.flatten() for t in model.aligner.state_dict().values() if t.is_floating_point()])


def test_a_save_that_fails_leaves_the_saved_model(tmp_path, monkeypatch):
    old, new = _model(seed=0), _model(genes=("X", "Y", "Z"), seed=1)
    old.save(tmp_path / "m")
    before = _snapshot(tmp_path / "m")
    real = torch.save

    def disk_full(*args, **kwargs):  # writes, then fails (as a full disk would, part-way)
        real(*args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        new.save(tmp_path / "m", overwrite=True)
    with pytest.raises(OSError, match="No space"):
        new.save(tmp_path / "x" / "y" / "m")
    monkeypatch.setattr(torch, "save", real)
    assert _snapshot(tmp_path / "m") == before
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary folder left
    assert sr.Model.load(tmp_path / "m").genes == ["A", "B", "C"]
    new.save(tmp_path / "m", overwrite=True)
    loaded = sr.Model.load(tmp_path / "m")
    assert loaded.genes == ["X", "Y", "Z"] and torch.equal(_weights(loaded), _weights(new))
    assert sorted(os.listdir(tmp_path)) == ["m"]


@pytest.mark.parametrize(
    "files", [{"model.json": "{}"}, {"model.json": "{}", "notes.txt": "mine"}, {"a": "b"}]
)
def test_save_never_replaces_a_foreign_folder(tmp_path, files):
    (tmp_path / "m").mkdir()
    for name, text in files.items():
        (tmp_path / "m" / name).write_text(text)
    before = _snapshot(tmp_path / "m")
    only_json = list(files) == ["model.json"]
    with pytest.raises(FileExistsError, match="overwrite" if only_json else "not a saved"):
        _model().save(tmp_path / "m")
    if not only_json:  # other files: not even with overwrite=True
        with pytest.raises(FileExistsError, match="not a saved stranker model"):
            _model().save(tmp_path / "m", overwrite=True)
    assert _snapshot(tmp_path / "m") == before
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        _model().save(tmp_path / "f", overwrite=True)


@pytest.mark.parametrize("edit", ["genes", "patch_px"])
def test_a_hand_edited_model_json_is_refused(tmp_path, edit):
    _model().save(tmp_path / "m")
    info = json.loads((tmp_path / "m" / "model.json").read_text())
    if edit == "genes":
        info["genes"] = ["C", "B", "A"]
    else:
        info["config"]["patch_px"] = 112.0
    (tmp_path / "m" / "model.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="edited or replaced after saving"):
        sr.Model.load(tmp_path / "m")


def test_a_model_saved_without_checksum_loads_with_a_warning(tmp_path, stranker_log):
    _model().save(tmp_path / "m")
    blob = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    del blob["meta_sha256"]  # as saved by stranker before the checksum
    torch.save(blob, tmp_path / "m" / "model.pt")
    assert sr.Model.load(tmp_path / "m").genes == ["A", "B", "C"]
    assert "without a checksum" in stranker_log.text


def test_a_truncated_model_file_is_refused_clearly(tmp_path):
    _model().save(tmp_path / "m")
    data = (tmp_path / "m" / "model.pt").read_bytes()
    (tmp_path / "m" / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or not a stranker model"):
        sr.Model.load(tmp_path / "m")


def test_a_model_file_that_would_run_code_is_refused(tmp_path):
    _model().save(tmp_path / "m")
    marker = tmp_path / "pwned"
    torch.save({"state_dict": _Payload(marker)}, tmp_path / "m" / "model.pt")
    with pytest.raises(ValueError, match="could run code"):
        sr.Model.load(tmp_path / "m")
    assert not marker.exists()


def test_two_saves_to_one_path_give_one_whole_model(tmp_path, monkeypatch):
    # another process saves its model into the same path while this one is writing: the folder then
    # holds one whole model (this one with overwrite=True; the other one without), never a mix
    a, b = _model(("A", "B", "C"), seed=0), _model(("X", "Y", "Z"), seed=1)
    real, fired = os.rename, []

    def racing(src, dst):
        if not fired and Path(dst).resolve() == (tmp_path / "m").resolve():
            fired.append(True)
            b.save(tmp_path / "m", overwrite=True)
        return real(src, dst)

    monkeypatch.setattr(os, "rename", racing)
    with pytest.raises(FileExistsError, match="holds a saved model"):
        a.save(tmp_path / "m")
    assert fired and sr.Model.load(tmp_path / "m").genes == ["X", "Y", "Z"]
    fired.clear()
    a.save(tmp_path / "m", overwrite=True)
    assert fired and sr.Model.load(tmp_path / "m").genes == ["A", "B", "C"]
    assert sorted(os.listdir(tmp_path)) == ["m"]


# ------------------------------------------------------------------ stranker fit
def _cli(args, capsys, monkeypatch):
    from stranker import _cli

    def no_fit(*a, **k):
        raise AssertionError("the fit ran")

    monkeypatch.setattr(sr.tl, "fit", no_fit)
    rc = _cli.main(args)
    return rc, capsys.readouterr().err


def test_fit_command_checks_out_before_fitting(tmp_path, capsys, monkeypatch):
    (tmp_path / "f").write_text("x")
    rc, err = _cli(["fit", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "f")], capsys, monkeypatch)
    assert rc == 2 and "not a folder" in err and (tmp_path / "f").read_text() == "x"
    _model().save(tmp_path / "m")
    rc, err = _cli(["fit", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "m")], capsys, monkeypatch)
    assert rc == 2 and "--overwrite" in err


@pytest.mark.parametrize("flag", [["--nproc", "0"], ["--nproc", "-2"], ["--num-workers", "-1"]])
def test_fit_command_refuses_a_count_below_one(tmp_path, capsys, monkeypatch, flag):
    with pytest.raises(SystemExit) as ex:
        _cli(["fit", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "m"), *flag], capsys, monkeypatch)
    assert ex.value.code == 2
    assert f"{flag[0]}: must be at least" in capsys.readouterr().err


def test_saving_through_a_link_replaces_the_folder_it_points_to(tmp_path):
    _model(("A", "B", "C")).save(tmp_path / "m")
    (tmp_path / "link").symlink_to(tmp_path / "m")
    _model(("X", "Y", "Z"), seed=1).save(tmp_path / "link", overwrite=True)
    assert (tmp_path / "link").is_symlink() and sr.Model.load(tmp_path / "m").genes == ["X", "Y", "Z"]
    assert sorted(os.listdir(tmp_path)) == ["link", "m"]
