"""Accuracy on real tissue: her2st sections, the 785-gene list, against baselines and published recipes.

Leave-one-section-out over the sections found in ``$STRANKER_DATA_DIR`` (the dev split C2, C3, C4 -> C5
is the fold whose test section is C5), three seeds per row, pooled figures over the held-out sections.
Rows are appended to ``results/accuracy.json`` as they finish and a run skips the rows already there,
so an interrupted run (or one spread over several sessions) continues where it stopped. Per-row
sufficient statistics (per gene: n, means, centred sums, errors) go to ``results/accuracy_stats.npz``
so that pooled Pearson r over all held-out spots is exact without keeping predictions.

    python benchmarks/accuracy.py                      # full grid (hours on 2 CPU cores)
    python benchmarks/accuracy.py --seeds 0 --tests C5 # the dev split, one seed
    python benchmarks/accuracy.py --smoke --out /tmp/a # seconds, synthetic data (what CI runs)
    python benchmarks/accuracy.py --ablations --seeds 0 # the default with one part out or in
    python benchmarks/accuracy.py --backbone uni        # rows on a pretrained backbone ("stranker@uni")
    python benchmarks/accuracy.py --tests A1 --seeds 0 # the other patient: train C2-C5, test A1

Without ``--backbone`` the rows use a randomly initialised ResNet-18 (``pretrained=False``: no weights
offline); with it, pretrained weights (cache or download) or an error saying how to get them.

Besides the leave-one-section-out folds over patient C, the fold C2-C5 -> A1 (patient A, run when
A1's files are in ``$STRANKER_DATA_DIR``) asks what a model does on a patient it never saw. Each row
carries Spearman's rank correlation per gene (``spearman_all``, ``spearman_heg``) beside Pearson's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

import stranker as sr
from stranker._expression import lognorm
from stranker.section import as_sections

HERE = Path(__file__).resolve().parent
SECTIONS = ["C5", "C2", "C3", "C4"]  # C5 first: that fold is the dev split
DEV_TEST = "C5"
OTHER_PATIENT = ["A1"]  # held out after training on every section of SECTIONS (split 'patient')
BASELINES = ("mean", "ridge-stain", "ridge-backbone")
PRESETS = ("stnet", "bleep", "mclstexp", "rankbygene", "stranker")
# `--ablations`: the default with one part taken out or one option put back, each against `stranker`
ABLATIONS = {
    "stranker-no-corr": ("stranker", {"w_corr": 0.0}),  # MSE alone: the default of issue 17's third round
    "stranker-no-resjitter": ("stranker", {"resolution_jitter": 1.0}),  # sharp training patches only
    "stranker-12epochs": ("stranker", {"epochs": 12}),  # the default before 20 epochs
    "stranker-12epochs-no-resjitter": ("stranker", {"epochs": 12, "resolution_jitter": 1.0}),
    "stnet-20epochs": ("stnet", {"epochs": 20}),  # control: the supervised baseline at the default's epochs
    "stnet+lowrank": ("stnet", {"predict_rank": "auto"}),  # control: the baseline, projected as the default
    "stranker-no-clip": ("stranker", {"w_clip": 0.0, "predict": "head"}),  # no aligned embedding: head only
    "stranker-no-sharp": ("stranker", {"sharp_epochs": 0}),  # no sharp finish
    # predictions not projected onto the training targets' principal axes: the default before it
    "stranker-no-lowrank": ("stranker", {"predict_rank": 0}),
    "stranker+rank": ("stranker", {"w_rank": 0.03}),  # the ranking term at its weight before issue 17
    "stranker+distill": ("stranker", {"w_distill": 0.03}),
    "stranker+context": ("stranker", {"spot_context": True}),
    "stranker+stain": ("stranker", {"use_stain": True}),
    "stranker+2scales": ("stranker", {"scales": (1.0, 2.0), "cnn_scales": 2}),
    "stranker+rank+distill": ("stranker", {"w_rank": 0.03, "w_distill": 0.03}),
    "stranker+hed": ("stranker", {"hed_jitter": 0.02}),  # stain jitter in HED space (Tellez et al. 2018)
    "stranker+reinhard": ("stranker", {"stain_norm": "reinhard"}),  # per-patch Reinhard normalisation
    "stranker+section": ("stranker", {"target_scale": "section"}),  # targets standardised per section
    "stranker+adapt": ("stranker", {"adapt": True}),  # AdaBN on the section predicted
    # transductive: the mean teacher also trains on the H&E (not the expression) of the section predicted
    "stranker+unlabeled-test": ("stranker", {"w_consistency": 10.0, "unlabeled_test": True}),
}
PREDICT_OPTIONS = ("adapt",)  # options of ABLATIONS that go to predict, not fit
STATS = ("n", "mx", "my", "sxx", "syy", "sxy", "sae", "sse")
SMOKE = dict(epochs=1, backbone="test_resnet", patch_px=64, image_size=32)


SHARED = HERE.parent.parent / "shared" / "data" / "her2st"
if "STRANKER_DATA_DIR" not in os.environ and SHARED.is_dir():
    os.environ["STRANKER_DATA_DIR"] = str(SHARED)  # the project's copy, as `make bench` sets it


def genes_785() -> list[str]:
    path = Path(os.environ.get("STRANKER_DATA_DIR", SHARED)) / "genes_hvg785.txt"
    return [g.strip() for g in path.read_text().split() if g.strip()]


def truth(sdata, genes):
    """The target of ``sr.tl.fit``'s default: log1p of counts per 1e4 over all genes of the table."""
    sp = as_sections(sdata, need_image=False)[0]
    return lognorm(sp.expression(), cols=sp.gene_columns(genes))


