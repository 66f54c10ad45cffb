"""One variant of the model on one her2st fold: quick comparisons of options before a full grid.

Fits ``sr.tl.fit`` with ``--method`` and the options in ``--opts`` (JSON, any field of
``sr.model.Config``) on every section of patient C except ``--test``, predicts ``--test`` (``A1``: the
other patient) and appends one row (ACG, HEG, Spearman, fit seconds) to ``results/variants.jsonl``.
With ``--adapt`` a second row scores the same model predicted with ``adapt=True``; with ``--blends``
one row per weight of the regression head in the blend with retrieval (0: retrieval only, 1: the
head only), from one fit (the blend is linear, so the head's and retrieval's predictions are read once
each and mixed). Rows of this
script are single runs of one seed; the figures a default rests on come from ``accuracy.py``.

    python benchmarks/variants.py --name rj3 --test A1 --opts '{"resolution_jitter": 3}' --adapt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import accuracy as A
import numpy as np

import stranker as sr

HERE = Path(__file__).resolve().parent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True, help="label of the row")
    ap.add_argument("--test", default="A1", help="held-out section (A1: train on C2-C5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="stranker")
    ap.add_argument("--opts", default="{}", help="JSON of Config fields")
    ap.add_argument("--adapt", action="store_true", help="also score predict(adapt=True)")
    ap.add_argument("--blends", type=float, nargs="*", default=[],
                    help="also score these weights of the head in the blend (one fit)")
    ap.add_argument("--smooth", type=float, nargs="*", default=[],
                    help="also score each prediction averaged with its neighbours within these radii "
                         "(in spot pitches)")
    ap.add_argument("--out", default=str(HERE / "results" / "variants.jsonl"))
    a = ap.parse_args(argv)
    sr.settings.progress = False
    train = [A._light(sr.datasets.her2st(s)) for s in A.SECTIONS if s != a.test]
    test = sr.datasets.her2st(a.test)
    genes = A.genes_785()
    opts = json.loads(a.opts)
    t0 = time.perf_counter()
    model = sr.tl.fit(train, genes=genes, method=a.method, seed=a.seed, pretrained=False, **opts)
    fit_s = time.perf_counter() - t0
    ytr = np.concatenate([A.truth(s, genes) for s in train])
    true = A.truth(test, genes)
    rows, preds = [], {}
    for suffix, adapt in [("", False)] + ([("+adapt", True)] if a.adapt else []):
        pred = model.predict(test, adapt=adapt)
        preds[a.name + suffix] = pred
        st = A.suff_stats(pred, true)
        rows.append({"name": a.name + suffix, "method": a.method, "test": a.test, "seed": a.seed,
                     **A.scores_from_stats(st, None, np.argsort(-ytr.mean(0))[:50]),
                     **A.spearman_scores(pred, true, st), "fit_s": round(fit_s, 1), "opts": opts})
        print(json.dumps(rows[-1]), flush=True)
    if a.blends:
        cfg, parts = model.config, {}
        for kind in ("head", "retrieval"):
            cfg.predict = kind
            parts[kind] = model.predict(test)
        for b in a.blends:
            pred = b * parts["head"] + (1 - b) * parts["retrieval"]
            preds[f"{a.name}@blend{b:g}"] = pred
            st = A.suff_stats(pred, true)
            rows.append({"name": f"{a.name}@blend{b:g}", "method": a.method, "test": a.test, "seed": a.seed,
                         **A.scores_from_stats(st, None, np.argsort(-ytr.mean(0))[:50]),
                         **A.spearman_scores(pred, true, st), "fit_s": round(fit_s, 1),
                         "opts": {**opts, "predict": "blend", "blend": b}})
            print(json.dumps(rows[-1]), flush=True)
    if a.smooth:
        from scipy.spatial import cKDTree

        centers = A.as_sections(test, need_image=False)[0].centers
        tree = cKDTree(centers)
        pitch = np.median(tree.query(centers, k=2)[0][:, 1])
        for radius in a.smooth:
            pairs = tree.query_pairs(radius * pitch, output_type="ndarray")
            n = len(centers)
            import scipy.sparse as sps

            w = sps.coo_matrix((np.ones(2 * len(pairs)), (np.r_[pairs[:, 0], pairs[:, 1]],
                                np.r_[pairs[:, 1], pairs[:, 0]])), shape=(n, n)).tocsr() + sps.eye(n)
            w = sps.diags(1 / np.asarray(w.sum(1)).ravel()) @ w
            for r0 in list(rows):
                if "@smooth" in r0["name"]:
                    continue
                pred = w @ preds[r0["name"]]
                st = A.suff_stats(pred, true)
                rows.append({**r0, "name": f"{r0['name']}@smooth{radius:g}",
                             **A.scores_from_stats(st, None, np.argsort(-ytr.mean(0))[:50]),
                             **A.spearman_scores(pred, true, st)})
                print(json.dumps(rows[-1]), flush=True)
    with open(a.out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    main()
