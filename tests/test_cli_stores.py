"""Stores and paths: stranker replaces only what it wrote, keeps the rest, and says why it cannot write.

``stranker predict --out`` replaces only a store that stranker wrote there; in place, it adds its own
keys and elements and leaves every other file of the store as it was; ``stranker fit`` checks that its
``--out`` can be written before it trains; a full disk, a read-only store, a key zarr refuses, an
interrupted write and two models under one key are named, with nothing changed; ``~`` is expanded.
"""

import copy
import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import stranker as sr
from stranker._cli import main
from stranker._errors import InputError

from .conftest import make_sdata

TINY = dict(epochs=1, sharp_epochs=0, batch_size=8, patch_px=32, image_size=32, backbone="test_resnet",
            seed=0, pretrained=False, genes=["G0", "G1", "G2", "G3", "G4"])
OWN = ("tables/table/layers/stranker", "tables/table/obsm/X_stranker", "tables/table/uns/stranker")


@pytest.fixture(scope="module")
def fitted():
    """A tiny model, and the section it was fitted on (holding its in-sample predictions)."""
    sdata = make_sdata(n=16, seed=0)[0]
    return sr.tl.fit(sdata, **TINY), sdata


@pytest.fixture(scope="module")
def model(fitted):
    return fitted[0]


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m"
    model.save(path)
    return str(path)


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "in.zarr"
    make_sdata(n=16, seed=1)[0].write(path)
    return path


