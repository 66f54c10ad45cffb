"""Model configuration and the presets that reproduce published recipes in the same code."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


@dataclass
class Config:
    """Every choice of the model and its training, with the defaults of ``method='stranker'``.

    Build one with :func:`make_config` (a preset and the options changed); every field is also a
    keyword of :func:`stranker.tl.fit`.

    Attributes
    ----------
    chosen
        The fields the user set (the options given to :func:`make_config`, or to
        :func:`stranker.tl.fit`, which passes them on), so that :meth:`chosen_fields` can tell a value
        asked for from a default: a named ``backbone`` sets ``image_size`` and ``patch_um`` only where
        the user left them. ``None``: not known (a ``Config(...)`` built directly, or a configuration
        saved before the record existed); then the fields that differ from the method's preset count
        as chosen. Kept by :func:`dataclasses.replace` and by :meth:`to_dict` / :meth:`from_dict` (so
        saved models keep it), and left out of ``==``: it records how a configuration came about, not
        what it is.
    """

    method: str = "stranker"
    # image branch
    backbone: str = "resnet18"  # timm name, 'hf-hub:ORG/NAME' or a registry name ('uni', ...)
    weights: str | None = None  # local checkpoint file
    pretrained: bool = True  # pretrained weights (file, cache or download), else an error; False: random
    freeze: bool | str | None = None  # True, False, 'last:N'; None: frozen for registry foundation models
    image_features: str | None = None  # obsm key of precomputed features instead of pixels
    patch_px: float = 224.0  # patch side at scale 1, full-resolution pixels
    patch_um: float | None = None  # or in micrometres
    scales: tuple[float, ...] = (1.0,)
    cnn_scales: int = 1  # the backbone sees the first scales; stain statistics are taken at all
    image_size: int = 112  # pixels fed to the backbone
    use_stain: bool = False  # measured on her2st: stain statistics beside the CNN lowered held-out PCC
    stain_norm: str | None = None  # 'reinhard': each patch's tissue L*a*b* mean/sd set to a fixed target
    hed_jitter: float = 0.0  # strength of per-channel HED scale/shift augmentation (Tellez et al. 2018)
    resolution_jitter: float = 3.0  # train on patches downsampled by up to this factor; 1: off
    resolution_keep: float | None = None  # share of patches the jitter leaves sharp; None: 1 in 5
    sharp_epochs: int = 4  # then a copy trains on sharp patches; it reads slides as fine as the training ones
    crop_jitter: float = 0.0  # train on random crops of 1 - crop_jitter to 1 of the patch side, resized back
    embed_dim: int = 256
    dropout: float = 0.0
    # gene branch
    gene_hidden: int = 512
    spot_context: bool = False
    context_layers: int = 2
    context_heads: int = 4
    position_bins: int = 64
    # losses
    w_regression: float = 1.0
    w_corr: float = 1.0  # 1 - per-gene Pearson r over a batch's spots (one section) beside the regression
    w_clip: float = 0.03
    w_rank: float = 0.0  # measured at 0.03 on her2st: no gain beyond the seed spread (docs/method.md)
    w_distill: float = 0.0  # likewise; the EMA teacher still averages the student's weights
    w_consistency: float = 0.0  # mean teacher on unlabelled patches: student (strong view) ~ teacher (weak)
    temperature: float = 0.07
    rank_temperature: float = 0.1
    rank_mode: str = "listwise"
    rank_reference: str = "expression"  # or 'gene' (gene-branch embeddings)
    head_on: str = "features"  # the regression head reads the joint 'embedding' or the backbone 'features'
    probe_only: bool = False  # the regression head sees a detached embedding (linear probe)
    ema_decay: float = 0.99
    student_view: str = "weak"  # augmentation of the student's view: 'strong' or 'weak'
    target_scale: str = "pooled"  # 'section': each section's targets standardised on their own
    # optimisation
    epochs: int = 20  # presets: 12, as their committed rows were run
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    # prediction
    predict: str = "blend"  # 'head', 'retrieval' or 'blend'
    blend: float = 0.7  # weight of the regression head in 'blend'
    top_k: int = 50
    tta: bool = True
    predict_rank: int | str = "auto"  # project onto the targets' main axes; 'auto': those above noise; 0: off
    # reliability (docs/method.md): fold models each without one section (or patient) of the training data
    reliability: bool = True  # per-gene r on new sections, per-spot intervals and a shift score
    reliability_folds: int = 5  # at most this many held-out groups (more sections are merged into groups)
    reliability_epochs: float = 0.1  # a fold model trains this share of `epochs` (and >= 1 `sharp_epochs`)
    interval_level: float = 0.9  # per-spot intervals (split conformal on out-of-fold residuals)
    fdr: float = 0.1  # false-discovery rate of the reliable-gene call (Benjamini-Hochberg)
    extra: dict[str, Any] = field(default_factory=dict)
    # the fields the user set (make_config's options); None: unknown, those off the preset count
    chosen: frozenset[str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.chosen is not None and not isinstance(self.chosen, frozenset):
            self.chosen = frozenset(self.chosen)  # e.g. a list read from model.json

    def chosen_fields(self) -> frozenset[str]:
        """Return the fields the user set.

        That is :attr:`chosen`; where it is unknown (``None``), the fields whose value differs from
        the preset of ``method`` (a guess that misses a value asked for that equals the preset's).
        """
        if self.chosen is not None:
            return self.chosen
        preset = make_config(self.method)
        return frozenset(f.name for f in fields(self)
                         if f.name != "chosen" and getattr(self, f.name) != getattr(preset, f.name))

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as a plain dict (``scales`` and ``chosen`` as lists; JSON-ready)."""
        d = asdict(self)
        d["scales"] = list(self.scales)
        d["chosen"] = None if self.chosen is None else sorted(self.chosen)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Build a configuration from a dict, ignoring unknown keys.

        A field that a saved configuration lacks (saved before the field existed) takes the value
        that the model was trained with then (:data:`ABSENT_MEANS`), not today's default; without
        ``chosen`` which fields the user set is unknown (``None``, see :class:`Config`).
        """
        names = {f.name for f in fields(cls)}
        d = {**ABSENT_MEANS, **{k: v for k, v in d.items() if k in names}}
        if "scales" in d:
            d["scales"] = tuple(float(s) for s in d["scales"])
        return cls(**d)


# what a saved configuration without the field was trained with (the option did not exist yet)
ABSENT_MEANS: dict[str, Any] = {
    "reliability": False,  # a configuration saved before the reliability record: fitted without it
    "resolution_jitter": 1.0, "resolution_keep": None, "crop_jitter": 0.0, "hed_jitter": 0.0, "w_corr": 0.0,
    "w_consistency": 0.0, "sharp_epochs": 0, "predict_rank": 0,
    "chosen": None,  # not recorded: the fields off the method's preset count as chosen
}

PRESETS: dict[str, dict[str, Any]] = {
    # ours: supervised regression (MSE + per-gene correlation over each batch) on backbone features +
    # InfoNCE on the joint embedding, trained on patches of randomly lowered resolution, then a copy 4 epochs
    # on sharp patches for slides as sharp as the training ones; the EMA teacher predicts, blending its
    # regression head (0.7) with top-k retrieval (0.3), projected onto the principal axes of the training
    # expression that rise above its noise. Ranking and teacher-student
    # terms are options (w_rank, w_distill; w_consistency with fit(unlabeled=...)).
    "stranker": {},
    # ST-Net-like supervised baseline: the backbone regresses expression, nothing else
    "stnet": dict(
        scales=(1.0,), resolution_jitter=1.0, sharp_epochs=0, predict_rank=0, use_stain=False, epochs=12,
        w_regression=1.0, w_corr=0.0, w_clip=0.0, w_rank=0.0, w_distill=0.0,
        head_on="embedding", predict="head",
    ),
    # BLEEP: CLIP loss between image and expression, prediction by top-k retrieval
    "bleep": dict(
        scales=(1.0,), resolution_jitter=1.0, sharp_epochs=0, predict_rank=0, use_stain=False, epochs=12,
        w_regression=0.0, w_corr=0.0, w_clip=1.0, w_rank=0.0, w_distill=0.0,
        predict="retrieval", tta=False, temperature=1.0,
    ),
    # mclSTExp: BLEEP + a transformer over the spots of a section with learned 2-D positions
    "mclstexp": dict(
        scales=(1.0,), resolution_jitter=1.0, sharp_epochs=0, predict_rank=0, use_stain=False, epochs=12,
        w_regression=0.0, w_corr=0.0, w_clip=1.0, w_rank=0.0, w_distill=0.0,
        spot_context=True, predict="retrieval", tta=False, temperature=1.0,
    ),
    # RankByGene: InfoNCE + ranking consistency + EMA teacher-student; a head on the frozen embedding
    "rankbygene": dict(
        scales=(1.0,), resolution_jitter=1.0, sharp_epochs=0, predict_rank=0, use_stain=False, epochs=12,
        w_regression=1.0, w_corr=0.0, probe_only=True, w_clip=1.0, w_rank=1.0,
        w_distill=1.0, rank_reference="gene", predict="head", tta=False, student_view="strong",
        head_on="embedding",
    ),
}


def make_config(method: str = "stranker", **overrides: Any) -> Config:
    """Return the preset ``method`` with ``overrides``, recording which fields they set.

    Parameters
    ----------
    method
        The preset: ``'stranker'`` (default), ``'stnet'``, ``'bleep'``, ``'mclstexp'``, ``'rankbygene'``.
    **overrides
        Any field of :class:`Config`; ``None`` values are ignored.

    Returns
    -------
    The validated :class:`Config`. Its ``chosen`` holds the names of the overrides given (not
    ``None``), also where a value equals the preset's: ``make_config(backbone="uni", image_size=112)``
    keeps 112 px although a named backbone otherwise sets its own input size, as
    ``sr.tl.fit(..., backbone="uni", image_size=112)`` does.
    """
    if method not in PRESETS:
        raise ValueError(f"`method` must be one of {sorted(PRESETS)}, got {method!r}.")
    names = {f.name for f in fields(Config)} - {"chosen"}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"Unknown model option(s) {unknown}; valid options: {sorted(names - {'extra'})}.")
    cfg = replace(Config(), method=method, **PRESETS[method])
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "scales" in overrides:
        s = overrides["scales"]
        overrides["scales"] = (float(s),) if isinstance(s, int | float) else tuple(float(v) for v in s)
    return validate(replace(cfg, **overrides, chosen=frozenset(overrides)))


# the sharp finish trains at this fraction of `lr` (measured at 0.1, 0.3 and 1: docs/method.md)
SHARP_LR = 0.3


def finish_epochs(cfg: Config) -> int:
    """Epochs of the sharp finish: ``sharp_epochs`` when resolution jitter lowers pixels, else 0.

    Without jitter (``resolution_jitter=1``) every patch is sharp already; precomputed features
    (``image_features``) are never jittered.
    """
    return int(cfg.sharp_epochs) if cfg.resolution_jitter > 1 and cfg.image_features is None else 0


def validate(cfg: Config) -> Config:
    """Return ``cfg`` if its choices are valid and consistent; else raise a ``ValueError`` naming the fix."""
    if cfg.chosen is not None:
        unknown = sorted(set(cfg.chosen) - ({f.name for f in fields(cfg)} - {"chosen"}))
        if unknown:
            raise ValueError(f"`chosen` must name fields of the configuration, got {unknown}.")
    if cfg.predict not in ("head", "retrieval", "blend"):
        raise ValueError(f"`predict` must be 'head', 'retrieval' or 'blend', got {cfg.predict!r}.")
    for k in ("w_regression", "w_corr", "w_clip", "w_rank", "w_distill", "w_consistency"):
        v = getattr(cfg, k)
        if isinstance(v, bool) or not (isinstance(v, numbers.Real) and math.isfinite(v) and v >= 0):
            raise ValueError(f"`{k}` must be a number >= 0 (0: the term is off), got {v!r}.")
    if cfg.predict != "head" and not cfg.w_clip > 0:
        raise ValueError(
            f"`predict={cfg.predict!r}` retrieves with the joint embedding, which only the clip term aligns "
            "with expression; with `w_clip=0` it would retrieve with untrained embeddings. Pass "
            "`predict='head'` or a positive `w_clip`."
        )
    if cfg.predict != "retrieval" and not cfg.w_regression > 0:
        raise ValueError(
            f"`predict={cfg.predict!r}` reads the regression head, which `w_regression=0` leaves untrained. "
            "Pass `predict='retrieval'` or a positive `w_regression`."
        )
    if not isinstance(cfg.reliability, bool):
        raise ValueError(f"`reliability` must be True or False, got {cfg.reliability!r}.")
    if isinstance(cfg.reliability_folds, bool) or not (isinstance(cfg.reliability_folds, numbers.Integral)
                                                        and cfg.reliability_folds >= 2):
        raise ValueError(f"`reliability_folds` must be an integer >= 2, got {cfg.reliability_folds!r}.")
    if not (isinstance(cfg.reliability_epochs, numbers.Real) and 0 < cfg.reliability_epochs <= 1):
        raise ValueError(f"`reliability_epochs` must be a share of the epochs in (0, 1], got "
                         f"{cfg.reliability_epochs!r}.")
    for k in ("interval_level", "fdr"):
        v = getattr(cfg, k)
        if isinstance(v, bool) or not (isinstance(v, numbers.Real) and 0 < v < 1):
            raise ValueError(f"`{k}` must be in (0, 1), got {v!r}.")
    if cfg.stain_norm not in (None, "reinhard"):
        raise ValueError(f"`stain_norm` must be None or 'reinhard', got {cfg.stain_norm!r}.")
    if not 0 <= cfg.hed_jitter < 1:
        raise ValueError(f"`hed_jitter` must be in [0, 1) (0.02 is mild), got {cfg.hed_jitter}.")
    if not 0 <= cfg.crop_jitter < 1:
        raise ValueError(f"`crop_jitter` must be in [0, 1) (0.25: crops of 75-100 % of the side), "
                         f"got {cfg.crop_jitter}.")
    if not (math.isfinite(cfg.resolution_jitter) and 1 <= cfg.resolution_jitter <= 16):
        raise ValueError(f"`resolution_jitter` must be in [1, 16] (1: off), got {cfg.resolution_jitter}.")
    k = cfg.resolution_keep
    if k is not None and (isinstance(k, bool) or not (isinstance(k, numbers.Real) and 0 <= k <= 1)):
        raise ValueError(f"`resolution_keep` must be None or the share in [0, 1] of patches left sharp, "
                         f"got {k!r}.")
    if cfg.target_scale not in ("pooled", "section"):
        raise ValueError(f"`target_scale` must be 'pooled' or 'section', got {cfg.target_scale!r}.")
    if not 0 <= cfg.blend <= 1:
        raise ValueError(f"`blend` must be in [0, 1], got {cfg.blend}.")
    if cfg.freeze not in (None, True, False) and not re.fullmatch(r"last:\d+", str(cfg.freeze)):
        raise ValueError(f"`freeze` must be True, False or 'last:N' (N blocks trained), got {cfg.freeze!r}.")
    for k in ("epochs", "batch_size", "image_size", "embed_dim", "top_k", "cnn_scales", "gene_hidden",
              "context_layers", "context_heads", "position_bins"):
        v = getattr(cfg, k)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"`{k}` must be a whole number, got {v!r}.")
        if v < 1:
            raise ValueError(f"`{k}` must be at least 1, got {v}.")
    if cfg.batch_size < 2:  # a batch of one spot has no spread to learn from: training leaves it out
        raise ValueError(
            f"`batch_size` must be at least 2 (spots of one section trained together; a batch of one spot "
            f"has no per-gene correlation or contrast and is never trained on), got {cfg.batch_size}."
        )
    r = cfg.predict_rank
    whole = isinstance(r, numbers.Integral) and not isinstance(r, bool)
    if r != "auto" and not (whole and r >= 0):
        raise ValueError(f"`predict_rank` must be 'auto' (the axes above the noise), a number of axes or 0 "
                         f"(predictions not projected), got {r!r}.")
    v = cfg.sharp_epochs
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
        raise ValueError(f"`sharp_epochs` must be a whole number >= 0 (0: no sharp copy), got {v!r}.")
    for k in ("lr", "temperature", "rank_temperature"):
        v = getattr(cfg, k)
        if not (isinstance(v, numbers.Real) and math.isfinite(v) and v > 0):
            raise ValueError(f"`{k}` must be a positive number, got {v!r}.")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"`dropout` must be in [0, 1), got {cfg.dropout}.")
    if not 0 <= cfg.ema_decay <= 1:
        raise ValueError(f"`ema_decay` must be in [0, 1], got {cfg.ema_decay}.")
    return cfg
