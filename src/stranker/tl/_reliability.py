"""Section-level cross-fitting at the end of a fit: fold models, and what they say a prediction is worth.

Each fold model trains (``reliability_epochs`` of the epochs) on the training sections but one group
(a section, or a patient where every table names one: ``uns['patient']``) and predicts the held-out
group: out-of-fold predictions and embeddings for every training spot. :mod:`stranker._reliability`
turns them into the per-gene estimate of r on new sections, the conformal quantiles of per-spot
intervals and the shift calibration; :class:`Reliability` holds them, is saved with the model (in its
bank), and applies them to a new section's embeddings and predictions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .. import _reliability as rel
from .._settings import logger
from ..section import Section

_PREFIX = "rel_"  # bank keys of the reliability record (saved with the model's tensors)


@dataclass
class Reliability:
    """The reliability record of a fitted model (``model.reliability_record``).

    Attributes
    ----------
    r_groups
        ``(n_groups, n_genes)`` Pearson r of the out-of-fold predictions on each held-out group.
    estimate, lo, hi, p
        Per gene: estimated r on a new section, its interval at ``level``, one-sided p-value of r > 0.
    q
        Per gene: conformal quantile (at ``level``) of the out-of-fold residuals over the spots' difficulty.
    train_emb, train_section
        The model's teacher embeddings of its training spots and their section index (the bank that a
        new spot's distance to the training tissue is measured against).
    scale
        Median distance of training spots to the training spots of other sections (the unit of difficulty).
    shift_calibration
        Shift score (median difficulty) of each held-out group's spots against the other groups.
    groups
        Names of the held-out groups.
    level, fold_epochs
        Interval level; epochs of each fold model.
    """

    r_groups: np.ndarray
    estimate: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    p: np.ndarray
    q: np.ndarray
    train_emb: np.ndarray
    train_section: np.ndarray
    scale: float
    shift_calibration: np.ndarray
    groups: list[str]
    level: float
    fold_epochs: int

    def to_bank(self) -> dict[str, np.ndarray]:
        """Return the arrays to save with the model's bank (names prefixed ``rel_``)."""
        out = {k: np.asarray(getattr(self, k)) for k in ("r_groups", "estimate", "lo", "hi", "p", "q",
                                                       "train_emb", "train_section", "shift_calibration")}
        out["scale"] = np.array([self.scale])
        out["level"] = np.array([self.level])
        out["fold_epochs"] = np.array([self.fold_epochs])
        out["groups"] = np.frombuffer("\n".join(self.groups).encode(), dtype=np.uint8).copy()
        return {_PREFIX + k: v for k, v in out.items()}

    @classmethod
    def from_bank(cls, bank: dict[str, Any]) -> Reliability | None:
        """Return the record saved in a bank, or ``None`` (fitted without it, or saved before it existed)."""
        if _PREFIX + "q" not in bank:
            return None
        g = {k[len(_PREFIX):]: np.asarray(v) for k, v in bank.items() if k.startswith(_PREFIX)}
        names = bytes(g["groups"].astype(np.uint8)).decode().split("\n") if g["groups"].size else []
        return cls(r_groups=g["r_groups"], estimate=g["estimate"], lo=g["lo"], hi=g["hi"], p=g["p"],
                   q=g["q"], train_emb=g["train_emb"].astype(np.float32),
                   train_section=g["train_section"].astype(np.int64),
                   scale=float(g["scale"][0]), shift_calibration=g["shift_calibration"], groups=names,
                   level=float(g["level"][0]), fold_epochs=int(g["fold_epochs"][0]))

    def table(self, genes: list[str], fdr: float) -> Any:
        """Return per-gene reliability: ``cv_pcc``, ``cv_pcc_lo``, ``cv_pcc_hi``, ``p``, ``reliable``."""
        import pandas as pd

        return pd.DataFrame({
            "cv_pcc": self.estimate, "cv_pcc_lo": self.lo, "cv_pcc_hi": self.hi, "p": self.p,
            "reliable": rel.reliable_genes(self.estimate, self.p, fdr),
        }, index=pd.Index(list(genes), name="gene"))

    def difficulty(self, emb: np.ndarray) -> np.ndarray:
        """Return per spot the distance of its embedding to the training tissue, in :attr:`scale` units."""
        return rel.difficulty(rel.nn_distance(emb, self.train_emb), self.scale)

    def intervals(self, pred: np.ndarray, difficulty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return lower and upper bounds ``pred ∓ q_gene * difficulty_spot``."""
        half = difficulty[:, None].astype(np.float32) * self.q[None, :].astype(np.float32)
        return pred - half, pred + half

    def shift(self, difficulty: np.ndarray) -> dict[str, Any]:
        """Return the shift record of a section: score, conformal p-value and whether it is ``shifted``."""
        score = float(np.median(difficulty)) if len(difficulty) else float("nan")
        p = rel.shift_p_value(score, self.shift_calibration)
        return {"score": score, "p_value": p, "shifted": bool(score > np.max(self.shift_calibration)),
                "calibration": [float(v) for v in self.shift_calibration], "groups": list(self.groups)}


def _group_names(secs: list[Section], most: int) -> tuple[list[list[int]], list[str]]:
    """Return the held-out groups (section indices) and their names.

    One per patient when every table names one (``uns['patient']``) and they are at least two, else one
    per section; more than ``most`` are merged round-robin.
    """
    patients = [sp.table.uns.get("patient") if sp.table is not None else None for sp in secs]
    if all(p is not None for p in patients) and len(set(map(str, patients))) >= 2:
        names = list(dict.fromkeys(map(str, patients)))
        groups = [[i for i, p in enumerate(patients) if str(p) == n] for n in names]
    else:
        names = [sp.name for sp in secs]
        groups = [[i] for i in range(len(secs))]
    if len(groups) > most:
        merged: list[list[int]] = [[] for _ in range(most)]
        merged_names: list[list[str]] = [[] for _ in range(most)]
        for j, (g, n) in enumerate(zip(groups, names, strict=True)):
            merged[j % most].extend(g)
            merged_names[j % most].append(n)
        groups, names = merged, ["+".join(n) for n in merged_names]
    return groups, names


def fold_config(cfg: Any) -> Any:
    """Return a fold model's configuration: ``reliability_epochs`` of the epochs (at least one)."""
    f = float(cfg.reliability_epochs)
    return replace(cfg, epochs=max(1, round(cfg.epochs * f)), sharp_epochs=round(cfg.sharp_epochs * f),
                   reliability=False)


def in_sample(model: Any, inputs: Any, device: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """Return teacher embeddings and predictions of every training section (inputs held in memory)."""
    return [model.infer(sp, device=str(device), **_held(model, inputs, s))
            for s, sp in enumerate(inputs.sections)]


def cross_fit(model: Any, inputs: Any, device: Any, seed: int,
              insample: list[tuple[np.ndarray, np.ndarray]]) -> Reliability | None:
    """Train the fold models of a fitted ``model``; return its reliability record (``None``: too few groups).

    ``insample``: the model's own embeddings and predictions of its training sections (:func:`in_sample`).
    """
    import torch

    from ..model import Aligner
    from ..train import train
    from ..train.loop import kept_rng
    from ._model import Model
    from ._record import RunRecord
    from ._training import reference_bank

    cfg = model.config
    groups, names = _group_names(inputs.sections, int(cfg.reliability_folds))
    if len(groups) < 2:
        logger.warning(
            "Reliability (per-gene r on new sections, intervals, shift) needs at least two training sections "
            "to hold out one at a time: not estimated. Fit on several sections, or pass reliability=False."
        )
        return None
    fcfg = fold_config(cfg)
    section = inputs.data.section.numpy()
    n, g = len(section), len(model.genes)
    oof = np.empty((n, g), dtype=np.float32)
    group_of = np.full(n, -1, dtype=np.int64)
    folds: list[Any] = []  # kept in memory beside the model (not saved): an ensemble to measure
    logger.info(f"Reliability: {len(groups)} fold models of {fcfg.epochs + fcfg.sharp_epochs} epochs, each "
                f"without one of {names}.")
    for gi, held in enumerate(groups):
        keep = [i for i in range(len(inputs.sections)) if i not in held]
        sub = inputs.subset(keep, fcfg)
        with kept_rng(device):
            torch.manual_seed(seed + 1 + gi)
            al = Aligner(fcfg, g, feature_dim=inputs.feature_dim)
            train(al, sub.data, device=device, seed=seed + 1 + gi, progress=False,
                  identity={"genes": list(model.genes), "fold": names[gi]})
        meta = RunRecord(target_mean=sub.mean.astype(np.float32), target_std=sub.std.astype(np.float32),
                         **model.geometry.to_meta())
        fold = Model(fcfg, model.genes, aligner=al, meta=meta, bank=reference_bank(al, sub, device))
        folds.append(fold)
        for s in held:
            rows = np.flatnonzero(section == s)
            oof[rows] = fold.infer(inputs.sections[s], device=str(device), **_held(fold, inputs, s))[1]
            group_of[rows] = gi
    truth = inputs.values.astype(np.float32)
    r_groups = np.stack([rel.pearson_columns(oof[group_of == gi], truth[group_of == gi])
                         for gi in range(len(groups))])
    level = float(cfg.interval_level)
    estimate, lo, hi, p = rel.gene_reliability(r_groups, level)
    # difficulty in the fitted model's space: each training spot against the other sections
    train_emb = np.concatenate([e for e, _ in insample]).astype(np.float32)
    other = rel.other_section_distance(train_emb, section)
    scale = float(max(np.median(other), 1e-12))
    d = rel.difficulty(other, scale)
    q = rel.conformal_quantile(np.abs(truth - oof) / d[:, None], level)
    calibration = np.array([np.median(d[group_of == gi]) for gi in range(len(groups))])
    model.fold_models = folds
    return Reliability(r_groups=r_groups, estimate=estimate, lo=lo, hi=hi, p=p, q=q, train_emb=train_emb,
                       train_section=section.astype(np.int64), scale=scale, shift_calibration=calibration,
                       groups=names, level=level, fold_epochs=int(fcfg.epochs + fcfg.sharp_epochs))


def _held(model: Any, inputs: Any, s: int) -> dict[str, Any]:
    held = inputs.held(s)
    return {"features": held} if model.config.image_features is not None else {"patches": held}
