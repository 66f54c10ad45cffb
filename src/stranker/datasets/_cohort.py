"""A synthetic cohort of H&E-only slides whose morphology drives survival and a class label.

Each slide is painted with the texture programs of :func:`stranker.datasets.synthetic` (same
painting code) on a tissue blob surrounded by glass. One program (default ``'tumour'``) covers a
slide-specific fraction ``f`` of the tissue; the true log-hazard is ``beta * z`` with ``z`` the
cohort-standardised ``f``, survival times are exponential with hazard ``h0 * exp(beta * z)`` and
censoring is independent (exponential, rate set so that about ``censoring`` of slides are censored).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._constants import Keys
from ._synthetic import PROGRAMS, _paint, _proportion_field, _voronoi_labels, microns_per_pixel

if TYPE_CHECKING:
    import pandas
    import spatialdata


def _program_map(rng: np.random.Generator, size: int, scale: float, risk: int, fraction: float) -> np.ndarray:
    """Return a ``(size, size)`` int8 program map (-1 = glass); ``risk`` covers ``fraction`` of the tissue."""
    k = len(PROGRAMS)
    labels, sx, sy, keep = _voronoi_labels(rng, size, size, 11 * scale)
    # tissue: an irregular blob (ellipse with a wavy border) covering most of the slide
    cx, cy = size * rng.uniform(0.45, 0.55, 2)
    a, b = size * rng.uniform(0.36, 0.46, 2)
    ang = np.arctan2(sy - cy, sx - cx)
    phase = rng.uniform(0, 2 * np.pi, 2)
    wobble = 1 + 0.08 * np.sin(3 * ang + phase[0]) + 0.05 * np.sin(5 * ang + phase[1])
    tissue = ((sx - cx) / a) ** 2 + ((sy - cy) / b) ** 2 <= wobble**2
    # the risk program takes the cells where its smooth field is highest (a coherent region) ...
    p = _proportion_field(rng, size, size, k)(sx, sy)
    score = p[:, risk] + 0.05 * rng.standard_normal(len(sx))
    n_risk = int(round(fraction * tissue.sum()))
    order = np.argsort(-np.where(tissue, score, -np.inf))
    is_risk = np.zeros(len(sx), dtype=bool)
    is_risk[order[:n_risk]] = True
    # ... the others are drawn from the local proportions of the remaining programs
    q = p.copy()
    q[:, risk] = 0
    q /= q.sum(1, keepdims=True)
    u = rng.random(len(sx))[:, None]
    seed_prog = (u > np.cumsum(q, 1)).sum(1).clip(0, k - 1)
    seed_prog[is_risk] = risk
    seed_prog[~tissue] = -1
    lut = np.full(labels.max() + 1, -1, dtype=np.int8)
    lut[keep] = seed_prog
    return lut[labels]


def synthetic_cohort(
    n_slides: int = 60,
    *,
    size_px: int = 384,
    patch_px: int = 64,
    program: str = "tumour",
    beta: float = 1.5,
    censoring: float = 0.3,
    label_noise: float = 0.05,
    seed: int = 0,
) -> tuple[list[spatialdata.SpatialData], pandas.DataFrame]:
    """Generate a cohort of small H&E-only slides in which the area of one tissue program drives risk.

    Slides are painted with the texture programs of :func:`stranker.datasets.synthetic` at the
    same pixel scale (``patch_px``), so a model fitted there embeds them without resizing.
    Program ``program`` covers a fraction ``f ~ U(0.05, 0.6)`` of each slide's tissue. With ``z`` the
    cohort-standardised ``f``, event times are exponential with hazard ``0.1 * exp(beta * z)``;
    censoring times are exponential and independent, with the rate that censors about ``censoring``
    of the slides in expectation. The label is ``'high'`` when ``f`` plus Gaussian noise of sd
    ``label_noise`` exceeds the cohort median, else ``'low'``.

    Parameters
    ----------
    n_slides
        Number of slides (patients).
    size_px
        Side of each square slide in pixels.
    patch_px
        Pixel scale, as in :func:`stranker.datasets.synthetic` (spot spacing; 64 matches its default).
    program
        The program whose area drives risk: one of ``'tumour'``, ``'stroma'``, ``'immune'``, ``'fat'``.
    beta
        Log hazard ratio per standard deviation of the program fraction.
    censoring
        Expected fraction of censored slides, in ``[0, 1)``.
    label_noise
        Standard deviation of the noise added to ``f`` before thresholding the label.
    seed
        Random seed; the output is a deterministic function of all arguments.

    Returns
    -------
    ``(slides, clinical)``: a list of :class:`spatialdata.SpatialData`, each holding only the image
    ``'he'`` (RGB uint8) with its id in ``attrs['slide_id']`` and its resolution in
    ``attrs['microns_per_pixel']``; and a DataFrame indexed by
    slide id with columns ``time``, ``event`` (bool), ``label`` (``'high'``/``'low'``), ``fraction``
    (true area fraction of ``program`` in the tissue) and ``risk`` (true log-hazard ``beta * z``).
    The concordance index of ``risk`` on ``time``/``event`` is the best any model can reach on these
    times (the oracle).

    Examples
    --------
    >>> slides, clinical = synthetic_cohort(n_slides=8, size_px=256)
    >>> len(slides), list(clinical.columns)
    (8, ['time', 'event', 'label', 'fraction', 'risk'])
    """
    import pandas as pd
    import spatialdata as sd
    from scipy.optimize import brentq
    from spatialdata.models import Image2DModel

    if n_slides < 2:
        raise ValueError(f"`n_slides` must be at least 2, got {n_slides}.")
    if size_px < 64:
        raise ValueError(f"`size_px` must be at least 64 pixels, got {size_px}.")
    if program not in PROGRAMS:
        raise ValueError(f"`program` must be one of {list(PROGRAMS)}, got {program!r}.")
    if not 0 <= censoring < 1:
        raise ValueError(f"`censoring` must be in [0, 1), got {censoring}.")
    risk_prog = PROGRAMS.index(program)
    scale = float(np.clip(patch_px / 64.0, 0.5, 2.0))
    rng = np.random.default_rng([seed, 7_000_001])
    target = rng.uniform(0.05, 0.6, n_slides)
    ids = [f"P{i:03d}" for i in range(n_slides)]

    slides, fractions = [], np.empty(n_slides)
    for i in range(n_slides):
        srng = np.random.default_rng([seed, 7_000_002, i])
        prog = _program_map(srng, size_px, scale, risk_prog, target[i])
        fractions[i] = (prog == risk_prog).sum() / max((prog >= 0).sum(), 1)
        img = _paint(srng, prog, scale)
        image = Image2DModel.parse(img, dims=("c", "y", "x"), c_coords=["r", "g", "b"])
        sdata = sd.SpatialData(images={Keys.IMAGE: image})
        sdata.attrs[Keys.SLIDE_ID] = ids[i]
        sdata.attrs[Keys.MPP] = {Keys.IMAGE: microns_per_pixel(patch_px)}  # as sr.io.read_slide records it
        slides.append(sdata)

    z = (fractions - fractions.mean()) / (fractions.std() or 1.0)
    log_hazard = beta * z
    hazard = 0.1 * np.exp(log_hazard)
    t_event = rng.exponential(1.0 / hazard)
    if censoring > 0:
        mu = brentq(lambda m: np.mean(m / (hazard + m)) - censoring, 1e-9, 1e9)
        t_cens = rng.exponential(1.0 / mu, n_slides)
    else:
        t_cens = np.full(n_slides, np.inf)
    time = np.minimum(t_event, t_cens)
    event = t_event <= t_cens
    noisy = fractions + rng.normal(0, label_noise, n_slides)
    label = np.where(noisy > np.median(noisy), "high", "low")
    clinical = pd.DataFrame(
        {"time": time, "event": event, "label": pd.Categorical(label, categories=["low", "high"]),
         "fraction": fractions, "risk": log_hazard},
        index=pd.Index(ids, name=Keys.SLIDE_ID),
    )
    return slides, clinical