def _tree(path):
    """sha256 of every file under ``path`` (a file: itself)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path) if p != path else p.name): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def _no_predict(monkeypatch):
    """Make a call that reaches prediction fail the test (refusals come before any work)."""
    def predict(*args, **kwargs):
        raise AssertionError("predicted: the refusal should come first")

    monkeypatch.setattr(sr.tl, "predict", predict)


def _temps(folder):
    return sorted(p.name for p in Path(folder).iterdir() if ".writing-" in p.name or ".replaced-" in p.name)


# --------------------------------------------------------------------------------------------
# 1. --out --overwrite replaces only a store stranker wrote there
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("case", "match"), [
    ("the input's folder", "holds the input store"),
    ("inside the input", "lies inside the input store"),
    ("a folder of documents", "stranker did not write"),
    ("a plain file", "stranker did not write"),
    ("a group of another store", "stranker did not write"),
])
def test_out_overwrite_never_replaces_what_stranker_did_not_write(saved, store, tmp_path, monkeypatch, capsys,
                                                                   case, match):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    (tmp_path / "notes.txt").write_text("mine")
    make_sdata(n=4, seed=3)[0].write(tmp_path / "other.zarr")
    out = {"the input's folder": tmp_path, "inside the input": store / "tables" / "p.zarr",
           "a folder of documents": docs, "a plain file": tmp_path / "notes.txt",
           "a group of another store": tmp_path / "other.zarr" / "tables"}[case]
    before = _tree(tmp_path)
    _no_predict(monkeypatch)
    assert main(["predict", saved, str(store), "--out", str(out), "--overwrite"]) == 2
    assert match in capsys.readouterr().err
    assert _tree(tmp_path) == before


def test_out_overwrite_replaces_a_store_stranker_wrote_there_and_nothing_else(saved, store, tmp_path, capsys):
    import spatialdata as sd

    out = tmp_path / "p.zarr"
    assert main(["predict", saved, str(store), "--out", str(out)]) == 0
    mark = sd.read_zarr(out).attrs["stranker_store"]
    assert mark["path"] == str(out) and "tables/table" in mark["elements"]
    assert main(["predict", saved, str(store), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["predict", saved, str(store), "--out", str(out), "--overwrite"]) == 0  # its own: replaced
    assert "stranker" in sd.read_zarr(out)["table"].layers
    shutil.copytree(out, tmp_path / "copy.zarr")  # a copy elsewhere records another path: not stranker's
    (out / "README.md").write_text("my notes on these predictions")  # something of the user's now in it
    for target in (out, tmp_path / "copy.zarr"):
        before = _tree(target)
        assert main(["predict", saved, str(store), "--out", str(target), "--overwrite"]) == 2
        assert re.search("(never|not) replaced", capsys.readouterr().err)
        assert _tree(target) == before
    assert _temps(tmp_path) == []


# --------------------------------------------------------------------------------------------
# 2. in place: stranker's keys and elements only; every other file of the store unchanged
# --------------------------------------------------------------------------------------------
def test_in_place_predict_keeps_every_file_it_did_not_write(saved, store):
    import spatialdata as sd

    (store / "README.md").write_text("how this store was made")
    (store / "analysis").mkdir()
    (store / "analysis" / "clusters.csv").write_text("spot,cluster\ns0,1\n")
    before = _tree(store)
    for _ in range(2):  # the second run replaces the first's keys
        assert main(["predict", saved, str(store)]) == 0
        after = _tree(store)
        kept = {k: v for k, v in after.items() if not k.startswith(OWN) and k != "zarr.json"}
        assert kept == {k: v for k, v in before.items() if k != "zarr.json"}  # byte-identical
    table = sd.read_zarr(store)["table"]
    assert "stranker" in table.layers and "X_stranker" in table.obsm and "counts" in table.layers
    assert list(table.uns["stranker"]["genes"]) == TINY["genes"]
    assert _temps(store.parent) == []


def test_in_place_write_adds_new_elements_beside_the_users(model, tmp_path):
    # an image-only slide: the tiles and their table are new elements, the image's files untouched
    import spatialdata as sd
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    from stranker.write import store as stores

    tissue = np.random.default_rng(0).integers(60, 200, (3, 128, 128), dtype=np.uint8)
    path = tmp_path / "slide.zarr"
    SpatialData(images={"he": Image2DModel.parse(tissue, dims=("c", "y", "x"))}).write(path)
    before = _tree(path)
    written = [["shapes", "tables"], ["shapes/stranker_tiles", "tables/stranker_table"]]
    for expected in written:  # the second run replaces the elements the first added
        sdata = sd.read_zarr(path)
        state = stores.element_state(sdata)
        sr.tl.predict(model, sdata, tile_px=16)
        assert sorted(stores.write_in_place(sdata, path, state)) == expected
    after = _tree(path)
    assert {k: v for k, v in after.items() if k.startswith("images/")} == {
        k: v for k, v in before.items() if k.startswith("images/")}
    back = sd.read_zarr(path)
    assert set(back.shapes) == {"stranker_tiles"} and "stranker" in back["stranker_table"].layers


def test_in_place_write_adds_and_drops_columns_of_obs_and_var_one_by_one(store):
    # predict writes reliability columns into var and a difficulty column into obs, and drops those
    # of an earlier call that this one does not write: column by column, the user's columns untouched
    import spatialdata as sd

    from stranker.write import store as stores

    before = _tree(store)
    sdata = sd.read_zarr(store)
    state = stores.element_state(sdata)
    t = sdata.tables["table"]
    t.obs["stranker_difficulty"] = np.linspace(0, 1, t.n_obs, dtype=np.float32)
    t.var["stranker_reliable"] = np.arange(t.n_vars) % 2 == 0
    t.layers["stranker_lower"] = np.zeros(t.shape, np.float32)
    assert sorted(stores.write_in_place(sdata, store, state)) == [
        "tables/table/layers/stranker_lower", "tables/table/obs/stranker_difficulty",
        "tables/table/obs/zarr.json", "tables/table/var/stranker_reliable", "tables/table/var/zarr.json"]
    back = sd.read_zarr(store)["table"]
    np.testing.assert_allclose(back.obs["stranker_difficulty"], t.obs["stranker_difficulty"])
    assert back.var["stranker_reliable"].tolist() == [True, False, True, False, True]
    assert list(back.obs.columns) == ["spot_id", "region", "stranker_difficulty"]
    changed = {k for k, v in _tree(store).items() if before.get(k) != v}
    assert changed == {k for k in _tree(store) if k.startswith(("tables/table/obs/stranker_difficulty",
                       "tables/table/var/stranker_reliable", "tables/table/layers/stranker_lower"))} | {
        "zarr.json", "tables/table/obs/zarr.json", "tables/table/var/zarr.json"}
    sdata = sd.read_zarr(store)  # a later call that writes none of them: they go
    state = stores.element_state(sdata)
    t = sdata.tables["table"]
    del t.obs["stranker_difficulty"], t.var["stranker_reliable"], t.layers["stranker_lower"]
    stores.write_in_place(sdata, store, state)
    back = sd.read_zarr(store)["table"]
    assert "stranker_difficulty" not in back.obs and "stranker_reliable" not in back.var
    assert set(back.layers) == {"counts"}
    assert {k: v for k, v in _tree(store).items() if k != "zarr.json"} == {
        k: v for k, v in before.items() if k != "zarr.json"}  # as it was, to the byte


def test_in_place_write_failing_midway_puts_everything_back(saved, store, monkeypatch, capsys):
    assert main(["predict", saved, str(store)]) == 0  # keys of stranker's there, to be replaced
    before = _tree(store)
    rename, calls = os.rename, []

    def flaky(src, dst):
        calls.append(src)
        if len(calls) == 4:  # after some of the keys were moved in
            raise OSError(errno.EIO, "I/O error", str(dst))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky)
    assert main(["predict", saved, str(store)]) == 2
    assert "I/O error" in capsys.readouterr().err
    assert _tree(store) == before and _temps(store.parent) == []


# --------------------------------------------------------------------------------------------
# 3. fit: --out (and --checkpoint-dir) checked writable before training
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["--out", "--checkpoint-dir"])
def test_fit_refuses_a_path_under_a_file_before_training(store, tmp_path, monkeypatch, capsys, option):
    def fit(*args, **kwargs):
        raise AssertionError("trained before finding that the model cannot be saved")

    monkeypatch.setattr(sr.tl, "fit", fit)
    (tmp_path / "notes.txt").write_text("mine")
    args = ["fit", str(store), "--out", str(tmp_path / "notes.txt" / "m")]
    if option == "--checkpoint-dir":  # a good --out, a checkpoint folder that cannot be made
        args = ["fit", str(store), "--out", str(tmp_path / "m"), option, str(tmp_path / "notes.txt" / "ck")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert option in err and "notes.txt is a file, not a folder" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_fit_refuses_a_read_only_folder_before_training(store, tmp_path, monkeypatch, capsys):
    def fit(*args, **kwargs):
        raise AssertionError("trained before finding that the model cannot be saved")

    monkeypatch.setattr(sr.tl, "fit", fit)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["fit", str(store), "--out", str(locked / "m")]) == 2
        assert "cannot be written" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


# --------------------------------------------------------------------------------------------
# 4. a full disk, a read-only store, a key zarr refuses: said, before predicting where it can be
# --------------------------------------------------------------------------------------------
def test_predict_refuses_a_disk_too_full_before_predicting(saved, store, monkeypatch, capsys):
    usage = shutil.disk_usage(store)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=100))
    _no_predict(monkeypatch)
    before = _tree(store)
    assert main(["predict", saved, str(store)]) == 2
    assert "Not enough space" in capsys.readouterr().err
    assert _tree(store) == before


def test_a_disk_filling_up_while_writing_is_said_and_changes_nothing(saved, store, tmp_path, monkeypatch,
                                                                      capsys):
    import anndata.io
    import spatialdata

    write = spatialdata.SpatialData.write

    def full(self, path, *args, **kwargs):
        write(self, path, *args, **kwargs)  # most of it written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(spatialdata.SpatialData, "write", full)
    assert main(["predict", saved, str(store), "--out", str(tmp_path / "p.zarr")]) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "nothing was written" in err and "Traceback" not in err
    assert not (tmp_path / "p.zarr").exists() and _temps(tmp_path) == []

    def full_elem(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(anndata.io, "write_elem", full_elem)
    before = _tree(store)
    assert main(["predict", saved, str(store)]) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "the store is as it was" in err
    assert _tree(store) == before and _temps(tmp_path) == []


def test_predict_refuses_a_read_only_store_before_predicting(saved, store, monkeypatch, capsys):
    access = os.access

    def read_only(path, mode, *args, **kwargs):  # as a read-only store looks (root ignores chmod)
        if str(path).startswith(str(store)) and mode & os.W_OK:
            return False
        return access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", read_only)
    _no_predict(monkeypatch)
    before = _tree(store)
    assert main(["predict", saved, str(store)]) == 2
    err = capsys.readouterr().err
    assert "cannot be written in place" in err and "read-only" in err and "--out" in err
    assert _tree(store) == before


@pytest.mark.parametrize("key", ["a/b", "my key", "__hidden", "..", "mög/x"])
def test_key_added_that_zarr_refuses_is_refused_before_predicting(saved, store, model, monkeypatch, capsys,
                                                                   key):
    sdata = make_sdata(n=16, seed=1)[0]
    with pytest.raises(InputError, match="cannot be stored in a SpatialData"):
        sr.tl.predict(model, sdata, key_added=key)
    assert "stranker" not in sdata.tables["table"].layers and set(sdata.tables["table"].layers) == {"counts"}
    _no_predict(monkeypatch)
    before = _tree(store)
    assert main(["predict", saved, str(store), "--key-added", key]) == 2
    assert "--key-added" in capsys.readouterr().err
    assert _tree(store) == before


def test_key_added_differing_only_in_case_from_a_users_key_is_refused(model):
    sdata = make_sdata(n=16, seed=1)[0]
    with pytest.raises(InputError, match=r"layers\['counts'\].*only in case"):
        sr.tl.predict(model, sdata, key_added="Counts")
    assert set(sdata.tables["table"].layers) == {"counts"}


# --------------------------------------------------------------------------------------------
# 4. an interrupted write leaves no temporary folder; a stale one does not confuse the next run
# --------------------------------------------------------------------------------------------
_INTERRUPTED = textwrap.dedent("""
    import sys, threading, time, types
    from pathlib import Path
    import spatialdata
    import stranker as sr
    from stranker._cli import main

    sr.Model.load = staticmethod(lambda path, **kw: types.SimpleNamespace(genes=["G0"]))
    sr.tl.predict = lambda *args, **kwargs: None

    def write(self, path, *args, **kwargs):  # as dask's threads write chunks: some finish after Ctrl-C
        (Path(path) / "images").mkdir(parents=True)
        def late():
            time.sleep(0.5)
            (Path(path) / "images" / "late").mkdir(parents=True, exist_ok=True)
            (Path(path) / "images" / "late" / "0").write_bytes(b"chunk")
        threading.Thread(target=late).start()
        print("writing", flush=True)
        time.sleep(60)

    spatialdata.SpatialData.write = write
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_write_leaves_no_temporary_folder(store, tmp_path, sig):
    out = tmp_path / "p.zarr"
    cmd = [sys.executable, "-c", _INTERRUPTED, "predict", "m", str(store), "--out", str(out)]
    # a shell's background job inherits SIGINT ignored, and Python then keeps it ignored (as it should):
    # the user's Ctrl-C reaches a command run in the foreground, with SIGINT at its default
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "writing"
    assert len(_temps(tmp_path)) == 1
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert _temps(tmp_path) == [] and not out.exists()  # also what the late chunk wrote, at exit
    assert proc.returncode == 130 and "interrupted" in err, err[-2000:]


