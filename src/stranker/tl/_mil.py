"""Attention pooling trained on the whole cohort, for ``sr.tl.embed_slides(pooling='attention')``."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._errors import InputError
from .._outcomes import survival_target
from ._classify import labels
from ._crossval import standardise_bags


def fit_mil_all(bags: list[np.ndarray], meta: Any, label: Any, *, seed: int, epochs: int = 150):
    """Train the attention MIL on every slide against ``label``; pooled vectors and attention weights."""
    from ..model.mil import predict_mil, train_mil

    std, _ = standardise_bags(bags, [])
    if isinstance(label, tuple | list):
        if len(label) != 2:
            raise InputError(f"A survival `label` is a pair (time, event) of columns, got {label!r}.")
        t, e = survival_target(meta, label[0], label[1])
        net = train_mil(std, t, task="cox", event=e, epochs=epochs, seed=seed)
    else:
        classes, y = labels(meta, label)
        net = train_mil(std, y, task="ce", n_classes=len(classes), epochs=epochs, seed=seed)
    _, attention, pooled = predict_mil(net, std)
    return pooled, attention

