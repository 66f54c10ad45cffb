"""Predictions projected onto the main axes of the training expression (reduced-rank denoising).

Expression is low-rank: a few programmes (cell types, proliferation, immune infiltration) carry what
varies between spots, and the remaining directions of a 785-gene profile are mostly counting noise.
A regression head trained on a few thousand spots also fits that noise, so its predictions along those
directions are noise too. Projecting each prediction onto the leading principal axes of the training
targets keeps the programmes and drops the rest. How many axes rise above the noise is read from the
training targets themselves, by the hard threshold of Gavish & Donoho (2014) for an unknown noise level:
nothing is tuned to a held-out section.
"""

from __future__ import annotations

import numpy as np
import torch

_CHUNK = 8192  # spots per block of the Gram matrix: memory is one block, whatever the number of spots


def noise_threshold(singular_values: np.ndarray, shape: tuple[int, int]) -> float:
    """Gavish & Donoho's (2014) optimal hard threshold for a matrix of ``shape`` with unknown noise.

    ``omega(beta) * median(singular_values)``, ``beta`` the aspect ratio (at most 1), with their cubic
    approximation of ``omega``.
    """
    beta = min(shape) / max(shape)
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    return float(omega * np.median(singular_values))


def expression_axes(values: np.ndarray, rank: int | str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and leading principal axes of training targets ``values`` ``(n_spots, n_genes)``.

    Parameters
    ----------
    values
        Targets on the model's scale (log1p of normalised counts), one row per training spot.
    rank
        Number of axes, or ``'auto'``: the axes whose singular value is above
        :func:`noise_threshold` (at least one).

    Returns
    -------
    ``(center, axes)``: ``(n_genes,)`` and ``(n_genes, rank)``, float32, axes orthonormal.
    """
    values = np.asarray(values)
    n, g = values.shape
    center = values.mean(0, dtype=np.float64)
    if n >= g:  # eigenvectors of the gene-by-gene Gram matrix are the axes; built in chunks of spots
        gram = np.zeros((g, g))
        for start in range(0, n, _CHUNK):
            x = values[start : start + _CHUNK].astype(np.float64) - center
            gram += x.T @ x
        ev, vec = np.linalg.eigh(gram)
        ev, axes = ev[::-1], vec[:, ::-1]
    else:  # fewer spots than genes: through the spot-by-spot Gram matrix
        x = values.astype(np.float64) - center
        ev, u = np.linalg.eigh(x @ x.T)
        ev, u = ev[::-1], u[:, ::-1]
        axes = x.T @ u / np.sqrt(np.clip(ev, 1e-300, None))
    sv = np.sqrt(np.clip(ev, 0, None))[: min(n, g)]
    if rank == "auto":
        r = max(1, int((sv > noise_threshold(sv, (n, g))).sum()))
    else:
        r = int(rank)
    r = min(r, int((sv > sv[0] * 1e-6).sum()) if sv[0] > 0 else 1)
    return center.astype(np.float32), np.ascontiguousarray(axes[:, :r], dtype=np.float32)


def project(pred: torch.Tensor, center: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    """``pred`` ``(n, n_genes)`` projected onto the affine span of ``axes`` through ``center``."""
    return center + ((pred - center) @ axes) @ axes.T
