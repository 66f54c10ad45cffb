"""One variant of the model on one her2st fold: quick comparisons of options before a full grid.

Fits ``sr.tl.fit`` with ``--method`` and the options in ``--opts`` (JSON, any field of
``sr.model.Config``) on every section of patient C except ``--test``, predicts ``--test`` (``A1``: the
other patient) and appends one row (ACG, HEG, Spearman, fit seconds) to ``results/variants.jsonl``.
With ``--adapt`` a second row scores the same model predicted with ``adapt=True``; with ``--blends``
one row per weight of the regression head in the blend with retrieval (0: retrieval only, 1: the
head only), from one fit (the blend is linear, so the head's and retrieval's predictions are read once
each and mixed); with ``--smooth`` each of those predictions is also scored after averaging every spot
with the spots within the given radii (in spot pitches; a radius graph, unlike the kNN graph of
``sr.pp.smooth``); with ``--unlabeled-test`` the fit also reads the held-out section's H&E, unlabelled
(``fit(unlabeled=...)``, with ``w_consistency`` in ``--opts``); with ``--bn-match`` the model is also
scored with the batch-norm statistics of its teacher renewed on up to 2048 training patches lowered in
resolution by each given factor (1: sharp; A1's patches are upsampled about 2.3x), the statistics a
slide of that resolution would meet; with ``--res-tta`` the model is also scored with its predictions
averaged over views of the test patches lowered by 1 and each given factor up to the one named in the
row (a test-time mean over the resolutions that resolution jitter trained on); ``--save DIR`` keeps
the fitted model (``sr.tl.Model.save``) for scoring later. Rows
of this script are single runs of one seed; the figures a default rests on come from ``accuracy.py``.

    python benchmarks/variants.py --name rj3 --test A1 --opts '{"resolution_jitter": 3}' --adapt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import accuracy as A
import numpy as np
import torch

import stranker as sr
from stranker.model.adapt import adapt_norm
from stranker.model.augment import lower_resolution
from stranker.train.loop import to_input

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
    ap.add_argument("--bn-match", type=float, nargs="*", default=[],
                    help="also score the teacher with batch-norm statistics of training patches lowered "
                         "in resolution by these factors")
    ap.add_argument("--res-tta", type=float, nargs="*", default=[],
                    help="also score predictions averaged over views lowered by 1 and each of these "
                         "factors up to each one in turn")
    ap.add_argument("--save", default=None, help="folder to save the fitted model in (NAME-TEST-sSEED)")
    ap.add_argument("--unlabeled-test", action="store_true",
                    help="fit with unlabeled=the held-out section (its H&E only; w_consistency in --opts)")
    ap.add_argument("--out", default=str(HERE / "results" / "variants.jsonl"))
    a = ap.parse_args(argv)
    sr.settings.progress = False
    train, test, genes, true, heg = A.fold(a.test)
    opts = json.loads(a.opts)
    t0 = time.perf_counter()
    unl = dict(unlabeled=sr.datasets.her2st(a.test)) if a.unlabeled_test else {}
    model = sr.tl.fit(train, genes=genes, method=a.method, seed=a.seed, pretrained=False, **unl, **opts)
    fit_s = time.perf_counter() - t0
    if a.save:
        model.save(Path(a.save) / f"{a.name}-{a.test}-s{a.seed}", overwrite=True)
    rows, preds = [], {}

    def score(name, pred, row_opts):
        preds[name] = pred
        rows.append({"name": name, "method": a.method, "test": a.test, "seed": a.seed,
                     **A.scores(pred, true, heg), "fit_s": round(fit_s, 1), "opts": row_opts,
                     **({"unlabeled": a.test} if a.unlabeled_test else {})})
        print(json.dumps(rows[-1]), flush=True)

    for suffix, adapt in [("", False)] + ([("+adapt", True)] if a.adapt else []):
        score(a.name + suffix, model.predict(test, adapt=adapt), opts)
    if a.blends:
        parts = A.predict_parts(model, test)
        for b in a.blends:
            score(f"{a.name}@blend{b:g}", b * parts["head"] + (1 - b) * parts["retrieval"],
                  {**opts, "predict": "blend", "blend": b})
    if a.smooth:
        centers = A.as_sections(test, need_image=False)[0].centers
        for radius in a.smooth:
            w = neighbour_mean(centers, radius)
            for r0 in [r for r in rows if "@smooth" not in r["name"]]:
                name = r0["name"]
                score(f"{name}@smooth{radius:g}", w @ preds[name], {**r0["opts"], "smooth": radius})
    if a.bn_match:
        keep = model.aligner.teacher
        patches = training_patches(model, train)
        for factor in a.bn_match:
            try:
                model.aligner.teacher = adapt_norm(keep, lowered(patches, factor))
                score(f"{a.name}@bn{factor:g}", model.predict(test), {**opts, "bn_match": factor})
            finally:
                model.aligner.teacher = keep
    if a.res_tta:
        keep = model.aligner.teacher
        for top in a.res_tta:
            try:
                model.aligner.teacher = ResolutionMean(keep, [1.0, *[f for f in a.res_tta if f <= top]])
                score(f"{a.name}@rtta{top:g}", model.predict(test), {**opts, "res_tta": top})
            finally:
                model.aligner.teacher = keep
    with open(a.out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


class ResolutionMean(torch.nn.Module):
    """A branch whose ``forward_tta`` is the mean over views lowered in resolution by ``factors``."""

    def __init__(self, branch, factors):
        super().__init__()
        self.branch, self.factors = branch, factors

    def forward_tta(self, x, tta):
        outs = [self.branch.forward_tta(lower(x, f), tta) for f in self.factors]
        return torch.stack([e for e, _ in outs]).mean(0), torch.stack([p for _, p in outs]).mean(0)


def training_patches(model, train, most: int = 2048) -> np.ndarray:
    """Up to ``most`` patches of the training spots as the model reads them, spread evenly over sections."""
    rng = np.random.default_rng(0)
    out = []
    for s in train:
        sp = A.as_sections(s)[0]
        idx = np.sort(rng.choice(sp.n_spots, min(sp.n_spots, most // len(train)), replace=False))
        out.append(model.patch_reader(sp).read(idx))
    return np.concatenate(out)


def lowered(patches: np.ndarray, factor: float, batch_size: int = 64):
    """Batches of ``patches`` as model inputs, lowered in resolution by ``factor`` (1: unchanged)."""
    for start in range(0, len(patches), batch_size):
        x = to_input(torch.from_numpy(patches[start : start + batch_size]), torch.device("cpu"))
        yield lower(x, factor)


def lower(x, factor: float):
    """Model inputs ``(..., 3, h, w)`` lowered in resolution by ``factor`` (``x`` itself when it is 1)."""
    return x if factor <= 1 else lower_resolution(x.reshape(-1, *x.shape[-3:]), factor).reshape(x.shape)


def neighbour_mean(centers: np.ndarray, radius: float):
    """Sparse row-stochastic matrix: each spot's mean over itself and the spots within ``radius`` pitches."""
    import scipy.sparse as sps
    from scipy.spatial import cKDTree

    tree = cKDTree(centers)
    pitch = np.median(tree.query(centers, k=2)[0][:, 1])
    pairs = tree.query_pairs(radius * pitch, output_type="ndarray")
    n = len(centers)
    ij = (np.r_[pairs[:, 0], pairs[:, 1]], np.r_[pairs[:, 1], pairs[:, 0]])
    w = sps.coo_matrix((np.ones(2 * len(pairs)), ij), shape=(n, n)).tocsr() + sps.eye(n)
    return sps.diags(1 / np.asarray(w.sum(1)).ravel()) @ w


if __name__ == "__main__":
    main()
