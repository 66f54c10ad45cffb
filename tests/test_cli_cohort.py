"""``stranker predict MODEL IN [IN ...] --out DIR`` and ``stranker embed``: cohorts from the command line.

Shares the tiny model, the slides and a one-process reference run with tests/tl/test_cohort.py. Two
processes under torchrun give the outputs of one; a run killed midway finishes on a rerun with every
output whole; failed slides are listed and the exit status is 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import stranker as sr
from stranker._cli import main
from stranker.tl._cohort import existing_output

from .tl.test_cohort import MPP, files, record_of, reference, slide_image, table_of, temporaries, write_tiff


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return reference(tmp_path_factory)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "stranker._cli", *args]


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x)


def _same_outputs(one: Path, two: Path) -> None:
    """Two output folders hold the same slides with the same predictions and records (but their own paths)."""
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for p in sorted(one.iterdir()):
        a, b = table_of(p), table_of(two / p.name)
        assert list(a.obs_names) == list(b.obs_names) and sorted(a.layers) == sorted(b.layers)
        for k in a.layers:
            np.testing.assert_allclose(_dense(a.layers[k]), _dense(b.layers[k]), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{p.name} {k}")
        np.testing.assert_allclose(a.obsm["X_stranker"], b.obsm["X_stranker"], rtol=1e-5, atol=1e-6)
        ra, rb = record_of(p), record_of(two / p.name)
        assert ra.pop("path") == str(p) and rb.pop("path") == str(two / p.name)
        assert ra == rb


@pytest.mark.timeout(600)
def test_two_processes_under_torchrun_write_what_one_writes(ref, tmp_path):
    inputs, saved, out, _ = ref
    dest = tmp_path / "out2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "stranker._cli", "predict", str(saved), *map(str, inputs), "--out", str(dest),
           "--device", "cpu"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=500,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    # each process took its share (largest first): together every slide once
    shares = [int(line.split("Process ")[1].split(":")[1].split(" of ")[0])
              for line in run.stderr.splitlines() if "Process " in line and " of 2: " in line]
    assert sorted(shares) == [1, 2], run.stderr[-3000:]
    assert "3 slide(s) predicted, 0 already there" in run.stdout
    _same_outputs(out, dest)
    assert temporaries(dest) == []


@pytest.mark.timeout(600)
def test_a_run_killed_midway_finishes_on_a_rerun_with_every_output_whole(ref, tmp_path, capsys):
    inputs, saved, _, _ = ref
    dest = tmp_path / "out"
    cmd = _cli("predict", str(saved), *map(str, inputs), "--out", str(dest), "--device", "cpu")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (dest.is_dir() and any(p.suffix == ".zarr" for p in dest.iterdir())):
            assert proc.poll() is None, "the run ended before its first output appeared"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # no clean-up: whatever it was writing stays half-written
    finally:
        proc.kill()
        proc.wait()
    first = {p.name for p in dest.iterdir() if p.suffix == ".zarr"}
    assert 1 <= len(first) < 3
    kept = {name: files(dest / name) for name in first}
    assert main(["predict", str(saved), *map(str, inputs), "--out", str(dest)]) == 0
    assert f"{3 - len(first)} slide(s) predicted, {len(first)} already there" in capsys.readouterr().out
    assert temporaries(dest) == []
    assert sorted(p.name for p in dest.iterdir()) == ["a.zarr", "b.zarr", "c.zarr"]
    for p in dest.iterdir():
        state, rec = existing_output(p)
        assert state == "ours" and "partial" not in rec and rec["n_obs"] == table_of(p).n_obs
    assert {name: files(dest / name) for name in first} == kept  # those written before the kill: as they were


def test_failed_slides_are_listed_and_the_exit_status_is_1(ref, tmp_path, capsys):
    inputs, saved, _, _ = ref
    bad = tmp_path / "bad.tiff"
    bad.write_bytes(b"not a slide")
    dest = tmp_path / "out"
    (dest / "a.zarr").mkdir(parents=True)
    (dest / "a.zarr" / "mine.txt").write_text("mine")
    assert main(["predict", str(saved), str(inputs[0]), str(bad), "--out", str(dest)]) == 1
    err = capsys.readouterr().err
    assert "2 of 2 slide(s) failed" in err
    assert f"  {inputs[0]}: FileExistsError" in err and f"  {bad}: InputError" in err
    assert sorted(p.name for p in dest.iterdir()) == ["a.zarr"] and (dest / "a.zarr" / "mine.txt").exists()


def test_h5ad_outputs_with_mpp_and_refusals_before_any_work(ref, tmp_path, capsys):
    inputs, saved, _, _ = ref
    n = write_tiff(tmp_path / "n.tif", slide_image(3), mpp=None)
    dest = tmp_path / "out"
    assert main(["predict", str(saved), str(n), "--out", str(dest), "--format", "h5ad"]) == 1
    assert "--mpp" in capsys.readouterr().err
    assert main(["predict", str(saved), str(n), "--out", str(dest), "--format", "h5ad",
                 "--mpp", str(MPP)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["n.h5ad"]
    assert record_of(dest / "n.h5ad")["mpp"] == MPP and table_of(dest / "n.h5ad").n_obs > 0
    # a cohort needs --out; one store keeps today's meaning (in place) and takes no --nproc
    assert main(["predict", str(saved), str(n)]) == 2
    assert "--out DIR" in capsys.readouterr().err
    assert main(["predict", str(saved), str(inputs[1]), "--nproc", "2"]) == 2
    assert "--nproc" in capsys.readouterr().err


def test_embed_writes_one_row_per_slide_whole(ref, tmp_path, capsys):
    import anndata as ad

    inputs, saved, _, _ = ref
    out = tmp_path / "cohort.h5ad"
    clinical = tmp_path / "clinical.csv"
    clinical.write_text("slide,grade\nb,3\na,1\nz,2\n")  # by slide name, any order, more rows than slides
    assert main(["embed", str(saved), str(inputs[0]), str(inputs[1]), "--out", str(out), "--tiles",
                 "--obs", str(clinical)]) == 0
    cohort = ad.read_h5ad(out)
    assert list(cohort.obs_names) == ["a", "b"] and cohort.n_vars > 0
    assert list(cohort.obs["grade"]) == [1, 3]
    tiles = cohort.uns["stranker_tiles"]["embeddings"]
    assert list(cohort.obs["stranker_n_tiles"]) == [len(tiles["a"]), len(tiles["b"])]
    np.testing.assert_allclose(cohort.X, np.stack([tiles["a"].mean(0), tiles["b"].mean(0)]), rtol=1e-5)
    assert cohort.uns["stranker_embed"]["model_sha256"] == record_of(ref[2] / "a.zarr")["model_sha256"]
    assert temporaries(tmp_path) == []
    mine = tmp_path / "mine.h5ad"
    sr.datasets.synthetic(n_sections=1, n_spots=10, n_genes=5)[0].tables["table"].write_h5ad(mine)
    before = files(tmp_path)
    assert main(["embed", str(saved), str(inputs[0]), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["embed", str(saved), str(inputs[0]), "--out", str(mine), "--overwrite"]) == 2
    assert "did not write it" in capsys.readouterr().err
    assert files(tmp_path) == before  # refused before any work: nothing written, nothing replaced