def suff_stats(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-gene statistics (rows as in ``STATS``) from which Pearson r, MAE and MSE pool exactly."""
    p, t = pred.astype(np.float64), true.astype(np.float64)
    mx, my = p.mean(0), t.mean(0)
    dp, dt = p - mx, t - my
    n = np.full_like(mx, len(p))
    return np.stack([n, mx, my, (dp**2).sum(0), (dt**2).sum(0), (dp * dt).sum(0),
                     np.abs(p - t).sum(0), ((p - t) ** 2).sum(0)])


def pool(stats: list[np.ndarray]) -> np.ndarray:
    """Combine per-fold statistics as if all held-out spots were one section (Chan et al.)."""
    acc = stats[0].copy()
    for s in stats[1:]:
        n1, n2 = acc[0], s[0]
        n = n1 + n2
        dx, dy = s[1] - acc[1], s[2] - acc[2]
        f = n1 * n2 / n
        acc[3] += s[3] + dx * dx * f
        acc[4] += s[4] + dy * dy * f
        acc[5] += s[5] + dx * dy * f
        acc[1] += dx * n2 / n
        acc[2] += dy * n2 / n
        acc[6] += s[6]
        acc[7] += s[7]
        acc[0] = n
    return acc


def scores_from_stats(st: np.ndarray, heg: np.ndarray | None, heg_train: np.ndarray | None) -> dict:
    """ACG, HEG (the test's 50 most expressed unless ``heg`` is given), HEG of the training sections,
    MAE, MSE.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        r = st[5] / np.sqrt(st[3] * st[4])  # NaN for a constant prediction
    heg = np.argsort(-st[2])[:50] if heg is None else heg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN mean -> NaN, stored as null
        return _scores(r, heg, heg_train, st)


def spearman_scores(pred: np.ndarray, true: np.ndarray, st: np.ndarray) -> dict:
    """Mean Spearman rho over all genes and over the test's 50 most expressed (HEG)."""
    from stranker._metrics import spearman_per_gene

    rho = spearman_per_gene(pred, true)
    heg = np.argsort(-st[2])[:50]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {"spearman_all": float(np.nanmean(rho)), "spearman_heg": float(np.nanmean(rho[heg]))}


def _scores(r, heg, heg_train, st):
    return {
        "pcc_all": float(np.nanmean(r)), "pcc_heg": float(np.nanmean(r[heg])),
        "pcc_heg_train": None if heg_train is None else float(np.nanmean(r[heg_train])),
        "mae": float(st[6].sum() / st[0].sum()), "mse": float(st[7].sum() / st[0].sum()),
    }


def stain_matrix(sdata, size, out_px, scales=(1.0, 2.0)):
    import torch

    from stranker.model.stain import stain_features

    p = sr.pp.patches(sdata, size=size, scales=scales, out_px=out_px)
    x = torch.from_numpy(p).permute(0, 1, 4, 2, 3).float() / 255
    return torch.cat([stain_features(x[:, i]) for i in range(x.shape[1])], 1).numpy()


def backbone_matrix(sdata, seed, size, out_px, name, pretrained=True):
    """Frozen backbone features (HEST protocol; random init unless a pretrained backbone is asked)."""
    import torch

    from stranker.model.backbones import create_backbone, named

    torch.manual_seed(seed)
    if pretrained and named(name) is not None:  # a foundation model: its normalisation and physical size
        light = _light(sdata)
        sr.pp.embed_patches(light, name, key_added="X_bench")
        return np.asarray(light.tables["table"].obsm["X_bench"])
    net = create_backbone(name, pretrained=pretrained, download=sr.settings.allow_download)[0].eval()
    p = sr.pp.patches(sdata, size=size, out_px=out_px)
    x = torch.from_numpy(p).permute(0, 3, 1, 2).float() / 255
    x = (
        (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    )
    with torch.no_grad():
        return torch.cat([net(x[i : i + 64]).flatten(1) for i in range(0, len(x), 64)]).numpy()


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


def run_one(method, train, test, genes, seed, opts):
    ytr = np.concatenate([truth(s, genes) for s in train])
    size, out_px = opts.get("patch_px", 224), opts.get("image_size", 112)
    t0 = time.perf_counter()
    if method == "mean":
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        pred = np.repeat(ytr.mean(0, keepdims=True), as_sections(test, need_image=False)[0].n_spots, 0)
    elif method in ("ridge-stain", "ridge-backbone"):
        if method == "ridge-stain":
            feat = lambda s: stain_matrix(s, size, out_px)  # noqa: E731
        else:
            feat = lambda s: backbone_matrix(s, seed, size, out_px, opts.get("backbone", "resnet18"),  # noqa: E731
                                             opts.get("pretrained", True))
        xtr = np.concatenate([feat(s) for s in train])
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        pred = ridge_predict(xtr, ytr, feat(test), pca=256 if method == "ridge-backbone" else None)
    else:
        base, extra = ABLATIONS.get(method, (method, {}))
        extra = dict(extra)
        at_predict = {k: extra.pop(k) for k in PREDICT_OPTIONS if k in extra}
        if extra.pop("unlabeled_test", False):
            extra["unlabeled"] = test
        model = sr.tl.fit([_light(s) for s in train], genes=genes, method=base, seed=seed, **extra, **opts)
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        pred = model.predict(test, **at_predict)
    return pred, ytr, fit_s, time.perf_counter() - t1


def saved_fit_parser(doc: str, out: Path, seed_help: str) -> argparse.ArgumentParser:
    """Arguments of a screen of a saved fit: ``--model``, ``--test``, ``--seed`` and ``--out``."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--model", required=True, help="folder of a saved fit")
    ap.add_argument("--test", required=True, help="held-out section the model was fitted without")
    ap.add_argument("--seed", type=int, default=0, help=seed_help)
    ap.add_argument("--out", default=str(out), help="file the rows are appended to")
    return ap


def saved_fit_rows(a: argparse.Namespace, true: np.ndarray, heg: np.ndarray) -> tuple[list, Any]:
    """The rows of a screen of a saved fit, and ``score(name, pred, extra)``, which adds (and prints) one."""
    rows: list[dict] = []

    def score(name, pred, extra):
        rows.append({"name": name, "test": a.test, "seed": a.seed, "model": Path(a.model).name,
                     **scores(pred, true, heg), **extra})
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}),
              flush=True)

    return rows, score


def scores(pred: np.ndarray, true: np.ndarray, heg: np.ndarray) -> dict:
    """ACG, HEG (the columns ``heg``) and Spearman of ``pred`` against ``true``: a screen's row."""
    st = suff_stats(pred, true)
    return {**scores_from_stats(st, None, heg), **spearman_scores(pred, true, st)}


def predict_parts(model, test) -> dict[str, np.ndarray]:
    """The predictions of ``test`` by ``model``'s regression head and by retrieval, each alone."""
    cfg, parts, kept = model.config, {}, model.config.predict
    try:
        for kind in ("head", "retrieval"):
            cfg.predict = kind
            parts[kind] = model.predict(test)
    finally:
        cfg.predict = kept
    return parts


def fold(test: str) -> tuple:
    """One her2st fold for the screens: the training sections (patient C but ``test``), the held-out
    section, the 785 genes, its measured targets and the 50 most expressed genes of the training sections."""
    train = [_light(sr.datasets.her2st(s)) for s in SECTIONS if s != test]
    held = sr.datasets.her2st(test)
    genes = genes_785()
    ytr = np.concatenate([truth(s, genes) for s in train])
    return train, held, genes, truth(held, genes), np.argsort(-ytr.mean(0))[:50]


def _light(sdata):
    """A shallow copy, so that fit's in-sample results do not pile up on the cached sections."""
    from spatialdata import SpatialData

    return SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes),
                       tables={k: t.copy() for k, t in sdata.tables.items()})


def load_sections(args):
    if args.smoke:
        secs = sr.datasets.synthetic(3, 60, n_genes=60, seed=0)
        names = [f"S{i}" for i in range(len(secs))]
        return dict(zip(names, secs, strict=True)), list(secs[0].tables["table"].var_names), names[-1]
    data = {s: sr.datasets.her2st(s) for s in SECTIONS}
    return data, genes_785(), DEV_TEST


def other_patient(args) -> dict:
    """The sections of OTHER_PATIENT that this run tests and whose files are present."""
    if args.smoke:
        return {}
    folder = Path(os.environ.get("STRANKER_DATA_DIR", SHARED))
    want = [s for s in OTHER_PATIENT if args.tests is None or s in args.tests]
    return {s: sr.datasets.her2st(s) for s in want if (folder / f"{s}.tsv.gz").exists()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(BASELINES + PRESETS))
    ap.add_argument("--ablations", action="store_true",
                    help="run the ablation rows (ABLATIONS) instead of the default methods")
    ap.add_argument("--tests", nargs="+", default=None, help="held-out sections (default: all, C5 first)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="recompute rows that are already in the results")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on synthetic data (CI)")
    ap.add_argument("--backbone", default=None,
                    help="pretrained backbone of the rows, e.g. uni (rows named METHOD@BACKBONE); "
                         "default: random-init ResNet-18")
    ap.add_argument("--out", default=str(HERE / "results"),
                    help="folder for accuracy.json and accuracy_stats.npz")
    ap.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                    help="add the rows of other --out folders (parallel runs) to --out; print the tables")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(Path(args.out), [Path(d) for d in args.merge])
    sr.settings.progress = False
    sr.settings.verbosity = 1
    opts = dict(SMOKE) if args.smoke else {}
    opts.update({"backbone": args.backbone} if args.backbone else {"pretrained": False})
    if args.smoke and args.seeds == [0, 1, 2]:
        args.seeds = [0]
    if args.epochs is not None:
        opts["epochs"] = args.epochs
    if args.ablations:
        args.methods = list(ABLATIONS)
    data, genes, dev_test = load_sections(args)
    names = list(data)
    data.update(other_patient(args))
    tests = args.tests or list(data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jpath, spath = out / "accuracy.json", out / "accuracy_stats.npz"
    rows = json.loads(jpath.read_text())["rows"] if jpath.exists() else []
    stats = dict(np.load(spath)) if spath.exists() else {}
    rows = [r for r in rows if r["test"] != "pooled"]
    done = {(r["method"], r["test"], r["seed"]) for r in rows if _key(r) in stats}
    clash = sorted({json.dumps(r.get("opts", {}), sort_keys=True) for r in rows}
                   - {json.dumps(opts, sort_keys=True)})
    if clash and not args.force:  # a resumed grid must not mix settings (e.g. 4-epoch rows with 12-epoch)
        raise SystemExit(f"{jpath} holds rows run with options {', '.join(clash)}, not this run's "
                         f"{json.dumps(opts, sort_keys=True)}: pass --out with another folder "
                         "(or --force to recompute the rows this run makes).")
    for seed in args.seeds:  # seed-major, so that a partial run holds whole seeds
        for test in tests:
            train = [data[s] for s in names if s != test]  # every section of patient C for A1
            for method in args.methods:
                s = 0 if method == "mean" else seed
                label = f"{method}@{args.backbone}" if args.backbone and method != "mean" else method
                if (label, test, s) in done and not args.force:
                    continue
                pred, ytr, fit_s, pred_s = run_one(method, train, data[test], genes, s, opts)
                true = truth(data[test], genes)
                st = suff_stats(pred, true)
                split = "loso" if test in names else "patient"
                row = {"method": label, "split": split, "test": test, "dev": test == dev_test, "seed": s,
                       **scores_from_stats(st, None, np.argsort(-ytr.mean(0))[:50]),
                       **spearman_scores(pred, true, st),
                       "fit_s": round(fit_s, 2), "predict_s": round(pred_s, 2), "opts": opts}
                rows = [r for r in rows if (r["method"], r["test"], r["seed"]) != (label, test, s)] + [row]
                stats[_key(row)] = st.astype(np.float64)
                done.add((label, test, s))
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
                      flush=True)
                _save(jpath, spath, rows, stats, names)
    return report(rows, stats, names)


