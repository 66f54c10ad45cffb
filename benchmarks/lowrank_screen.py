"""Screen of predictions projected onto the training targets' principal axes (issue 17, seventh round).

Loads a model saved by ``variants.py --save`` (fitted on every section of patient C but ``--test``),
predicts ``--test`` once with the regression head and once by retrieval, and scores the blend (and the
head alone) as they are and projected onto the leading principal axes of the training targets (the
model's retrieval bank): ``'auto'`` (Gavish & Donoho's threshold, what ``predict_rank='auto'`` does)
and each of ``--ranks``, in the targets' ``log1p`` space (the library's) and, with ``--z``, on
standardised genes. ``--shrink`` also scores a soft projection that keeps that fraction of what lies
off the axes. One row per score is appended to ``results/lowrank_screen.jsonl``. The figures of the
library's projection come from ``accuracy.py`` (``stranker`` against ``stranker-no-lowrank``).

    python benchmarks/lowrank_screen.py --model fits/def-C5-s0 --test C5 --ranks 8 16 32 64 --shrink 0.25 0.5
"""

from __future__ import annotations

import json
from pathlib import Path

import accuracy as A
import numpy as np

import stranker as sr
from stranker.model.lowrank import expression_axes

HERE = Path(__file__).resolve().parent


def main(argv=None):
    ap = A.saved_fit_parser(__doc__, HERE / "results" / "lowrank_screen.jsonl",
                            "seed of the saved fit (for the row)")
    ap.add_argument("--ranks", type=int, nargs="*", default=[8, 16, 32, 64, 128])
    ap.add_argument("--z", action="store_true", help="also project standardised genes")
    ap.add_argument("--shrink", type=float, nargs="*", default=[],
                    help="also keep these fractions of the part off the axes")
    a = ap.parse_args(argv)
    sr.settings.progress = False
    _, test, _, true, heg = A.fold(a.test)
    model = sr.Model.load(a.model)
    cfg = model.config
    cfg.predict_rank = 0  # the parts unprojected; projected here
    parts = A.predict_parts(model, test)
    parts["blend"] = cfg.blend * parts["head"] + (1 - cfg.blend) * parts["retrieval"]
    values = np.asarray(model.bank["values"], dtype=np.float64)
    rows, score = A.saved_fit_rows(a, true, heg)

    spaces = {"log": np.ones(values.shape[1])}
    if a.z:
        spaces["z"] = values.std(0) + 1e-6
    ranks = ["auto", *a.ranks]
    axes_of = {(space, rank): expression_axes(values / scale, rank)  # the same for every kind of prediction
               for space, scale in spaces.items() for rank in ranks}
    for kind in ("blend", "head"):
        score(kind, parts[kind], {"rank": 0})
        for space, scale in spaces.items():
            for rank in ranks:
                center, axes = axes_of[space, rank]
                off = parts[kind] / scale - center
                inside = off @ axes @ axes.T
                for keep in [0.0, *a.shrink]:
                    pred = (center + inside + keep * (off - inside)) * scale
                    score(f"{kind}@{space}{rank}" + (f"@keep{keep:g}" if keep else ""), pred,
                          {"rank": int(axes.shape[1]), "asked": rank, "space": space, "keep": keep})
    with open(a.out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    main()
