"""sr.pl.history: each loss term per epoch of a fit."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .._constants import Keys
from .._errors import InputError
from ._utils import as_list, finish, new_axes

_NOT_LOSSES = ("epoch", "seconds", "lr")


def read_history(data: Any, key: str) -> dict[str, np.ndarray]:
    """``{term: values per epoch}`` from a :class:`stranker.Model` or ``uns[key]['history']`` of a table."""
    if hasattr(data, "history") and hasattr(data, "genes"):  # a Model
        recs = list(data.history)
        hist = {k: [h.get(k, np.nan) for h in recs] for k in (recs[0] if recs else {})}
    else:
        hist = None
        for sp in as_list(data):
            rec = sp.table.uns.get(key, {}) if sp.table is not None else {}
            if "history" in rec:
                hist = rec["history"]
                break
        if hist is None:
            raise InputError(
                f"No `uns[{key!r}]['history']` in the data: "
                "pass a table written by `sr.tl.fit` or the model itself."
            )
    out = {str(k): np.asarray(v, dtype=np.float64) for k, v in dict(hist).items() if k not in _NOT_LOSSES}
    if not out or not any(len(v) for v in out.values()):
        raise InputError("The training history is empty.")
    return out


def history(
    data: Any,
    *,
    key: str = Keys.PREFIX,
    terms: list[str] | None = None,
    ncols: int = 5,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    ax: Any = None,
):
    """Each loss term of a fit per epoch, one panel per term (the terms have different scales).

    Parameters
    ----------
    data
        The :class:`stranker.Model` from :func:`stranker.tl.fit`, or a training section (SpatialData
        or AnnData, or a list) whose ``uns[key]['history']`` ``fit`` wrote.
    key
        The ``key_added`` of the fit.
    terms
        Terms to plot; default every loss term (``regression``, ``clip``, ``rank``, ``distill``,
        ``total``, ...).
    ncols
        Panels per row.
    show
        Show the figure; ``None`` shows it unless ``save`` is given.
    save
        File to write the figure to.
    ax
        Axes to draw into, one per term.

    Returns
    -------
    The list of :class:`matplotlib.axes.Axes` when the figure is not shown, else ``None``.
    """
    from matplotlib.ticker import MaxNLocator

    hist = read_history(data, key)
    if terms is not None:
        missing = [t for t in terms if t not in hist]
        if missing:
            raise InputError(f"Loss term(s) {missing} not in the history; it has {sorted(hist)}.")
        hist = {t: hist[t] for t in terms}
    fig, axes = new_axes(len(hist), ax, ncols=ncols, panel=(2.6, 2.2), what="history")
    for axis, (term, vals) in zip(axes, hist.items(), strict=True):
        epochs = np.arange(1, len(vals) + 1)
        axis.plot(epochs, vals, marker="o", ms=3, lw=1.2, color="C0" if term != "total" else "k")
        axis.set_title(term)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("loss")
    return finish(fig, axes, show=show, save=save)