def report(rows: list[dict], stats: dict, names: list[str]) -> list[dict]:
    """Print the main, per-fold and ablation tables; return the rows with the pooled ones."""
    rows = rows + pooled_rows(rows, stats, names)
    print(table(rows))
    print()
    print(fold_table(rows))
    if any(r["method"] in ABLATIONS for r in rows):
        print()
        print(ablation_table(rows))
        print()
        print(seed_table(rows))
    return rows


def merge(out: Path, others: list[Path]) -> list[dict]:
    """Add the rows and statistics of ``others`` (folders of runs made in parallel) to ``out``."""
    jpath, spath = out / "accuracy.json", out / "accuracy_stats.npz"
    rows = json.loads(jpath.read_text())["rows"] if jpath.exists() else []
    stats = dict(np.load(spath)) if spath.exists() else {}
    rows = [r for r in rows if r["test"] != "pooled"]
    for d in others:
        new = [r for r in json.loads((d / "accuracy.json").read_text())["rows"] if r["test"] != "pooled"]
        keys = {_key(r) for r in new}
        rows = [r for r in rows if _key(r) not in keys] + new
        stats.update(dict(np.load(d / "accuracy_stats.npz")))
    names = [s for s in SECTIONS if any(r["test"] == s for r in rows)]
    out.mkdir(parents=True, exist_ok=True)
    _save(jpath, spath, rows, stats, names)
    return report(rows, stats, names)


