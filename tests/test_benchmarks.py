"""Smoke runs of the benchmark scripts (seconds, synthetic data): they run, write what they promise,
resume.
"""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _strict(text):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_accuracy_smoke_rows_pooled_and_resume(tmp_path):
    acc = _load("accuracy")
    rows = acc.main(["--smoke", "--out", str(tmp_path)])
    saved = _strict((tmp_path / "accuracy.json").read_text())
    methods = set(acc.BASELINES + acc.PRESETS)
    folds = [r for r in saved["rows"] if r["test"] != "pooled"]
    assert {r["method"] for r in folds} == methods
    assert len(folds) == len(methods) * 3  # three synthetic sections, one seed
    for r in folds:
        assert set(r) >= {"method", "split", "test", "seed", "pcc_all", "pcc_heg", "mae", "mse", "fit_s",
                          "predict_s", "spearman_all", "spearman_heg"}
    pooled = {r["method"]: r for r in saved["rows"] if r["test"] == "pooled"}
    assert set(pooled) == methods
    # colour statistics carry the synthetic programs: the ridge on them must find signal
    assert pooled["ridge-stain"]["pcc_all"] > 0.2
    assert next(r for r in folds if r["method"] == "mean")["pcc_all"] is None  # r of a constant: undefined
    # a second run finds every row done and recomputes nothing
    again = acc.main(["--smoke", "--out", str(tmp_path)])
    assert [r.get("fit_s") for r in again] == [r.get("fit_s") for r in rows]
    # a run with other settings refuses to resume into those results, and leaves them as they were
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(SystemExit, match="--out"):
        acc.main(["--smoke", "--out", str(tmp_path), "--epochs", "2"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_pooled_statistics_equal_concatenation():
    acc = _load("accuracy")
    rng = np.random.default_rng(0)
    parts = [(rng.normal(size=(n, 5)), rng.normal(size=(n, 5)) + i) for i, n in enumerate((7, 11, 4))]
    st = acc.pool([acc.suff_stats(p, t) for p, t in parts])
    p, t = np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])
    r = [np.corrcoef(p[:, g], t[:, g])[0, 1] for g in range(5)]
    np.testing.assert_allclose(st[5] / np.sqrt(st[3] * st[4]), r, atol=1e-12)
    np.testing.assert_allclose(st[7].sum() / st[0].sum(), np.mean((p - t) ** 2))


def test_tables_count_a_seed_once_it_has_every_fold():
    acc = _load("accuracy")

    def row(method, test, seed, r):
        return {"method": method, "split": "loso", "test": test, "dev": test == "C5", "seed": seed,
                "pcc_all": r, "pcc_heg": r, "pcc_heg_train": r, "mae": 1.0, "mse": 1.0, "fit_s": 1.0,
                "predict_s": 1.0}

    rows = [row(m, t, 0, base + i / 100) for m, base in (("bleep", 0.1), ("stranker", 0.2))
            for i, t in enumerate(("C5", "C2"))]
    rows.append(row("stranker", "C5", 1, 0.9))  # seed 1 has only one fold so far
    loso = next(ln for ln in acc.table(rows).splitlines()
                if ln.startswith("| LOSO, mean") and "stranker" in ln)
    assert "| 0.205 ± 0.000 |" in loso  # seed 0 alone: (0.20 + 0.21) / 2, the partial seed left out
    folds = acc.fold_table(rows)
    assert "| C5 ACG | 0.100 (1) | **0.550 ± 0.495 (2)** |" in folds  # per fold, every seed that ran
    # an ablation row, run on C5 only, neither enters the main tables nor shrinks their common folds
    with_ablation = rows + [row("stranker+rank", "C5", 0, 0.15)]
    assert acc.table(with_ablation) == acc.table(rows)
    assert acc.fold_table(with_ablation) == folds
    abl = acc.ablation_table(with_ablation).splitlines()
    assert abl[0] == "| method | runs | C5 | change on patient C |"  # only the folds the ablation ran on
    assert abl[2] == "| stranker | 1 | 0.200 / 0.200 | – |"  # seed 0 only: as the ablation
    assert abl[3] == "| stranker+rank | 1 | 0.150 / 0.150 | -0.050 / -0.050 |"
    # ablations on other folds: each keeps its own cells (– where it did not run), and the change on
    # the other patient is kept apart from the change on patient C
    more = with_ablation + [row("stranker", "A1", 0, 0.05), row("stranker-no-clip", "A1", 0, 0.04),
                            row("stranker-no-clip", "C2", 0, 0.23)]
    abl = acc.ablation_table(more).splitlines()
    assert abl[0] == "| method | runs | A1 | C5 | C2 | change on A1 | change on patient C |"
    assert abl[2] == "| stranker | 3 | 0.050 / 0.050 | 0.200 / 0.200 | 0.210 / 0.210 | – | – |"
    assert abl[3] == ("| stranker-no-clip | 2 | 0.040 / 0.040 | – | 0.230 / 0.230 | -0.010 / -0.010 "
                      "| +0.020 / +0.020 (1 fold) |")
    assert abl[4] == "| stranker+rank | 1 | – | 0.150 / 0.150 | – | – | -0.050 / -0.050 (1 fold) |"
    # seed by seed: each seed of the ablation against the same seed of the default, groups apart
    more += [row("stranker", "C2", 1, 0.30), row("stranker-no-clip", "C2", 1, 0.31)]
    seeds = acc.seed_table(more).splitlines()
    assert seeds[0] == "| method | change | seed 0 | seed 1 |"
    assert seeds[2] == "| stranker-no-clip | on A1 | -0.010 / -0.010 | – |"
    assert seeds[3] == ("| stranker-no-clip | on patient C | +0.020 / +0.020 (1 fold) "
                        "| +0.010 / +0.010 (1 fold) |")
    assert seeds[4] == "| stranker+rank | on patient C | -0.050 / -0.050 (1 fold) | – |"


