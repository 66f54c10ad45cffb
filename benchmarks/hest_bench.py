"""HEST-Bench: expression from frozen patch features, HEST's protocol, beside stranker's heads and full fit.

Reads HEST-Bench task folders as HEST publishes them (``MahmoodLab/hest-bench``: ``{task}/adata/{id}.h5ad``,
``{task}/patches/{id}.h5``, ``{task}/splits/{train,test}_{i}.csv``, ``{task}/var_50genes.json``) or any
folder in HEST-1k's layout (``st/``, ``wsis/``, ``metadata/``; folds are then one per patient and the 50
genes HEST's recipe on all samples). For each task and fold:

* features: a frozen backbone on HEST's own patches (``patches/{id}.h5``: 224 px at 0.5 µm/px, 112 µm) of
  the spots that have one (for a HEST-1k folder without patch files: the same windows of the WSI);
* target: ``log1p`` of the raw counts of the task's 50 genes (HEST's ``normalize=True``: no library-size
  scaling);
* ``leaderboard``: StandardScaler + PCA(256) fitted on the training split, then
  ``Ridge(solver='lsqr', alpha=100 / (dim * n_genes), fit_intercept=False)``; Pearson r per gene over the
  concatenated test split, mean over genes, mean (and std) over folds: the README leaderboard's protocol
  (HEST ``benchmark.py`` with ``dimreduce: PCA``, ``latent_dim: 256``; HEST commit afd42c3).

Where HEST's code and paper part, the leaderboard's choice is the first column and the other is a column
of its own, each changing one thing:

* ``no_pca`` (HEST#144): paper Table A13, the ridge on the raw features (no scaler, no PCA);
* ``alpha_cv`` (HEST#140): ``--alpha`` is ignored by HEST's code; here alpha is chosen by an inner
  leave-one-sample-out CV on the training split over 10^-2 .. 10^5;
* ``per_sample_r`` (HEST#127): Pearson r per gene within each test sample, then the mean over samples;
* ``genes_train_only`` (HEST#89): the 50 genes chosen (HEST's recipe) on each fold's training samples
  only, not on every sample of the task.

Then stranker on the same frozen features (``stranker_heads``: ``sr.tl.fit(image_features=...)``) and,
with ``--full-fit``, stranker trained end to end on the patches (``stranker_full``), scored the same way
(their own target is scanpy's normalise + log1p; r is computed against HEST's target).

    python benchmarks/hest_bench.py --root hest-bench/ --backbone resnet50     # the leaderboard tasks found
    python benchmarks/hest_bench.py --root hest-bench/ --tasks IDC --full-fit   # one task, end-to-end fit too
    python benchmarks/hest_bench.py --smoke --out /tmp/h                        # seconds, synthetic task (CI)
    python benchmarks/hest_bench.py --smoke --full-fit --out /tmp/h             # and the end-to-end column
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import stranker as sr

HERE = Path(__file__).resolve().parent
# the README leaderboard's nine tasks, as HEST-Bench names their folders (ccRCC = CCRCC, LUAD = LUNG);
# HCC is in the bench data but not on the leaderboard
LEADERBOARD = ["IDC", "PRAD", "PAAD", "SKCM", "COAD", "READ", "CCRCC", "LUNG", "LYMPH_IDC"]
# the leaderboard's own figures for HEST's baseline encoder (README "HEST-Benchmark results (08.30.24)"),
# printed beside a resnet50 run so that the two can be read side by side
PUBLISHED = {"resnet50": {"IDC": 0.4741, "PRAD": 0.3075, "PAAD": 0.3889, "SKCM": 0.4822, "COAD": 0.2528,
                          "READ": 0.0812, "CCRCC": 0.2231, "LUNG": 0.4917, "LYMPH_IDC": 0.2322}}
N_GENES = 50
LATENT_DIM = 256
ALPHAS = 10.0 ** np.arange(-2, 6)
FEATURES = "X_hest_bench"
COLUMNS = ["leaderboard", "no_pca", "alpha_cv", "per_sample_r", "genes_train_only", "stranker_heads",
           "stranker_full"]
SMOKE_FIT = dict(epochs=1, batch_size=32, patch_px=64, image_size=32, backbone="test_resnet", tta=False)


# --------------------------------------------------------------------------------------------
# the task: samples, folds, genes
# --------------------------------------------------------------------------------------------
def folds(task_dir: Path, metas: dict[str, dict]) -> list[tuple[list[str], list[str]]]:
    """Train/test sample ids of each fold: HEST-Bench's ``splits/`` files, else one fold per patient.

    Without split files, samples are grouped by (dataset_title, patient), a missing patient counting as
    'Patient 1' (HEST's ``create_benchmark_data``), and each group is held out once.
    """
    split_dir = task_dir / "splits"
    if split_dir.is_dir():
        import pandas as pd

        n = len(list(split_dir.glob("train_*.csv")))
        out = []
        for i in range(n):
            tr = pd.read_csv(split_dir / f"train_{i}.csv")["sample_id"].astype(str).tolist()
            te = pd.read_csv(split_dir / f"test_{i}.csv")["sample_id"].astype(str).tolist()
            out.append((tr, te))
        return out
    groups: dict[tuple[str, str], list[str]] = {}
    for sid, m in metas.items():
        patient = m.get("patient")
        if patient is None or (isinstance(patient, float) and math.isnan(patient)):
            patient = "Patient 1"
        groups.setdefault((str(m.get("dataset_title", "")), str(patient)), []).append(sid)
    keys = list(groups)
    if len(keys) < 2:
        raise SystemExit(f"{task_dir}: every sample is from one patient; a patient-level fold needs two.")
    return [([s for k2 in keys if k2 != k for s in groups[k2]], groups[k]) for k in keys]


def hest_genes(tables: list, k: int = N_GENES, min_cells_pct: float = 0.10) -> list[str]:
    """HEST's ``get_k_genes(criteria='var')``: the ``k`` most variable of the genes common to all tables.

    A gene is kept in a table when it is detected in at least 10% of its spots; names with 'BLANK' or
    'Control' (Xenium controls) are dropped; the raw counts of all tables are stacked, log1p'd, and
    scanpy's ``highly_variable_genes(n_top_genes=k)`` picks the genes (in table order).
    """
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sps

    common = None
    for t in tables:
        x = t.X
        detected = np.asarray((x > 0).sum(0)).ravel() >= np.ceil(min_cells_pct * t.n_obs)
        names = np.asarray(t.var_names)[detected]
        common = names if common is None else np.intersect1d(common, names)
    common = [g for g in common if "BLANK" not in g and "Control" not in g]
    xs = [t[:, common].X for t in tables]
    x = sps.vstack(xs).tocsr() if any(sps.issparse(a) for a in xs) else np.vstack(xs)
    stacked = ad.AnnData(x.astype(np.float32))
    stacked.var_names = common
    sc.pp.log1p(stacked)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(stacked, n_top_genes=k)
    return stacked.var_names[stacked.var["highly_variable"]][:k].tolist()


def patch_spots_only(sdata):
    """The section restricted to spots that have a HEST patch (HEST-Bench scores those only)."""
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    t = sdata.tables["table"]
    if "hest_patch_corner" not in t.obsm:  # no patch file (a HEST-1k folder read from its WSIs): every spot
        return sdata
    keep = t.obs["hest_patch"].to_numpy() >= 0
    if keep.all():
        return sdata
    sub = t[keep].copy()
    sub.uns.pop("spatialdata_attrs", None)
    return SpatialData(
        images=dict(sdata.images),
        shapes={**dict(sdata.shapes), "spots": sdata.shapes["spots"].loc[sub.obs_names]},
        tables={"table": TableModel.parse(sub, region="spots", region_key="region", instance_key="spot_id")},
    )


def target(sdata, genes: list[str]) -> np.ndarray:
    """``log1p`` of the raw counts of ``genes`` (HEST's bench target)."""
    t = sdata.tables["table"]
    x = t[:, genes].X
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    return np.log1p(x.astype(np.float64))


# --------------------------------------------------------------------------------------------
# probe and scores
# --------------------------------------------------------------------------------------------
def probe(x_tr, y_tr, x_te, *, pca: bool = True, alpha: float | None = None, seed: int = 1) -> np.ndarray:
    """HEST's linear probe: (StandardScaler + PCA 256) then lsqr ridge without intercept."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if pca:
        dim = min(LATENT_DIM, x_tr.shape[0], x_tr.shape[1])  # HEST's PCA fails below 256 samples or features
        pipe = Pipeline([("scaler", StandardScaler()), ("pca", PCA(n_components=dim, random_state=seed))])
        x_tr, x_te = pipe.fit_transform(x_tr), pipe.transform(x_te)
    if alpha is None:
        alpha = 100 / (x_tr.shape[1] * y_tr.shape[1])
    reg = Ridge(solver="lsqr", alpha=alpha, random_state=seed, fit_intercept=False, max_iter=1000)
    return reg.fit(x_tr, y_tr).predict(x_te)


def pearson_genes(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of every gene (column) over the rows; NaN where either side is constant."""
    p, t = pred - pred.mean(0), y - y.mean(0)
    den = np.sqrt((p**2).sum(0) * (t**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (p * t).sum(0) / den, np.nan)


def per_sample_r(pred: np.ndarray, y: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """Per gene: the mean over test samples of its Pearson r within each sample (HEST#127's alternative)."""
    rs = np.stack([pearson_genes(pred[sample == s], y[sample == s]) for s in np.unique(sample)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(rs, 0)


def alpha_by_cv(x_tr, y_tr, sample, seed: int) -> float | None:
    """Alpha of the PCA ridge with the best mean r over leave-one-sample-out folds of the training split."""
    samples = np.unique(sample)
    if len(samples) < 2:
        return None
    scores = []
    for a in ALPHAS:
        r = []
        for s in samples:
            inner = sample != s
            pred = probe(x_tr[inner], y_tr[inner], x_tr[~inner], alpha=a, seed=seed)
            r.append(np.nanmean(pearson_genes(pred, y_tr[~inner])))
        scores.append(np.nanmean(r))
    return float(ALPHAS[int(np.nanargmax(scores))])


def embed(sdata, net, *, image_size: int, batch_size: int) -> None:
    """Frozen features of HEST's own patches (``patches/{id}.h5``) into ``obsm[FEATURES]``.

    The patches are fed as HEST feeds them (resized only when ``image_size`` is not 224, ImageNet
    normalisation). A sample without a patch file (HEST-1k read from its WSI) gets the same 112 µm
    windows from its image through :func:`stranker.pp.embed_patches`.
    """
    import torch

    from stranker.io._hest import PATCH_UM
    from stranker.model.backbones import pixel_stats

    t = sdata.tables["table"]
    path = t.uns["hest"].get("patches_file")
    if path is None:
        sr.pp.embed_patches(sdata, net, size_um=PATCH_UM, image_size=image_size, batch_size=batch_size,
                            key_added=FEATURES)
        return
    rows = t.obs["hest_patch"].to_numpy()
    mean, std = pixel_stats(net)
    net = net.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            img, _, _ = sr.io.read_hest_patches(path, rows[start : start + batch_size])
            x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255
            if x.shape[-1] != image_size:
                x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                                    antialias=True, align_corners=False)
            out.append(net((x - mean) / std).reshape(len(x), -1).numpy())
    t.obsm[FEATURES] = np.concatenate(out).astype(np.float32)


def predict(model, test: list, genes: list[str]) -> np.ndarray:
    """The model's predictions of ``genes`` on the test sections, concatenated in their order."""
    p = model.predict(test)
    p = np.concatenate(p if isinstance(p, list) else [p])
    return p[:, [list(model.genes).index(g) for g in genes]]


# --------------------------------------------------------------------------------------------
# one task
# --------------------------------------------------------------------------------------------
def run_task(task_dir: Path, net, *, image_size: int, seed: int, full_fit: bool, fit_kw: dict,
             batch_size: int) -> dict:
    from stranker.io._hest import hest_ids, hest_metadata

    ids = hest_ids(task_dir)
    metas = {sid: hest_metadata(task_dir, sid) for sid in ids}
    fold_ids = folds(task_dir, metas)
    used = sorted({s for tr, te in fold_ids for s in tr + te})
    missing = sorted(set(used) - set(ids))
    if missing:
        raise SystemExit(f"{task_dir}: the splits name samples with no expression file: {missing}.")
    secs = {sid: patch_spots_only(sd) for sid, sd in zip(used, sr.io.read_hest(task_dir, used), strict=True)}
    gene_file = task_dir / "var_50genes.json"
    genes = (json.loads(gene_file.read_text())["genes"] if gene_file.exists()
             else hest_genes([secs[s].tables["table"] for s in used]))
    t0 = time.perf_counter()
    for sd in secs.values():
        embed(sd, net, image_size=image_size, batch_size=batch_size)
    embed_s = time.perf_counter() - t0
    feats = {s: np.asarray(sd.tables["table"].obsm[FEATURES], dtype=np.float64) for s, sd in secs.items()}

    def stack(sids, g):
        return (np.concatenate([feats[s] for s in sids]), np.concatenate([target(secs[s], g) for s in sids]),
                np.concatenate([np.full(secs[s].tables["table"].n_obs, s) for s in sids]))

    per_fold: dict[str, list] = {c: [] for c in COLUMNS}
    gene_r: dict[str, list] = {c: [] for c in COLUMNS}
    for tr, te in fold_ids:
        x_tr, y_tr, s_tr = stack(tr, genes)
        x_te, y_te, s_te = stack(te, genes)
        pred = probe(x_tr, y_tr, x_te, seed=seed)
        rows = {"leaderboard": pearson_genes(pred, y_te),
                "no_pca": pearson_genes(probe(x_tr, y_tr, x_te, pca=False, seed=seed), y_te),
                "per_sample_r": per_sample_r(pred, y_te, s_te)}
        a = alpha_by_cv(x_tr, y_tr, s_tr, seed)
        rows["alpha_cv"] = (pearson_genes(probe(x_tr, y_tr, x_te, alpha=a, seed=seed), y_te)
                            if a is not None else None)
        g_tr = hest_genes([secs[s].tables["table"] for s in tr])
        _, y2_tr, _ = stack(tr, g_tr)
        _, y2_te, _ = stack(te, g_tr)
        rows["genes_train_only"] = pearson_genes(probe(x_tr, y2_tr, x_te, seed=seed), y2_te)
        train, test = [secs[s] for s in tr], [secs[s] for s in te]
        head_kw = {k: v for k, v in fit_kw.items() if k not in ("backbone", "patch_px", "image_size")}
        heads = sr.tl.fit(train, genes=genes, image_features=FEATURES, seed=seed, **head_kw)
        rows["stranker_heads"] = pearson_genes(predict(heads, test, genes), y_te)
        if full_fit:
            rows["stranker_full"] = pearson_genes(predict(sr.tl.fit(train, genes=genes, seed=seed, **fit_kw),
                                                          test, genes), y_te)
        for c in COLUMNS:
            r = rows.get(c)
            per_fold[c].append(None if r is None else float(np.nanmean(r)))
            if r is not None and c != "genes_train_only":
                gene_r[c].append(r)
    out = {"samples": used, "n_folds": len(fold_ids),
           "folds": [{"train": tr, "test": te} for tr, te in fold_ids],
           "genes": list(genes), "n_spots": {s: int(sd.tables["table"].n_obs) for s, sd in secs.items()},
           "embed_s": round(embed_s, 2), "columns": {}}
    for c in COLUMNS:
        vals = [v for v in per_fold[c] if v is not None]
        if not vals:
            continue
        entry = {"pearson_mean": float(np.mean(vals)), "pearson_std": float(np.std(vals)),
                 "mean_per_split": per_fold[c]}
        if gene_r[c]:
            entry["pearson_per_gene"] = dict(zip(genes, np.nanmean(np.stack(gene_r[c]), 0).round(4).tolist(),
                                                 strict=True))
        out["columns"][c] = entry
    return out


def table(result: dict) -> str:
    """Markdown: one row per task, one column per protocol (mean Pearson r over folds)."""
    cols = [c for c in COLUMNS if any(c in t["columns"] for t in result["tasks"].values())]
    pub = PUBLISHED.get(result["backbone"], {})
    pub = pub if set(result["tasks"]) <= set(pub) else {}
    head = cols + (["published"] if pub else [])
    lines = ["| task | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, t in result["tasks"].items():
        cells = [f"{t['columns'][c]['pearson_mean']:.4f}" if c in t["columns"] else "" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells + ([f"{pub[name]:.4f}"] if pub else [])) + " |")
    avg = [f"{result['average'][c]:.4f}" if c in result["average"] else "" for c in cols]
    if pub:
        avg.append(f"{np.mean([pub[n] for n in result['tasks']]):.4f}")
    lines.append("| **average** | " + " | ".join(avg) + " |")
    return "\n".join(lines)


def smoke_task(task: Path) -> Path:
    """Three synthetic samples (patients A, A, B) laid out as a HEST-Bench task: adata/, patches/,
    splits/ (one fold per patient), var_50genes.json; no WSIs, no metadata."""
    sr.datasets.synthetic_hest(task, n_samples=3, n_spots=60, n_genes=60, patients=["A", "A", "B"])
    (task / "st").rename(task / "adata")
    shutil.rmtree(task / "wsis")
    shutil.rmtree(task / "metadata")
    (task / "splits").mkdir()
    for i, (tr, te) in enumerate([(["SYN2"], ["SYN0", "SYN1"]), (["SYN0", "SYN1"], ["SYN2"])]):
        for name, ids in (("train", tr), ("test", te)):
            rows = "".join(f"{s},patches/{s}.h5,adata/{s}.h5ad\n" for s in ids)
            (task / "splits" / f"{name}_{i}.csv").write_text("sample_id,patches_path,expr_path\n" + rows)
    import anndata as ad

    genes = hest_genes([ad.read_h5ad(task / "adata" / f"SYN{i}.h5ad") for i in range(3)])
    (task / "var_50genes.json").write_text(json.dumps({"genes": genes}))
    return task


def _atomic_json(path: Path, obj: dict) -> None:
    from stranker._atomic import write_file

    write_file(path, lambda p: p.write_text(json.dumps(obj, indent=1, allow_nan=False)))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", help="a HEST-Bench folder (one subfolder per task) or one task folder")
    ap.add_argument("--tasks", nargs="+", default=None, help="task folders under --root (default: the "
                    "leaderboard's nine that are present)")
    ap.add_argument("--backbone", default="resnet50", help="timm model name (HEST's baseline: resnet50)")
    ap.add_argument("--weights", default=None, help="local checkpoint of the backbone")
    ap.add_argument("--random-weights", action="store_true", help="a randomly initialised backbone (tests)")
    ap.add_argument("--image-size", type=int, default=224, help="pixels fed to the backbone (HEST: 224)")
    ap.add_argument("--seed", type=int, default=1, help="HEST's default seed is 1")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of the stranker fits")
    ap.add_argument("--full-fit", action="store_true", help="also train stranker end to end on the patches")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on synthetic HEST samples (CI)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    from stranker.model.encoders import create_backbone

    fit_kw: dict = {} if args.epochs is None else {"epochs": args.epochs}
    if args.smoke:
        root = Path(tempfile.mkdtemp(prefix="hest_bench_smoke_"))
        task_dirs = [smoke_task(root / "SYN")]
        args.backbone, args.image_size, args.random_weights = "test_resnet", 32, True
        fit_kw = dict(SMOKE_FIT)
    else:
        if not args.root:
            ap.error("--root is required (or --smoke)")
        root = Path(args.root).expanduser()
        if (root / "adata").is_dir() or (root / "st").is_dir():
            task_dirs = [root]
        else:
            names = args.tasks or [t for t in LEADERBOARD if (root / t).is_dir()]
            task_dirs = [root / t for t in names]
            absent = [str(d) for d in task_dirs if not d.is_dir()]
            if absent or not task_dirs:
                raise SystemExit(f"No task folder {absent or LEADERBOARD} under {root}.")
    net, weights_source = create_backbone(args.backbone, args.weights, not args.random_weights)
    result = {
        "benchmark": "HEST-Bench",
        "protocol": {
            "reference": "HEST benchmark.py/trainer.py at commit afd42c3 (README leaderboard 08.30.24)",
            "features": f"frozen {args.backbone} on HEST's 224 px patches at 0.5 um/px (112 um), fed at "
                        f"{args.image_size} px, ImageNet normalisation",
            "target": "log1p(raw counts) of the task's 50 genes (var_50genes.json, else HEST's recipe)",
            "leaderboard": "StandardScaler + PCA(256) + Ridge(lsqr, alpha=100/(dim*n_genes), no intercept); "
                           "Pearson per gene over the concatenated test split; mean over genes, then folds",
            "no_pca": "HEST#144, paper Table A13: ridge on the raw features",
            "alpha_cv": "HEST#140: alpha by leave-one-sample-out CV on the training split",
            "per_sample_r": "HEST#127: per-gene r within each test sample, mean over samples",
            "genes_train_only": "HEST#89: 50 genes chosen on each fold's training samples",
            "stranker_heads": "sr.tl.fit(image_features=...) on the same frozen features",
            "stranker_full": "sr.tl.fit on the patches, end to end" if args.full_fit else "not run",
            "folds": "HEST-Bench splits/ files, else one fold per patient",
            "seed": args.seed,
        },
        "backbone": args.backbone, "weights": args.weights, "weights_source": weights_source,
        "smoke": bool(args.smoke), "fit": {k: v for k, v in fit_kw.items()},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count()},
        "tasks": {},
    }
    if weights_source.startswith("random") and not args.random_weights:
        warnings.warn(f"{args.backbone} has no pretrained weights here ({weights_source}): the figures are "
                      "those of a random network, not comparable with the leaderboard.", stacklevel=1)
    t0 = time.perf_counter()
    try:
        for d in task_dirs:
            print(f"HEST-Bench task {d.name} ...", flush=True)
            result["tasks"][d.name] = run_task(d, net, image_size=args.image_size, seed=args.seed,
                                               full_fit=args.full_fit, fit_kw=fit_kw, batch_size=64)
    finally:
        if args.smoke:
            shutil.rmtree(root, ignore_errors=True)
    tasks = list(result["tasks"].values())
    result["average"] = {c: float(np.mean([t["columns"][c]["pearson_mean"] for t in tasks]))
                         for c in COLUMNS if all(c in t["columns"] for t in tasks)}
    result["total_s"] = round(time.perf_counter() - t0, 1)
    _atomic_json(Path(args.out) / "hest_bench.json", result)
    print(table(result))
    return result


if __name__ == "__main__":
    main()
