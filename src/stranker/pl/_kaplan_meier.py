"""sr.pl.kaplan_meier: survival curves of slides split by predicted risk, with a log-rank test."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._constants import Keys
from .._errors import InputError


def kaplan_meier(
    cohort: Any,
    *,
    risk: str = f"{Keys.PREFIX}_{Keys.RISK}",
    time: str = Keys.TIME,
    event: str = Keys.EVENT,
    groups: int = 2,
    ax: Any = None,
    show: bool | None = None,
    save: str | None = None,
    title: str | None = None,
):
    """Kaplan-Meier curves of slides grouped by risk quantile, with the log-rank p-value.

    Parameters
    ----------
    cohort
        AnnData with one row per slide, after :func:`stranker.tl.survival`.
    risk
        Column of ``obs`` with the risk score (default: the out-of-fold risk of ``sr.tl.survival``).
    time, event
        Columns of ``obs`` with survival times and event indicators.
    groups
        Number of risk groups: 2 splits at the median, ``q`` at the ``q``-quantiles.
    ax
        Matplotlib axes to draw into; a new figure when ``None``.
    show
        Show the figure; default: when no ``ax`` is given.
    save
        Save the figure to this path.
    title
        Axes title; default "Slides by predicted risk" (or by the ``risk`` column named) with the
        log-rank p-value.

    Returns
    -------
    The axes when ``show`` is false, else ``None``. The log-rank statistic and p-value are stored on the
    axes as ``ax.stranker_logrank = (chisq, pvalue)``.
    """
    import matplotlib.pyplot as plt
    import pandas as pd
    from sksurv.compare import compare_survival
    from sksurv.nonparametric import kaplan_meier_estimator
    from sksurv.util import Surv

    from .._outcomes import survival_target

    if risk not in cohort.obs:
        raise InputError(
            f"`obs[{risk!r}]` not found: run `sr.tl.survival` first, or pass `risk=` a column of obs."
        )
    t, e = survival_target(cohort.obs, time, event)
    r = pd.to_numeric(cohort.obs[risk], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(r).all():
        raise InputError(f"`obs[{risk!r}]` has missing or non-numeric risk scores.")
    if not isinstance(groups, int | np.integer) or groups < 2:
        raise InputError(f"`groups` must be an integer >= 2, got {groups!r}.")
    edges = np.quantile(r, np.linspace(0, 1, groups + 1)[1:-1])
    g = np.searchsorted(edges, r, side="right")
    present = np.unique(g)
    if len(present) < 2:
        raise InputError(f"`obs[{risk!r}]` does not split into {groups} groups (too many tied scores).")
    if groups == 2:
        names = {0: "low risk", 1: "high risk"}
    else:
        names = {k: f"risk Q{k + 1}" for k in range(groups)}
    chisq, pvalue = compare_survival(Surv.from_arrays(e, t), g)

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
        show = True if show is None else show
    cmap = plt.get_cmap("coolwarm")
    for k in present:
        m = g == k
        x, s = kaplan_meier_estimator(e[m], t[m])
        color = cmap(k / max(groups - 1, 1))
        ax.step(np.r_[0, x], np.r_[1, s], where="post", color=color, label=f"{names[k]} (n={int(m.sum())})")
        cens = m & ~e  # censored slides: marks on the curve
        if cens.any():
            ax.plot(t[cens], s[np.clip(np.searchsorted(x, t[cens], side="right") - 1, 0, len(s) - 1)], "|",
                    color=color, ms=6)
    ax.set_xlabel(time)
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.05)
    ax.legend(frameon=False, loc="lower left")
    default_risk = risk == f"{Keys.PREFIX}_{Keys.RISK}" or risk.endswith(f"_{Keys.RISK}")
    what = "predicted risk" if default_risk else f"`{risk}`"
    ax.set_title(title or f"Slides by {what} (log-rank p = {pvalue:.2g})")
    ax.stranker_logrank = (float(chisq), float(pvalue))
    if save:
        ax.figure.savefig(save, bbox_inches="tight", dpi=150)
    if show:
        plt.show()
        return None
    return ax