def _key(row):
    return f"{row['method']}|{row['test']}|{row['seed']}"


def pooled_rows(rows, stats, names):
    """One row per (method, seed) whose every fold has run: Pearson r over all held-out spots at once."""
    out = []
    for method, seed in sorted({(r["method"], r["seed"]) for r in rows}):
        keys = [f"{method}|{t}|{seed}" for t in names]
        if all(k in stats for k in keys):
            st = pool([stats[k] for k in keys])
            out.append({"method": method, "split": "loso", "test": "pooled", "dev": False, "seed": seed,
                        **scores_from_stats(st, None, None)})
    return out


def _save(jpath, spath, rows, stats, names):
    tmp = jpath.with_suffix(".tmp")
    clean = [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
             for r in rows + pooled_rows(rows, stats, names)]  # r of a constant prediction is undefined: null
    tmp.write_text(json.dumps({"rows": clean, "machine": machine(), "stats_rows": list(STATS)}, indent=1))
    np.savez_compressed(spath.with_suffix(".tmp.npz"), **stats)
    os.replace(spath.with_suffix(".tmp.npz"), spath)
    os.replace(tmp, jpath)


def machine():
    import torch

    return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def table(rows):
    """Markdown table, mean ± sd over seeds (and folds): dev fold, LOSO per-fold mean, LOSO pooled."""
    import pandas as pd

    df = pd.DataFrame(rows)
    df = df[df["method"].str.split("@").str[0].isin(BASELINES + PRESETS)]  # ablations have their own table
    folds = df[(df["test"] != "pooled") & (df["split"] == "loso")]
    # compare like with like: only the held-out sections that every method has run on
    n_methods = folds["method"].nunique()
    common = [t for t, d in folds.groupby("test") if d["method"].nunique() == n_methods]
    label = f"LOSO, mean of folds ({', '.join(sorted(common))})"
    parts = [("dev (→ C5)" if "C5" in set(df["test"]) else "dev", df[df["dev"]]),
             (label, folds[folds["test"].isin(common)]), ("LOSO, pooled", df[df["test"] == "pooled"])]
    parts += [(f"C2–C5 → {t} (other patient)", df[df["test"] == t]) for t in OTHER_PATIENT]
    lines = ["| split | method | runs | ACG | HEG (test) | Spearman (all / HEG) | HEG (train) | MAE | MSE "
             "| fit s | predict s |", "|---" * 11 + "|"]
    order = {m: i for i, m in enumerate(BASELINES + PRESETS)}
    for label, d in parts:
        if label.startswith("LOSO, mean"):  # a seed counts once it has every common fold
            n_folds = d.groupby(["method", "seed"])["test"].transform("nunique")
            d = d[n_folds == len(common)]
        if d.empty:
            continue
        # average over folds within a seed first, then mean ± sd over seeds
        per_seed = d.groupby(["method", "seed"]).mean(numeric_only=True)
        for method in sorted(d["method"].unique(), key=lambda m: (order.get(m.split("@")[0], 99), m)):
            s = per_seed.loc[method]
            n = int((d["method"] == method).sum())

            def f(k, s=s):
                if k not in s or s[k].isna().all():
                    return "–"
                sd = s[k].std() if len(s) > 1 else 0.0
                return f"{s[k].mean():.3f} ± {sd:.3f}"

            t = lambda k, s=s: "–" if k not in s or s[k].isna().all() else f"{s[k].mean():.0f}"  # noqa: E731
            rho = "–" if "spearman_all" not in s or s["spearman_all"].isna().all() else (
                f"{s['spearman_all'].mean():.3f} / {s['spearman_heg'].mean():.3f}")
            lines.append(f"| {label} | {method} | {n} | {f('pcc_all')} | {f('pcc_heg')} | {rho} | "
                         f"{f('pcc_heg_train')} | {s['mae'].mean():.3f} | {s['mse'].mean():.3f} | "
                         f"{t('fit_s')} | {t('predict_s')} |")
    return "\n".join(lines)


