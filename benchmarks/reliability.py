"""Which predictions to believe, measured: per-gene reliability, per-spot intervals, the shift score.

For each fold (train on patient C but one section, test on it; or train on C2-C5, test on A1 of
patient A) one default fit with its reliability estimated by section-level cross-fitting on the
training sections only, then ``sr.tl.predict`` on the held-out section and, against its measured
expression (the 785 genes):

- interval coverage per gene at the model's level (mean over genes and its spread) and mean width;
- Spearman's rank correlation between the estimated r (``var['stranker_cv_pcc']``) and the measured r;
- the precision of ``var['stranker_reliable']``: the share of reliable genes whose measured r > 0;
- the section's shift score, p-value and ``shifted``;
- the mean r of the fit itself, of the mean of its fold models (the ensemble), and of their average;
- fit time with reliability (seconds, this machine).

Rows are appended to ``results/reliability.jsonl`` (per-gene arrays to ``results/reliability_genes.npz``);
a rerun skips the folds already there.

    python benchmarks/reliability.py                  # A1 and the four LOSO folds (about an hour on 2 cores)
    python benchmarks/reliability.py --tests A1 C5    # some folds
    python benchmarks/reliability.py --smoke --out /tmp/r   # seconds, synthetic data (what CI runs)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

import stranker as sr
from stranker._metrics import pearson_per_gene

HERE = Path(__file__).resolve().parent


def measure(model, test, true, genes) -> dict:
    """Scores of one fitted model on one held-out section with measured expression ``true``."""
    from scipy.stats import spearmanr

    sd = _light(test)
    t0 = time.perf_counter()
    sr.tl.predict(model, sd)
    pred_s = time.perf_counter() - t0
    t = sd.tables[next(iter(sd.tables))]
    cols = t.var_names.get_indexer(genes)
    pred = np.asarray(t.layers["stranker"])[:, cols]
    lo, hi = np.asarray(t.layers["stranker_lower"])[:, cols], np.asarray(t.layers["stranker_upper"])[:, cols]
    r = pearson_per_gene(pred, true)
    cov = ((true >= lo) & (true <= hi)).mean(0)
    est = t.var["stranker_cv_pcc"].to_numpy()[cols]
    reliable = t.var["stranker_reliable"].to_numpy()[cols].astype(bool)
    ok = np.isfinite(r) & np.isfinite(est)
    rel_rec = model.reliability_record
    mine = [list(model.genes).index(g) for g in genes]  # r_groups are in the model's gene order
    with np.errstate(invalid="ignore"):
        raw = np.tanh(np.nanmean(np.arctanh(np.clip(rel_rec.r_groups, -0.999999, 0.999999)), 0))[mine]
    ens = np.mean([f.predict(test) for f in model.fold_models], axis=0) if model.fold_models else None
    rec = t.uns["stranker"]
    row = {
        "coverage_mean": float(np.mean(cov)), "coverage_sd": float(np.std(cov)),
        "coverage_p10": float(np.quantile(cov, 0.1)), "width_mean": float(np.mean(hi - lo)),
        "level": rec["interval_level"], "fdr": rec["fdr"],
        "spearman_est_vs_measured": float(spearmanr(est[ok], r[ok]).statistic),
        # the same fits, each gene's estimate from its own held-out groups alone (no shrinking)
        "spearman_unshrunk_vs_measured": float(spearmanr(raw[ok & np.isfinite(raw)],
                                                         r[ok & np.isfinite(raw)]).statistic),
        # the fit's own r on its training spots (the prior the estimates are shrunk towards), alone
        "spearman_fit_r_vs_measured": float(spearmanr(rel_rec.fit_r[mine][ok], r[ok]).statistic)
        if len(rel_rec.fit_r) else None,
        "shrink_weight": rel_rec.shrink, "fold_epochs": rel_rec.fold_epochs,
        "n_reliable": int(reliable.sum()),
        "reliable_precision": float(np.mean(r[reliable] > 0)) if reliable.any() else None,
        "reliable_mean_r": float(np.nanmean(r[reliable])) if reliable.any() else None,
        "n_negative_r": int((r < 0).sum()), "n_negative_r_reliable": int((r[reliable] < 0).sum()),
        "mean_r": float(np.nanmean(r)),
        "mean_r_ensemble": float(np.nanmean(pearson_per_gene(ens, true))) if ens is not None else None,
        "mean_r_fit_plus_ensemble": float(np.nanmean(pearson_per_gene((pred + ens) / 2, true)))
        if ens is not None else None,
        "shift_score": rec["shift"]["score"], "shift_p": rec["shift"]["p_value"],
        "shifted": rec["shift"]["shifted"], "shift_reasons": rec["shift"]["reasons"],
        "shift_calibration": rec["shift"]["calibration"], "coarser": rec["shift"]["coarser"],
        "difficulty_median": float(np.median(t.obs["stranker_difficulty"])),
        "difficulty_iqr": [float(v) for v in np.quantile(t.obs["stranker_difficulty"], [0.25, 0.75])],
        "predict_s": round(pred_s, 2),
    }
    arrays = {"measured_r": r, "cv_pcc": est, "cv_pcc_unshrunk": raw, "coverage": cov, "reliable": reliable,
              "r_groups": rel_rec.r_groups[:, mine]}
    return row, arrays


def _light(sdata):
    from spatialdata import SpatialData

    return SpatialData(images=dict(sdata.images), shapes=dict(sdata.shapes),
                       tables={k: t.copy() for k, t in sdata.tables.items()})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tests", nargs="+", default=None,
                    help="held-out sections (default: A1, C5, C2, C3, C4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (two runs side by side: 1)")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on synthetic data (CI)")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder of reliability.jsonl")
    ap.add_argument("--save", default=None, help="folder to keep each fitted model in (TEST-sSEED)")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sr.settings.progress = False
    sr.settings.verbosity = 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jpath, npath = out / "reliability.jsonl", out / "reliability_genes.npz"
    done = {(r["test"], r["seed"]) for r in map(json.loads, jpath.read_text().splitlines())} \
        if jpath.exists() else set()
    if args.smoke:
        secs = sr.datasets.synthetic(4, 60, n_genes=40, seed=0)
        data = {f"S{i}": s for i, s in enumerate(secs)}
        genes = list(secs[0].tables["table"].var_names)
        opts = dict(epochs=2, backbone="test_resnet", patch_px=64, image_size=32, pretrained=False)
        patient_c, tests = list(data), args.tests or ["S3"]
    else:
        import accuracy  # the her2st folds and targets of the accuracy benchmark

        data = {s: sr.datasets.her2st(s) for s in accuracy.SECTIONS}
        patient_c = list(data)
        data.update(accuracy.other_patient(argparse.Namespace(smoke=False, tests=None)))
        genes = accuracy.genes_785()
        opts = {"pretrained": False}
        tests = args.tests or ["A1", "C5", "C2", "C3", "C4"]
    arrays = dict(np.load(npath)) if npath.exists() else {}
    for test in tests:
        if (test, args.seed) in done:
            continue
        train = [_light(data[s]) for s in patient_c if s != test]
        t0 = time.perf_counter()
        model = sr.tl.fit(train, genes=genes, seed=args.seed, **opts)
        fit_s = time.perf_counter() - t0
        if args.save:
            model.save(Path(args.save) / f"{test}-s{args.seed}")
        true = _truth(data[test], genes)
        row, arr = measure(model, data[test], true, genes)
        row = {"test": test, "seed": args.seed, "split": "loso" if test in patient_c else "patient",
               "train": [s for s in patient_c if s != test], "fit_s": round(fit_s, 1),
               "train_s": round(model.meta.train_seconds, 1), **row, "opts": opts,
               "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "code": _code()}
        with jpath.open("a") as f:
            f.write(json.dumps(row) + "\n")
        arrays.update({f"{test}/{args.seed}/{k}": v for k, v in arr.items()})
        np.savez(npath, **arrays)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                          if k not in ("opts", "train")}), flush=True)


def _code() -> str:
    """The commit that made a row (``+changes`` when the working tree differed from it)."""
    import subprocess

    def git(*a):
        return subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--", "../src") else "")


def _truth(sdata, genes):
    from stranker._expression import lognorm
    from stranker.section import as_sections

    sp = as_sections(sdata, need_image=False)[0]
    return lognorm(sp.expression(), cols=sp.gene_columns(genes))


if __name__ == "__main__":
    main()