@pytest.mark.skipif(os.name != "posix", reason="flock")
def test_a_stale_temporary_folder_is_removed_not_taken_for_anything(saved, store, tmp_path, stranker_log):
    import fcntl

    out = tmp_path / "p.zarr"
    stale = tmp_path / ".p.zarr.writing-0123456789ab"  # a run killed outright (kill -9) left it
    (stale / "store" / "images").mkdir(parents=True)
    (stale / ".stranker-lock").write_text("")
    (stale / "store" / "images" / "0").write_bytes(b"half a chunk")
    busy = tmp_path / ".p.zarr.writing-ba9876543210"  # another process writing now: left alone
    busy.mkdir()
    lock = open(busy / ".stranker-lock", "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    young = tmp_path / ".p.zarr.writing-aaaaaaaaaaaa"  # no lock yet, just made: left alone
    young.mkdir()
    mine = tmp_path / ".p.zarr.writing-notmine"  # not a name stranker gives: never touched
    mine.mkdir()
    try:
        assert main(["predict", saved, str(store), "--out", str(out)]) == 0
    finally:
        lock.close()
    assert not stale.exists() and busy.exists() and young.exists() and mine.exists()
    assert "left by a stranker run that was killed" in stranker_log.text
    assert (out / "zarr.json").exists()


@pytest.mark.timeout(120)
@pytest.mark.skipif(os.name != "posix", reason="flock")
def test_a_file_write_killed_outright_leaves_nothing_a_glob_finds(tmp_path):
    # the datasets write files whole through write_file; HEST samples are found by globbing st/*.h5ad
    from stranker._atomic import write_file

    target = tmp_path / "st" / "S1.h5ad"
    killed = "import os, sys; from pathlib import Path; from stranker._atomic import write_file; " \
             "write_file(Path(sys.argv[1]), lambda p: (p.write_text('half'), os._exit(9)))"
    assert subprocess.run([sys.executable, "-c", killed, str(target)], timeout=100).returncode == 9
    assert list(target.parent.glob("*.h5ad")) == []  # the half-written file is not taken for a sample
    write_file(target, lambda p: p.write_text("whole"))  # written again: the killed write's folder goes
    assert sorted(p.name for p in target.parent.iterdir()) == ["S1.h5ad"] and target.read_text() == "whole"


# --------------------------------------------------------------------------------------------
# 4. two models' predictions under one key of one table; in-sample scores
# --------------------------------------------------------------------------------------------
def _two_libraries():
    """One AnnData holding two libraries (spots 0-7 on image A, 8-15 on image B), squidpy layout."""
    sdata, px = make_sdata(n=16, seed=1)
    table = sdata.tables["table"].copy()
    img = np.moveaxis(np.asarray(sdata.images["he"].data), 0, -1)
    table.obsm["spatial"] = px.copy()
    sf = {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 16.0}
    table.uns["spatial"] = {"A": {"images": {"hires": img}, "scalefactors": sf},
                            "B": {"images": {"hires": 255 - img}, "scalefactors": sf}}
    table.obs["sample"] = ["A"] * 8 + ["B"] * 8
    return table


def test_two_models_predictions_are_never_mixed_under_one_key(model):
    other = copy.deepcopy(model)
    other.meta.fit_seconds += 1.0  # another fit
    table = _two_libraries()
    sr.tl.predict(model, table, library_id="A", library_key="sample")
    layer = table.layers["stranker"].copy()
    with pytest.raises(InputError, match="another model.*8 of its 16 rows.*another `key_added=`"):
        sr.tl.predict(other, table, library_id="B", library_key="sample")
    np.testing.assert_array_equal(table.layers["stranker"], layer)
    assert table.uns["stranker"]["fit_seconds"] == model.meta.fit_seconds
    sr.tl.predict(model, table, library_id="B", library_key="sample")  # the same model: its other rows
    assert np.isfinite(table.layers["stranker"][:, :5]).all()
    sr.tl.predict(other, table, library_id="B", library_key="sample", key_added="other")  # its own key
    full = make_sdata(n=16, seed=1)[0]
    sr.tl.predict(model, full)
    sr.tl.predict(other, full)  # every row: the earlier result is replaced whole, not mixed
    assert full.tables["table"].uns["stranker"]["fit_seconds"] == other.meta.fit_seconds


def test_evaluate_warns_that_a_fits_own_predictions_are_in_sample(fitted, stranker_log):
    from spatialdata import deepcopy

    model, trained = fitted
    sdata = deepcopy(trained)  # the fit wrote its in-sample predictions there, under 'stranker'
    stranker_log.clear()
    sr.tl.evaluate(sdata)
    assert "in-sample" in stranker_log.text and "trained on" in stranker_log.text
    other = make_sdata(n=16, seed=1)[0]
    sr.tl.predict(model, other)
    stranker_log.clear()
    sr.tl.evaluate(other)
    assert "in-sample" not in stranker_log.text


# --------------------------------------------------------------------------------------------
# 4. ~ is the home folder wherever a path enters
# --------------------------------------------------------------------------------------------
def test_home_folder_is_expanded_wherever_a_path_enters(model, store, tmp_path, monkeypatch):
    from tests.io.test_io import write_tiff

    home = tmp_path / "home"
    home.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)  # a '~' folder would appear here
    model.save("~/m")
    assert (home / "m" / "model.pt").exists()
    assert sr.Model.load("~/m").genes == model.genes
    shutil.copytree(store, home / "in.zarr")
    assert main(["predict", "~/m", "~/in.zarr", "--out=~/p.zarr"]) == 0
    assert (home / "p.zarr" / "zarr.json").exists()
    write_tiff(home / "s.tif", np.full((64, 64, 3), 200, np.uint8), mpp=0.5, levels=1)
    assert sr.io.read_slide("~/s.tif") is not None
    import stranker.train.checkpoint as checkpoint

    def stop(checkpoint_dir, *args):
        raise StopIteration(checkpoint_dir)  # the path that reaches the training loop; no training

    monkeypatch.setattr(checkpoint, "check_arguments", stop)
    with pytest.raises(StopIteration) as got:
        sr.tl.fit(make_sdata(n=16, seed=0)[0], **TINY, checkpoint_dir="~/ck")
    assert Path(got.value.args[0]) == home / "ck"
    assert list(elsewhere.iterdir()) == []
