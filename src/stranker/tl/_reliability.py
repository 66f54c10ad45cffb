"""Section-level cross-fitting at the end of a fit: fold models, and what they say a prediction is worth.

Each fold model trains (``reliability_epochs`` of the epochs) on the training sections but one group
(a section, or a patient where every table names one: ``uns['patient']``) and predicts the held-out
group: out-of-fold predictions and embeddings for every training spot. :mod:`stranker._reliability`
turns them into the per-gene estimate of r on new sections, the conformal quantiles of per-spot
intervals and the shift calibration; :class:`Reliability` holds them, is saved with the model (in its
bank), and applies them to a new section's embeddings and predictions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .. import _reliability as rel
from .._settings import logger
from ..section import Section

_PREFIX = "rel_"  # bank keys of the reliability record (saved with the model's tensors)
RESOLUTION_TOLERANCE = 1.25  # a section this much coarser than every training section is shifted


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
    banks
        Per image branch (``'sharp'``; ``'coarse'`` for a model with a sharp finish): the model's teacher
        embeddings of its training spots read with that branch (``emb``), the unit of difficulty
        (``scale``: median distance of training spots to those of the other sections) and each held-out
        group's median difficulty against the others (``calibration``).
    colour, colour_calibration
        Per training spot, mean and sd of the optical density of each channel of its patch; each
        held-out group's colour distance to the other groups' spots.
    groups, group_of
        Names of the held-out groups; the group of each training spot.
    level, fold_epochs
        Interval level; epochs of each fold model.
    coarser
        The most :meth:`stranker.Model.coarser` of the training sections: the least detail any section
        the estimates were made on gave the backbone (1: the training resolution). NaN in a record saved
        before it was kept.
    patients, by_patient
        The patients the training tables name (``uns['patient']``; empty when not all name one), and
        whether the held-out groups were patients (else sections).
    shrink, fit_r
        Weight the per-gene estimate keeps on its own held-out groups; the rest goes to the prior: the
        fit's own r on its training spots (``fit_r``, per gene; empty in a record saved before it was
        kept), calibrated on the held-out r of all genes (:func:`stranker._reliability.shrink_estimates`).
    """

    r_groups: np.ndarray
    estimate: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    p: np.ndarray
    q: np.ndarray
    banks: dict[str, dict[str, Any]]
    colour: np.ndarray
    colour_calibration: np.ndarray
    groups: list[str]
    group_of: np.ndarray
    level: float
    fold_epochs: int
    coarser: float = float("nan")
    patients: list[str] = field(default_factory=list)
    by_patient: bool = False
    shrink: float = 1.0
    fit_r: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def to_bank(self) -> dict[str, np.ndarray]:
        """Return the arrays to save with the model's bank (names prefixed ``rel_``)."""
        keys = ("r_groups", "estimate", "lo", "hi", "p", "q", "colour", "colour_calibration", "group_of",
                "fit_r")
        out = {k: np.asarray(getattr(self, k)) for k in keys}
        for name, bank in self.banks.items():
            out[f"{name}_emb"] = bank["emb"]
            out[f"{name}_scale"] = np.array([bank["scale"]])
            out[f"{name}_calibration"] = np.asarray(bank["calibration"])
        out["level"] = np.array([self.level])
        out["fold_epochs"] = np.array([self.fold_epochs])
        out["coarser"] = np.array([self.coarser])
        out["by_patient"] = np.array([self.by_patient])
        out["shrink"] = np.array([self.shrink])
        out["groups"] = _encode(self.groups)
        out["patients"] = _encode(self.patients)
        return {_PREFIX + k: v for k, v in out.items()}

    @classmethod
    def from_bank(cls, bank: dict[str, Any]) -> Reliability | None:
        """Return the record saved in a bank, or ``None`` (fitted without it, or saved before it existed)."""
        if _PREFIX + "q" not in bank:
            return None
        g = {k[len(_PREFIX):]: np.asarray(v) for k, v in bank.items() if k.startswith(_PREFIX)}
        banks = {b: {"emb": g[f"{b}_emb"].astype(np.float32), "scale": float(g[f"{b}_scale"][0]),
                     "calibration": g[f"{b}_calibration"]} for b in ("sharp", "coarse") if f"{b}_emb" in g}
        return cls(r_groups=g["r_groups"], estimate=g["estimate"], lo=g["lo"], hi=g["hi"], p=g["p"],
                   q=g["q"], banks=banks, colour=g["colour"], colour_calibration=g["colour_calibration"],
                   groups=_decode(g["groups"]), group_of=g["group_of"].astype(np.int64),
                   level=float(g["level"][0]), fold_epochs=int(g["fold_epochs"][0]),
                   coarser=float(g["coarser"][0]) if "coarser" in g else float("nan"),
                   patients=_decode(g["patients"]) if "patients" in g else [],
                   by_patient=bool(g["by_patient"][0]) if "by_patient" in g else False,
                   shrink=float(g["shrink"][0]) if "shrink" in g else 1.0,
                   fit_r=g.get("fit_r", np.zeros(0)))

    def table(self, genes: list[str], fdr: float) -> Any:
        """Return per-gene reliability: ``cv_pcc``, ``cv_pcc_lo``, ``cv_pcc_hi``, ``p``, ``reliable``."""
        import pandas as pd

        return pd.DataFrame({
            "cv_pcc": self.estimate, "cv_pcc_lo": self.lo, "cv_pcc_hi": self.hi, "p": self.p,
            "reliable": rel.reliable_genes(self.estimate, self.p, fdr),
        }, index=pd.Index(list(genes), name="gene"))

    def _bank(self, branch: str) -> dict[str, Any]:
        return self.banks.get(branch, self.banks["sharp"])

    def difficulty(self, emb: np.ndarray, branch: str = "sharp") -> np.ndarray:
        """Return per spot the distance of its embedding to the training tissue, in units of the scale.

        Measured against the training spots read with the same image ``branch`` as the spots, without
        one held-out group at a time (:func:`stranker._reliability.held_out_distance`), as the training
        spots that calibrate it were.
        """
        b = self._bank(branch)
        return rel.difficulty(rel.held_out_distance(emb, b["emb"], self.group_of), b["scale"])

    def intervals(self, pred: np.ndarray, difficulty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return lower and upper bounds ``pred ∓ q_gene * difficulty_spot``."""
        half = difficulty[:, None].astype(np.float32) * self.q[None, :].astype(np.float32)
        return pred - half, pred + half

    def shift(self, difficulty: np.ndarray, colour: np.ndarray, branch: str = "sharp", *,
              coarser: float | None = None, patient: Any = None) -> dict[str, Any]:
        """Return the shift record of a section: score, conformal p-value, ``shifted`` and its ``reasons``.

        The estimates hold for sections like those they were made on. A section is ``shifted`` for any of:

        - ``'appearance'``: two views of how far it lies from the training tissue, each in units of the
          median of the held-out training groups' own (one against the others): the median
          ``difficulty`` of its spots (the model's embedding space) and the distance of its mean colour
          statistics from the training spots'. The score is the larger; the training groups' scores,
          made the same way, calibrate it (``shifted`` beyond all of them).
        - ``'resolution'``: its patches give the backbone less detail (``coarser``,
          :meth:`stranker.Model.coarser`) than any training section did, by more than
          :data:`RESOLUTION_TOLERANCE`: no held-out section tested the estimates at that detail.
        - ``'patient'``: its table names a ``patient`` the training tables did not, and the held-out
          groups were sections of the training patients, not patients: nothing measured how the
          estimates carry over to another patient.
        """
        emb_cal = np.asarray(self._bank(branch)["calibration"], dtype=float)
        col_cal = np.asarray(self.colour_calibration, dtype=float)
        emb_score = float(np.median(difficulty)) if len(difficulty) else float("nan")
        col_score = rel.colour_distance(colour, self.colour)
        e_unit, c_unit = max(np.median(emb_cal), 1e-12), max(np.median(col_cal), 1e-12)
        cal = np.maximum(emb_cal / e_unit, np.nan_to_num(col_cal / c_unit, nan=0.0))
        score = float(max(emb_score / e_unit, np.nan_to_num(col_score / c_unit, nan=0.0)))
        reasons = ["appearance"] if score > cal.max() else []
        finer = np.isfinite(self.coarser) and coarser is not None
        if finer and coarser > self.coarser * RESOLUTION_TOLERANCE:
            reasons.append("resolution")
        other = patient is not None and str(patient) not in self.patients
        if other and self.patients and not self.by_patient:
            reasons.append("patient")
        return {"score": score, "p_value": rel.shift_p_value(score, cal), "shifted": bool(reasons),
                "reasons": reasons, "calibration": [float(v) for v in cal], "groups": list(self.groups),
                "embedding": {"score": emb_score, "calibration": [float(v) for v in emb_cal]},
                "colour": {"score": col_score, "calibration": [float(v) for v in col_cal]},
                "coarser": None if coarser is None else float(coarser),
                "training_coarser": float(self.coarser) if np.isfinite(self.coarser) else None,
                "patient": None if patient is None else str(patient),
                "training_patients": list(self.patients)}


def _encode(names: list[str]) -> np.ndarray:
    return np.frombuffer("\n".join(names).encode(), dtype=np.uint8).copy()


def _decode(arr: np.ndarray) -> list[str]:
    return bytes(np.asarray(arr).astype(np.uint8)).decode().split("\n") if arr.size else []


def _group_names(secs: list[Section], most: int) -> tuple[list[list[int]], list[str]]:
    """Return the held-out groups (section indices) and their names.

    One per patient when every table names one (``uns['patient']``) and they are at least two, else one
    per section; more than ``most`` are merged round-robin.
    """
    patients = _patients(secs)
    if len(patients) >= 2:
        of = [str(sp.table.uns["patient"]) for sp in secs]
        names = patients
        groups = [[i for i, p in enumerate(of) if p == n] for n in names]
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
    """Return a fold model's configuration: ``reliability_epochs`` of the epochs, without test-time views.

    At least one epoch, and one sharp epoch when the fit has a sharp finish (so that a fold model reads
    its held-out section with the branch the fit would). Its out-of-fold predictions are single-view:
    a little noisier than the fit's 8-view ones, so their residuals (and the intervals) err wide.
    """
    f = float(cfg.reliability_epochs)
    sharp = max(1, round(cfg.sharp_epochs * f)) if cfg.sharp_epochs > 0 else 0
    return replace(cfg, epochs=max(1, round(cfg.epochs * f)), sharp_epochs=sharp, tta=False,
                   reliability=False)


def in_sample(model: Any, inputs: Any, device: Any, colour: bool = False) -> list[tuple[np.ndarray, ...]]:
    """Return teacher embeddings and predictions (and colour statistics) of every training section."""
    return [model.infer(sp, device=str(device), colour=colour, **_held(model, inputs, s))
            for s, sp in enumerate(inputs.sections)]


def cross_fit(model: Any, inputs: Any, device: Any, seed: int,
              insample: list[tuple[np.ndarray, ...]]) -> Reliability | None:
    """Train the fold models of a fitted ``model``; return its reliability record (``None``: too few groups).

    ``insample``: the model's own embeddings, predictions and colour statistics of its training sections
    (:func:`in_sample` with ``colour=True``).
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
    raw, lo, hi, p = rel.gene_reliability(r_groups, level)
    fit_z = _fit_z(insample, truth, section)
    estimate, shrink = rel.shrink_estimates(r_groups, fit_z[:, None])
    with np.errstate(invalid="ignore"):  # the interval moves with its centre
        delta = _z(estimate) - _z(raw)
        lo, hi = np.tanh(_z(lo) + delta), np.tanh(_z(hi) + delta)
    # difficulty in the fitted model's space: each training spot against the other groups, per branch
    banks = {}
    for branch in ("sharp", "coarse") if getattr(model.aligner, "coarse", None) is not None else ("sharp",):
        if branch == "sharp":
            emb = np.concatenate([e for e, *_ in insample]).astype(np.float32)
        else:
            emb = np.concatenate([model.infer(sp, device=str(device), branch="coarse",
                                              **_held(model, inputs, s))[0]
                                  for s, sp in enumerate(inputs.sections)]).astype(np.float32)
        other = rel.other_section_distance(emb, group_of)
        scale = float(max(np.median(other), 1e-12))
        d = rel.difficulty(other, scale)
        banks[branch] = {"emb": emb, "scale": scale,
                         "calibration": np.array([np.median(d[group_of == gi]) for gi in range(len(groups))])}
        if branch == "sharp":
            q = rel.conformal_quantile(np.abs(truth - oof) / d[:, None], level)
    model.fold_models = folds
    colour = np.concatenate([c for *_, c in insample]).astype(np.float32)
    colour_cal = np.array([rel.colour_distance(colour[group_of == gi], colour[group_of != gi])
                           for gi in range(len(groups))])
    patients = _patients(inputs.sections)
    return Reliability(r_groups=r_groups, estimate=estimate, lo=lo, hi=hi, p=p, q=q, banks=banks,
                       colour=colour, colour_calibration=colour_cal, groups=names, group_of=group_of,
                       level=level, fold_epochs=int(fcfg.epochs + fcfg.sharp_epochs),
                       coarser=_training_coarser(model, inputs.sections), patients=patients,
                       by_patient=len(patients) >= 2, shrink=float(shrink), fit_r=np.tanh(fit_z))


def _z(r: np.ndarray) -> np.ndarray:
    return np.arctanh(np.clip(r, -0.999999, 0.999999))


def _patients(secs: list[Section]) -> list[str]:
    """Return the patients the training tables name (``uns['patient']``), or ``[]`` when one does not."""
    patients = [sp.table.uns.get("patient") if sp.table is not None else None for sp in secs]
    return [] if any(p is None for p in patients) else list(dict.fromkeys(map(str, patients)))


def _training_coarser(model: Any, secs: list[Section]) -> float:
    """Return the least detail a training section gave the backbone (:meth:`stranker.Model.coarser`)."""
    if model.config.image_features is not None:
        return float("nan")
    return float(max(model.coarser(sp) for sp in secs))


def _fit_z(insample: list[tuple[np.ndarray, ...]], truth: np.ndarray, section: np.ndarray) -> np.ndarray:
    """Per gene, the fit's own r on its training spots: the mean Fisher z over the training sections.

    Optimistic (the fit saw these spots), but it is *this* model's r, gene by gene, with no held-out noise;
    :func:`stranker._reliability.shrink_estimates` calibrates it on the fold models' held-out r.
    """
    z = np.stack([_z(rel.pearson_columns(pred, truth[section == s]))
                  for s, (_, pred, *_) in enumerate(insample)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a gene constant on every section: NaN
        return np.nanmean(z, 0)


def _held(model: Any, inputs: Any, s: int) -> dict[str, Any]:
    held = inputs.held(s)
    return {"features": held} if model.config.image_features is not None else {"patches": held}