def test_speed_smoke(tmp_path):
    speed = _load("speed")
    rep = speed.main(["--smoke", "--out", str(tmp_path), "--device", "cpu"])
    saved = _strict((tmp_path / "speed.json").read_text())
    assert saved["device"] == "cpu"
    for k, v in rep["efficiency"].items():
        assert math.isfinite(v) and v > 0, k
    for part in ("bare_train", "core_fit", "core_predict"):
        assert rep["results"][part]["spots_per_s"] > 0
        assert rep["results"][part]["peak_mb"] > 0
    assert "| fit, core loop |" in speed.table(rep)
    # end-to-end throughput counts every epoch that ran, the sharp finish's too (it counted `epochs` only)
    from stranker.model import Config

    for run in rep["results"]["full"]["rounds"]:
        assert run["fit_epochs"] == 2 + Config().sharp_epochs
        spots = run["fit_end_to_end_spots_per_s"] * run["fit_end_to_end_s"] / run["fit_epochs"]
        assert math.isclose(spots, 3 * (96 // 3))  # the smoke run trains on 3 sections of 32 spots


def test_slides_smoke(tmp_path):
    slides = _load("slides")
    rep = slides.main(["--smoke", "--out", str(tmp_path), "--device", "cpu"])
    saved = _strict((tmp_path / "slides.json").read_text())
    assert saved["settings"]["workers"] == [0, 2] and len(saved["results"]) == 2  # two slide sizes
    written = sorted((tmp_path / "slides").glob("*.tif"))
    assert len(written) == 2  # the slides, written once into the cache folder
    for res in rep["results"].values():
        assert res["same_outputs"]  # every num_workers predicts the same
        assert res["predict_w0"]["tiles"] == res["predict_w2"]["tiles"] > 20
        for part in ("bare", "read_w0", "read_w2", "predict_w0", "predict_w2"):
            assert res[part]["tiles_per_s"] > 0 and res[part]["peak_mb"] > 0, part
        assert math.isfinite(res["predict_w2"]["efficiency"])
    assert "| predict_w2 |" in slides.table(rep)
    # a later run reads the cached slides instead of writing them again
    import argparse

    stamps = [p.stat().st_mtime_ns for p in written]
    a = argparse.Namespace(tile_um=55.0, mpp=0.5, quality=90, cache=str(tmp_path / "slides"))
    assert sorted(slides.slide_for(n, a)[0] for n in saved["settings"]["tiles"]) == written
    assert [p.stat().st_mtime_ns for p in written] == stamps


def _run(script, *args, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_scaling_smoke(tmp_path):
    out = tmp_path / "scaling.json"
    _run("scaling.py", "--tiles", "150", "600", "--repeats", "1", "--out", str(out), tmp_path=tmp_path)
    rows = _strict(out.read_text())["rows"]
    assert [r["n_tiles"] > 0 for r in rows] == [True, True]
    assert rows[1]["n_tiles"] > rows[0]["n_tiles"]
    assert all(r["peak_rss_mb"] > 0 and r["seconds"] > 0 for r in rows)


def test_train_scaling_smoke(tmp_path):
    out = tmp_path / "train.json"
    _run("train_scaling.py", "--nproc", "1", "--spots", "64", "--epochs", "2", "--image-size", "16",
         "--batch-size", "16", "--out", str(out), tmp_path=tmp_path)
    runs = _strict(out.read_text())["runs"]
    assert len(runs) == 1 and runs[0]["spots_per_s"] > 0 and math.isfinite(runs[0]["final_total_loss"])


def test_accuracy_merge_joins_parallel_runs(tmp_path, capsys):
    acc = _load("accuracy")
    st = np.ones((len(acc.STATS), 3))

    def run(folder, rows):
        folder.mkdir()
        stats = {acc._key(r): st for r in rows}
        acc._save(folder / "accuracy.json", folder / "accuracy_stats.npz", rows, stats, ["C5"])

    def row(method, seed, r):
        return {"method": method, "split": "loso", "test": "C5", "dev": True, "seed": seed, "pcc_all": r,
                "pcc_heg": r, "pcc_heg_train": r, "mae": 1.0, "mse": 1.0, "fit_s": 1.0, "predict_s": 1.0}

    run(tmp_path / "a", [row("stranker", 0, 0.1), row("bleep", 0, 0.2)])
    run(tmp_path / "b", [row("stranker", 0, 0.3), row("stranker", 1, 0.4)])  # seed 0 again: replaces
    acc.main(["--out", str(tmp_path / "all"), "--merge", str(tmp_path / "a"), str(tmp_path / "b")])
    saved = json.loads((tmp_path / "all" / "accuracy.json").read_text())["rows"]
    got = {(r["method"], r["seed"]): r["pcc_all"] for r in saved if r["test"] != "pooled"}
    assert got == {("bleep", 0): 0.2, ("stranker", 0): 0.3, ("stranker", 1): 0.4}
    keys = set(np.load(tmp_path / "all" / "accuracy_stats.npz"))
    assert keys == {"bleep|C5|0", "stranker|C5|0", "stranker|C5|1"}


def test_variants_bn_match_reads_training_patches_and_lowers_them(monkeypatch):
    import sys

    import torch

    import stranker as sr

    monkeypatch.syspath_prepend(str(BENCH))  # variants.py imports accuracy.py as a sibling
    var = _load("variants")
    secs = sr.datasets.synthetic(2, 40, n_genes=20, seed=0)
    model = sr.tl.fit(secs, epochs=1, backbone="test_resnet", patch_px=64, image_size=32, pretrained=False)
    patches = var.training_patches(model, secs, most=30)
    assert patches.shape == (30, 1, 32, 32, 3) and patches.dtype == np.uint8  # 15 per section
    sharp = torch.cat(list(var.lowered(patches, 1.0, batch_size=8)))
    assert sharp.shape == (30, 1, 3, 32, 32) and torch.equal(sharp, sharp.clamp(0, 1))
    blurred = torch.cat(list(var.lowered(patches, 3.0, batch_size=8)))
    # lowering the resolution keeps each image's mean and removes detail
    assert torch.allclose(blurred.mean((2, 3, 4)), sharp.mean((2, 3, 4)), atol=0.03)
    assert blurred.diff(dim=-1).abs().mean() < 0.6 * sharp.diff(dim=-1).abs().mean()
    assert "accuracy" in sys.modules


def test_variants_resolution_mean_averages_the_branch_over_lowered_views(monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    var = _load("variants")
    seen = []

    class Branch(torch.nn.Module):  # records what it reads; embedding = mean, prediction = detail
        def forward_tta(self, x, tta):
            seen.append((x.clone(), tta))
            return x.mean((-3, -2, -1)), x.diff(dim=-1).abs().mean((-3, -2, -1))

    x = torch.rand(4, 1, 3, 16, 16)
    e, p = var.ResolutionMean(Branch(), [1.0, 3.0]).forward_tta(x, True)
    assert [t for _, t in seen] == [True, True] and torch.equal(seen[0][0], x)  # the sharp view as it is
    low = seen[1][0]
    assert low.shape == x.shape and low.diff(dim=-1).abs().mean() < 0.6 * x.diff(dim=-1).abs().mean()
    ref = [Branch().forward_tta(v, True) for v in (seen[0][0], seen[1][0])]
    torch.testing.assert_close(e, (ref[0][0] + ref[1][0]) / 2)
    torch.testing.assert_close(p, (ref[0][1] + ref[1][1]) / 2)


def test_reliability_smoke_writes_a_row_and_resumes(tmp_path):
    import json

    out = tmp_path / "rel"
    _run("reliability.py", "--smoke", "--out", str(out), tmp_path=tmp_path)
    rows = [json.loads(line) for line in (out / "reliability.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["test"] == "S3"
    r = rows[0]
    assert 0 <= r["coverage_mean"] <= 1 and r["width_mean"] > 0 and isinstance(r["shifted"], bool)
    assert r["mean_r_ensemble"] is not None  # the fold models, as an ensemble
    _run("reliability.py", "--smoke", "--out", str(out), tmp_path=tmp_path)  # done: skipped, not appended
    assert len((out / "reliability.jsonl").read_text().splitlines()) == 1
