"""Test-time adaptation of the image branch to the slide being predicted."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn


def has_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` holds batch-normalisation layers (whose statistics :func:`adapt_norm` renews)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@torch.no_grad()
def adapt_norm(branch: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Return a copy of ``branch`` with batch-norm statistics of ``batches`` (AdaBN, Li et al. 2018).

    The weights stay as trained; only the running mean and variance of every batch-norm layer are
    recomputed, as the mean over ``batches`` of each batch's statistics, from the inputs of the
    slide to predict. A stain, scanner or resolution shift between slides moves these statistics
    first; renewing them is the cheapest correction that needs no labels.

    Parameters
    ----------
    branch
        The image branch (or any module taking the inputs of ``batches``).
    batches
        Input batches of the target slide, as ``branch`` takes them.

    Returns
    -------
    The adapted copy, in eval mode; ``branch`` is unchanged.
    """
    out = copy.deepcopy(branch).eval()
    norms = [m for m in out.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError("The image branch has no batch-norm layers to adapt (e.g. a ViT backbone).")
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative mean over the batches
        m.train()
    for x in batches:
        out(x)
    for m in norms:
        m.eval()
    return out
