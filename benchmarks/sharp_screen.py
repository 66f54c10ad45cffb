"""Screen of the sharp finish (issue 17, sixth round): continue a saved fit on sharp patches, score it.

Loads a model saved by ``variants.py --save`` (fitted on every section of patient C but ``--test``),
scores it on ``--test``, then for each ``--spec NAME:EPOCHS:LR[:JITTER]`` continues a fresh copy of it
(student restarted from the EMA teacher, a fresh AdamW and one-cycle schedule) for EPOCHS at LR with
resolution jitter JITTER (1, the default: sharp patches only) and scores it again; the retrieval bank
is recomputed. ``--freeze-genes`` leaves the gene branch as it was (as ``sr.tl.fit``'s finish does);
``--means`` also scores weighted means of the finished and the saved model's predictions. One row per
score is appended to ``results/sharp_screen.jsonl``. The figures of the library's finish come from
``accuracy.py`` (``stranker`` against ``stranker-no-sharp``).

    python benchmarks/sharp_screen.py --model fits/def-C5-s0 --test C5 --spec s4:4:3e-4 j4:4:3e-4:3
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import accuracy as A
import torch

import stranker as sr
from stranker.tl._training import TrainingInputs, reference_bank, training_sections
from stranker.train import train

HERE = Path(__file__).resolve().parent


def main(argv=None):
    ap = A.saved_fit_parser(__doc__, HERE / "results" / "sharp_screen.jsonl",
                            "seed of the saved fit (the finish draws seed+1000)")
    ap.add_argument("--spec", nargs="+", default=[], help="NAME:EPOCHS:LR[:JITTER] finishes to run")
    ap.add_argument("--freeze-genes", action="store_true", help="do not train the gene branch in the finish")
    ap.add_argument("--means", type=float, nargs="*", default=[],
                    help="also score these weights of the finished model in a mean with the saved one")
    a = ap.parse_args(argv)
    sr.settings.progress = False
    train_secs, test, genes, true, heg = A.fold(a.test)
    rows, score = A.saved_fit_rows(a, true, heg)

    base = sr.Model.load(a.model)
    before = base.predict(test)
    score("saved", before, {})
    secs, _, geometry = training_sections(train_secs, base.config, set(), key_added=None, aggregate=True)
    inputs = TrainingInputs.of(secs, list(genes), base.config, geometry, layer=None, target_sum=1e4,
                               stream=False)
    for spec in a.spec:
        name, epochs, lr, *jit = spec.split(":")
        m = sr.Model.load(a.model)
        al = m.aligner
        al.student.load_state_dict(al.teacher.state_dict())  # from the EMA weights
        if a.freeze_genes:
            al.gene.requires_grad_(False)
        al.cfg = replace(m.config, resolution_jitter=float(jit[0]) if jit else 1.0, epochs=int(epochs),
                         lr=float(lr), sharp_epochs=0)
        t0 = time.perf_counter()
        train(al, inputs.data, device=torch.device("cpu"), seed=a.seed + 1000, progress=False)
        extra = {"epochs": int(epochs), "lr": float(lr), "jitter": al.cfg.resolution_jitter,
                 "freeze_genes": a.freeze_genes, "finish_s": round(time.perf_counter() - t0, 1)}
        al.cfg = m.config
        m.bank = reference_bank(al, inputs, torch.device("cpu"))
        after = m.predict(test)
        score(name, after, extra)
        for w in a.means:
            score(f"{name}@mean{w:g}", w * after + (1 - w) * before, {**extra, "mean_weight": w})
    with open(a.out, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    main()
