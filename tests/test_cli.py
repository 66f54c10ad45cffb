import os
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(900)  # subprocesses with their own limits
def test_demo_runs_end_to_end(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "stranker._cli", "demo", "--epochs", "2", "--n-spots", "60", "--n-genes", "20",
         "--backbone", "test_resnet", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "held-out section" in out.stdout and "ACG" in out.stdout
    assert (tmp_path / "model" / "model.pt").exists()
    png = tmp_path / "stranker_demo_gene_map.png"
    assert str(png) in out.stdout and 10_000 < png.stat().st_size < 300_000


def test_fit_command_reports_bad_input(tmp_path):
    cmd = [sys.executable, "-m", "stranker._cli", "fit", str(tmp_path / "missing.zarr"), "--out", "m"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode != 0
    assert "missing.zarr" in (out.stderr + out.stdout)


@pytest.mark.slow
@pytest.mark.timeout(900)  # subprocesses with their own limits
def test_fit_command_on_a_zarr_store(tmp_path):
    import stranker as sr

    secs = sr.datasets.synthetic(n_sections=1, n_spots=40, n_genes=20, seed=1)
    secs[0].write(tmp_path / "s.zarr")
    out = subprocess.run(
        [sys.executable, "-m", "stranker._cli", "fit", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "m"),
         "--genes", "heg", "--epochs", "1", "--backbone", "test_resnet", "--no-pretrained",
         "--predict-rank", "3"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    model = sr.Model.load(tmp_path / "m")
    assert len(model.genes) == 20 and model.expression_rank == 3
    assert "WARNING" in out.stderr and "randomly initialised" in out.stderr  # random weights are said
    # predict: into a new store, then in place; the input store is unchanged by the first
    before = _tree(tmp_path / "s.zarr")
    cmd = [sys.executable, "-m", "stranker._cli", "predict", str(tmp_path / "m"), str(tmp_path / "s.zarr")]
    to_new = [*cmd, "--out", str(tmp_path / "p.zarr")]
    out = subprocess.run(to_new, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert _tree(tmp_path / "s.zarr") == before
    import spatialdata as sd

    pred = sd.read_zarr(tmp_path / "p.zarr")["table"]
    assert pred.obsm["X_stranker"].shape[0] == pred.n_obs and "stranker" in pred.layers
    out = subprocess.run(to_new, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "--overwrite" in out.stderr
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "stranker" in sd.read_zarr(tmp_path / "s.zarr")["table"].layers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "p.zarr", "s.zarr"]  # no temp left over


def test_fit_command_without_weights_says_how_to_get_them(tmp_path):
    # offline, pretrained weights asked for (the default) and not cached: one clear error, no model
    import stranker as sr

    secs = sr.datasets.synthetic(n_sections=1, n_spots=40, n_genes=20, seed=1)
    secs[0].write(tmp_path / "s.zarr")
    out = subprocess.run(
        [sys.executable, "-m", "stranker._cli", "fit", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "m"),
         "--genes", "heg", "--epochs", "1", "--backbone", "test_resnet"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty_cache")},
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "stranker: error:" in out.stderr and "timm/test_resnet.r160_in1k" in out.stderr
    assert "hf download timm/test_resnet.r160_in1k" in out.stderr and "`weights=`" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "m").exists()


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_predict_command_with_a_bad_model_leaves_the_store_alone(tmp_path):
    import stranker as sr

    sr.datasets.synthetic(n_sections=1, n_spots=30, n_genes=10, seed=1)[0].write(tmp_path / "s.zarr")
    before = _tree(tmp_path / "s.zarr")
    out = subprocess.run([sys.executable, "-m", "stranker._cli", "predict", str(tmp_path / "nomodel"),
                          str(tmp_path / "s.zarr")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "nomodel" in out.stderr
    assert _tree(tmp_path / "s.zarr") == before


def test_version_and_help_text():
    import stranker as sr

    out = subprocess.run([sys.executable, "-m", "stranker._cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"stranker {sr.__version__}"
    from stranker._cli import parser

    subs = next(a for a in parser()._actions if a.choices and "fit" in a.choices).choices
    assert set(subs) >= {"demo", "fit", "predict"}
    for name, sub in subs.items():
        for action in sub._actions:
            assert action.help and len(action.help) > 10, (name, action.option_strings or action.dest)
    cmd = [sys.executable, "-m", "stranker._cli", "fit", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    for opt in ("--backbone", "--epochs", "--n-top-genes", "--image-size"):
        assert opt in out.stdout
    assert "test_resnet" in out.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)  # subprocesses with their own limits
def test_fit_command_launches_two_processes(tmp_path):
    # `--nproc 2` re-runs itself under torchrun (gloo on CPU); rank 0 saves a model trained by both
    import stranker as sr

    paths = []
    for i, s in enumerate(sr.datasets.synthetic(n_sections=2, n_spots=40, n_genes=20, seed=1)):
        paths.append(str(tmp_path / f"s{i}.zarr"))
        s.write(paths[-1])
    out = subprocess.run(
        [sys.executable, "-m", "stranker._cli", "fit", *paths, "--out", str(tmp_path / "m"), "--genes", "heg",
         "--epochs", "2", "--sharp-epochs", "1", "--backbone", "test_resnet", "--no-pretrained",
         "--nproc", "2"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "launching:" in out.stdout and "--nproc_per_node=2" in out.stdout
    assert out.stdout.count("model saved to") == 1  # rank 0 only
    model = sr.Model.load(tmp_path / "m")
    assert model.meta["world_size"] == 2 and len(model.history) == 3  # 2 epochs and 1 sharp
    assert model.config.sharp_epochs == 1 and model.aligner.coarse is not None
