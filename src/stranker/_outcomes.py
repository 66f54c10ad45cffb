"""Slide-level outcomes, checked: survival time and event (``tl.survival``, ``pl.kaplan_meier``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._errors import InputError


def survival_target(obs: Any, time: str, event: str) -> tuple[np.ndarray, np.ndarray]:
    """Return checked ``(time, event)`` arrays from two columns of ``obs``."""
    import pandas as pd

    for col, what in ((time, "time"), (event, "event")):
        if col not in obs.columns:
            raise InputError(
                f"Column {col!r} (`{what}=`) not found in `obs`; columns: {list(obs.columns)}. Pass the "
                "survival table as `obs=` to `sr.tl.embed_slides`, or add the column."
            )
    t = pd.to_numeric(obs[time], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(t).all():
        bad = list(obs.index[~np.isfinite(t)][:5])
        raise InputError(
            f"`obs[{time!r}]` has missing or non-numeric times for slides {bad}: drop or fill them."
        )
    if (t <= 0).any():
        bad = list(obs.index[t <= 0][:5])
        raise InputError(f"`obs[{time!r}]` must be positive survival times; slides {bad} have times <= 0.")
    e_raw = obs[event]
    if e_raw.isna().any():
        bad = list(obs.index[e_raw.isna().to_numpy()][:5])
        raise InputError(f"`obs[{event!r}]` has missing event indicators for slides {bad}.")
    e_num = pd.to_numeric(e_raw.astype(object).map(lambda v: int(v) if isinstance(v, bool | np.bool_) else v),
                          errors="coerce").to_numpy(dtype=float)
    if not np.isin(e_num, (0.0, 1.0)).all():
        raise InputError(
            f"`obs[{event!r}]` must be event indicators (True/False or 1/0: 1 = event observed, "
            f"0 = censored), got values {sorted(set(map(str, e_raw.unique())))[:5]}."
        )
    e = e_num.astype(bool)
    if not e.any():
        raise InputError(f"`obs[{event!r}]` holds no event: a concordance index needs observed events.")
    return t, e
