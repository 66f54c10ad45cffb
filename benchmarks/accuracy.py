"""Accuracy on real tissue: her2st sections, the 785-gene list, against baselines and presets.

Usage: python benchmarks/accuracy.py [--splits dev loso] [--seeds 0 1 2] [--methods ...] [--epochs N]
Reads the sections in $STRANKER_DATA_DIR; writes benchmarks/results/accuracy.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

import stranker as sr
from stranker._spots import as_spots
from stranker.pp._genes import lognorm
from stranker.tl._evaluate import pearson_per_gene

HERE = Path(__file__).resolve().parent
SECTIONS = ["C2", "C3", "C4", "C5"]
BASELINES = ("mean", "ridge-stain", "ridge-backbone")
PRESETS = ("stnet", "bleep", "mclstexp", "rankbygene", "stranker")


def genes_785() -> list[str]:
    path = Path(os.environ.get("STRANKER_DATA_DIR", HERE.parent.parent / "shared/data/her2st")) / "genes_hvg785.txt"
    return [g.strip() for g in path.read_text().split() if g.strip()]


def truth(sdata, genes):
    sp = as_spots(sdata, need_image=False)[0]
    return lognorm(sp.expression())[:, sp.table.var_names.get_indexer(genes)]


def scores(pred, true, heg_train):
    r = pearson_per_gene(pred, true)
    heg_test = np.argsort(-true.mean(0))[:50]
    return {
        "pcc_all": float(np.nanmean(r)), "pcc_heg": float(np.nanmean(r[heg_test])),
        "pcc_heg_train": float(np.nanmean(r[heg_train])),
        "mae": float(np.mean(np.abs(pred - true))), "mse": float(np.mean((pred - true) ** 2)),
    }


def stain_matrix(sdata, scales=(1.0, 2.0)):
    import torch

    from stranker.model.stain import stain_features

    p = sr.pp.patches(sdata, size=224, scales=scales, out_px=112)
    x = torch.from_numpy(p).permute(0, 1, 4, 2, 3).float() / 255
    return torch.cat([stain_features(x[:, i]) for i in range(x.shape[1])], 1).numpy()


def backbone_matrix(sdata, seed, name="resnet18"):
    import timm
    import torch

    torch.manual_seed(seed)
    net = timm.create_model(name, pretrained=False, num_classes=0).eval()
    p = sr.pp.patches(sdata, size=224, out_px=112)
    x = torch.from_numpy(p).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.cat([net(x[i : i + 64]) for i in range(0, len(x), 64)]).numpy()


def ridge_predict(xtr, ytr, xte, pca=None):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(xtr)
    a, b = sc.transform(xtr), sc.transform(xte)
    if pca:
        p = PCA(n_components=min(pca, a.shape[0] - 1, a.shape[1]), random_state=0).fit(a)
        a, b = p.transform(a), p.transform(b)
    return RidgeCV(alphas=np.logspace(-1, 5, 13)).fit(a, ytr).predict(b)


def run_one(method, train, test, genes, seed, epochs):
    ytr = np.concatenate([truth(s, genes) for s in train])
    t0 = time.perf_counter()
    if method == "mean":
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        pred = np.repeat(ytr.mean(0, keepdims=True), test.tables["table"].n_obs, 0)
    elif method in ("ridge-stain", "ridge-backbone"):
        feat = stain_matrix if method == "ridge-stain" else (lambda s: backbone_matrix(s, seed))
        xtr = np.concatenate([feat(s) for s in train])
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        pred = ridge_predict(xtr, ytr, feat(test), pca=256 if method == "ridge-backbone" else None)
    else:
        kw = {} if epochs is None else {"epochs": epochs}
        model = sr.tl.fit([_light(s) for s in train], genes=genes, method=method, seed=seed, **kw)
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        pred = model.predict(test)
    return pred, ytr, fit_s, time.perf_counter() - t1


def _light(sdata):
    from spatialdata import SpatialData

    return SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes), tables={"table": sdata.tables["table"].copy()})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--splits", nargs="+", default=["dev", "loso"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(BASELINES + PRESETS))
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "accuracy.json"))
    args = ap.parse_args()
    sr.settings.progress = False
    sr.settings.verbosity = 1
    genes = genes_785()
    data = {s: sr.datasets.her2st(s) for s in SECTIONS}
    folds = []
    if "dev" in args.splits:
        folds.append(("dev", ["C2", "C3", "C4"], "C5"))
    if "loso" in args.splits:
        folds += [("loso", [s for s in SECTIONS if s != t], t) for t in SECTIONS]
    rows = []
    out = Path(args.out)
    prev = json.loads(out.read_text())["rows"] if out.exists() else []
    keep = [r for r in prev if r["method"] not in args.methods or r["split"] not in args.splits]
    for split, tr, te in folds:
        for method in args.methods:
            for seed in args.seeds if method != "mean" else [0]:
                train = [data[s] for s in tr]
                pred, ytr, fit_s, pred_s = run_one(method, train, data[te], genes, seed, args.epochs)
                heg_train = np.argsort(-ytr.mean(0))[:50]
                row = {"method": method, "split": split, "test": te, "seed": seed,
                       **scores(pred, truth(data[te], genes), heg_train), "fit_s": fit_s, "predict_s": pred_s}
                rows.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({"rows": keep + rows, "machine": machine()}, indent=1))
    print(table(keep + rows))


def machine():
    import torch

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def table(rows):
    import pandas as pd

    df = pd.DataFrame(rows)
    g = df.groupby(["split", "method"])
    agg = g[["pcc_all", "pcc_heg", "pcc_heg_train", "mae", "mse", "fit_s"]].agg(["mean", "std"])
    lines = ["| split | method | n | ACG | HEG (test) | HEG (train) | MAE | MSE | fit s |", "|---" * 9 + "|"]
    for (split, method), r in agg.iterrows():
        n = len(g.get_group((split, method)))
        f = lambda k: f"{r[(k, 'mean')]:.3f} ± {0 if np.isnan(r[(k, 'std')]) else r[(k, 'std')]:.3f}"  # noqa: E731
        lines.append(f"| {split} | {method} | {n} | {f('pcc_all')} | {f('pcc_heg')} | {f('pcc_heg_train')} | "
                     f"{r[('mae', 'mean')]:.3f} | {r[('mse', 'mean')]:.3f} | {r[('fit_s', 'mean')]:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