def fold_table(rows):
    """Markdown table per held-out section: ACG and HEG (test), mean ± sd over seeds; best per row in bold."""
    import pandas as pd

    df = pd.DataFrame(rows)
    df = df[(df["test"] != "pooled") & df["method"].isin(BASELINES[1:] + PRESETS)]
    order = [m for m in BASELINES + PRESETS if m in set(df["method"])]
    tests = [t for t in SECTIONS if t in set(df["test"])] + sorted(set(df["test"]) - set(SECTIONS))
    stats = df.groupby(["test", "method"])[["pcc_all", "pcc_heg"]].agg(["mean", "std", "count"])
    lines = ["| held out | " + " | ".join(order) + " |", "|---" * (len(order) + 1) + "|"]
    for t in tests:
        for k, name in (("pcc_all", "ACG"), ("pcc_heg", "HEG")):
            means = {m: stats.loc[(t, m), (k, "mean")] for m in order if (t, m) in stats.index}
            best = max(means, key=means.get) if means else None
            cells = []
            for m in order:
                if m not in means:
                    cells.append("–")
                    continue
                sd = stats.loc[(t, m), (k, "std")]
                n = int(stats.loc[(t, m), (k, "count")])
                cell = f"{means[m]:.3f}" + (f" ± {sd:.3f}" if n > 1 else "") + f" ({n})"
                cells.append(f"**{cell}**" if m == best else cell)
            lines.append(f"| {t} {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ablation_frame(rows):
    """The ablation rows and ``stranker``'s on the folds and seeds they ran, the tests in table order, the
    groups (the other patient; patient C) and ``stranker``'s scores by (test, seed); None if none ran."""
    import pandas as pd

    df = pd.DataFrame(rows)
    df = df[(df["test"] != "pooled") & df["method"].isin(("stranker", *ABLATIONS))]
    ran = df[df["method"] != "stranker"]
    if ran.empty:
        return None
    pairs = set(zip(ran["test"], ran["seed"], strict=True))  # the folds and seeds the ablations ran
    df = df[[(t, s) in pairs for t, s in zip(df["test"], df["seed"], strict=True)]]
    tests = [t for t in OTHER_PATIENT + SECTIONS + sorted(set(ran["test"]) - set(OTHER_PATIENT + SECTIONS))
             if t in set(ran["test"])]
    other = [t for t in tests if t in OTHER_PATIENT]
    groups = [(name, ts) for name, ts in ((f"on {', '.join(other)}", other),
                                          ("on patient C", [t for t in tests if t not in other])) if ts]
    ref = df[df["method"] == "stranker"].set_index(["test", "seed"])[["pcc_all", "pcc_heg"]]
    methods = ["stranker", *[m for m in ABLATIONS if m in set(df["method"])]]
    return df, tests, groups, ref, methods


def _paired(df, ref, method):
    """``method``'s ACG / HEG by (test, seed), and their change from ``stranker`` where it ran the same fold
    and seed."""
    d = df[df["method"] == method].set_index(["test", "seed"])[["pcc_all", "pcc_heg"]]
    return d, (d - ref.reindex(d.index)).dropna()


def _change(paired, ts, many: bool) -> str:
    """Mean change (ACG / HEG) over the paired rows of tests ``ts``, with the number of folds if ``many``."""
    g = paired[paired.index.get_level_values("test").isin(ts)]
    if g.empty:
        return "–"
    n = g.index.get_level_values("test").nunique()
    return (f"{g['pcc_all'].mean():+.3f} / {g['pcc_heg'].mean():+.3f}"
            + (f" ({n} fold{'s' * (n > 1)})" if many else ""))


def ablation_table(rows):
    """Markdown table of the ablations against ``stranker``: ACG / HEG (test) per held-out section (mean
    over the seeds it ran; – where it did not), and the change from ``stranker`` over the same sections
    and seeds, on the other patient and on patient C apart (they often move in opposite directions)."""
    frame = _ablation_frame(rows)
    if frame is None:
        return ""
    df, tests, groups, ref, methods = frame
    lines = ["| method | runs | " + " | ".join(tests) + " | "
             + " | ".join(f"change {name}" for name, _ in groups) + " |",
             "|---" * (len(tests) + 2 + len(groups)) + "|"]
    for method in methods:
        d, paired = _paired(df, ref, method)
        per_test = d.groupby(level="test").mean()
        cells = [f"{per_test.loc[t, 'pcc_all']:.3f} / {per_test.loc[t, 'pcc_heg']:.3f}"
                 if t in per_test.index else "–" for t in tests]
        changes = ["–" if method == "stranker" else _change(paired, ts, len(ts) > 1) for _, ts in groups]
        lines.append(f"| {method} | {len(d)} | " + " | ".join(cells) + " | " + " | ".join(changes) + " |")
    return "\n".join(lines)


def seed_table(rows):
    """Markdown table of each ablation's change from ``stranker`` seed by seed (the same fit seed paired),
    on the other patient and on patient C apart: whether a change holds in every seed, not only on
    average."""
    frame = _ablation_frame(rows)
    if frame is None:
        return ""
    df, _, groups, ref, methods = frame
    seeds = sorted(set(df["seed"]))
    lines = ["| method | change | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---" * (len(seeds) + 2) + "|"]
    for method in methods[1:]:
        _, paired = _paired(df, ref, method)
        for name, ts in groups:
            by_seed = [_change(paired[paired.index.get_level_values("seed") == s], ts, len(ts) > 1)
                       for s in seeds]
            if set(by_seed) != {"–"}:
                lines.append(f"| {method} | {name} | " + " | ".join(by_seed) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
