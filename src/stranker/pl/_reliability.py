"""sr.pl.reliability: each gene's estimated r on new sections with its interval, and against measured r."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._constants import Keys
from .._docs import doc_params
from .._errors import InputError
from ..section import Section
from ._correlation import gene_scores
from ._utils import finish, has_measured, new_axes, sections

_NOT_ESTIMATED = (
    "it was fitted with reliability=False, on a single section, or saved before stranker estimated "
    "reliability: refit on several sections (`sr.tl.fit(..., reliability=True)`)"
)


@dataclass
class Estimates:
    """Per-gene reliability of a model: estimated r on a new section, its interval, the reliable call."""

    genes: list[str]
    cv_pcc: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    reliable: np.ndarray
    fdr: float | None
    level: float | None


def _is_model(data: Any) -> bool:
    return hasattr(data, "reliability_record") and hasattr(data, "genes")


def model_estimates(model: Any) -> Estimates:
    """Read the per-gene reliability of a :class:`stranker.Model` (``model.reliability``)."""
    table = model.reliability
    if table is None:
        raise InputError(f"The model has no reliability estimate: {_NOT_ESTIMATED}.")
    rec = model.reliability_record
    return Estimates(
        genes=[str(g) for g in table.index], cv_pcc=table["cv_pcc"].to_numpy(dtype=np.float64),
        lo=table["cv_pcc_lo"].to_numpy(dtype=np.float64), hi=table["cv_pcc_hi"].to_numpy(dtype=np.float64),
        reliable=table["reliable"].to_numpy(dtype=bool), fdr=float(model.config.fdr),
        level=float(rec.level) if rec is not None else None,
    )


def section_estimates(sp: Section, key: str) -> Estimates:
    """Read the per-gene reliability that ``sr.tl.predict`` or ``sr.tl.fit`` wrote into ``var``."""
    var = sp.table.var
    cols = [f"{key}_{c}" for c in ("cv_pcc", "cv_pcc_lo", "cv_pcc_hi", "reliable")]
    missing = [c for c in cols if c not in var]
    if missing:
        rec = sp.table.uns.get(key) or {}
        why = rec.get("reliability") if isinstance(rec.get("reliability"), str) else None
        raise InputError(
            f"No reliability estimate in section {sp.name!r} (`var` lacks {missing}): "
            + (f"{why}." if why else "predict with a model fitted on several sections with reliability=True.")
        )
    cv = var[cols[0]].to_numpy(dtype=np.float64)
    keep = np.isfinite(cv)
    if not keep.any():
        raise InputError(f"`var[{cols[0]!r}]` of section {sp.name!r} estimates no gene.")
    rec = sp.table.uns.get(key) or {}
    return Estimates(
        genes=[str(g) for g in sp.table.var_names[keep]], cv_pcc=cv[keep],
        lo=var[cols[1]].to_numpy(dtype=np.float64)[keep], hi=var[cols[2]].to_numpy(dtype=np.float64)[keep],
        reliable=var[cols[3]].to_numpy(dtype=bool)[keep],
        fdr=float(rec["fdr"]) if "fdr" in rec else None,
        level=float(rec["interval_level"]) if "interval_level" in rec else None,
    )


@doc_params()
def reliability(
    data: Any,
    *,
    key: str = Keys.PREFIX,
    layer: str | None = None,
    measured_expression: bool | None = None,
    n_labels: int = 5,
    counts_layer: str | None = None,
    target_sum: float = 1e4,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    ax: Any = None,
    table_key: str | None = None,
    library_id: str | None = None,
    bin_size: int | None = None,
):
    """Each gene's estimated Pearson r on new sections with its interval; and against the measured r.

    The first panel ranks the genes by the r that the model's section-level cross-fitting estimates
    for a new section (``cv_pcc``), each with its interval; the genes called reliable (r > 0 at the
    model's false-discovery rate, and estimated r >= 0.1) are marked. Given a section that holds
    measured expression and predictions (one that :func:`stranker.tl.predict` wrote into), a second
    panel draws the estimated r against the r measured there, one point per gene, with the identity
    line: points below it are genes the estimate was optimistic about.

    Parameters
    ----------
    data
        The :class:`stranker.Model` from :func:`stranker.tl.fit`, or a SpatialData / AnnData (or a list)
        that ``predict`` or ``fit`` wrote into (``var[f'{key}_cv_pcc']``, ``_cv_pcc_lo``,
        ``_cv_pcc_hi``, ``_reliable``). The first section's estimates are drawn in the first panel.
    key
        The ``key_added`` of the predictions; the measured r is ``var[f'{key}_pcc']`` where
        :func:`stranker.tl.evaluate` wrote it, else computed here.
    layer
        Layer of predicted expression; default ``key``.
    measured_expression
        Draw the second panel; ``None`` draws it whenever ``data`` is a section with measured
        expression and predictions (never for a model).
    n_labels
        Label this many genes with the highest estimated r by name.
    counts_layer
        Layer of raw counts; ``None`` uses ``X``.
    target_sum
        Scaling of the measured side.
    show
        Show the figure; ``None`` shows it unless ``save`` is given.
    save
        File to write the figure to.
    ax
        Axes to draw into: one per panel.
    {doc_tables}
    {doc_bin_size}

    Returns
    -------
    The list of :class:`matplotlib.axes.Axes` (one per panel) when the figure is not shown, else ``None``.

    Examples
    --------
    >>> sr.pl.reliability(model)  # doctest: +SKIP
    >>> sr.tl.predict(model, sdata)  # doctest: +SKIP
    >>> sr.pl.reliability(sdata, save="reliability.png")  # doctest: +SKIP
    """
    layer = key if layer is None else layer
    if _is_model(data):
        if measured_expression:
            raise InputError("`measured_expression=True` needs a section with measurements, not a model.")
        est, secs = model_estimates(data), []
    else:
        secs = sections(data, table_key=table_key, library_id=library_id, bin_size=bin_size)
        est = section_estimates(secs[0], key)
        if measured_expression is None:
            measured_expression = all(
                layer in sp.table.layers and has_measured(sp, layer, counts_layer) for sp in secs
            )
    # every value first, so bad input raises before a figure exists
    compared = []
    for sp in secs if measured_expression else []:
        own = section_estimates(sp, key)
        genes, r, _ = gene_scores(sp, layer=layer, key=key, counts_layer=counts_layer,
                                  target_sum=target_sum, n_heg=1)
        pos = {g: i for i, g in enumerate(own.genes)}
        both = [(j, pos[g]) for j, g in enumerate(genes) if g in pos]
        if not both:
            raise InputError(f"No gene of section {sp.name!r} has a prediction and a reliability estimate.")
        j, i = (np.array(x) for x in zip(*both, strict=True))
        compared.append((sp, [genes[k] for k in j], own.cv_pcc[i], own.lo[i], own.hi[i], own.reliable[i],
                         r[j]))
    fig, axes = new_axes(1 + bool(compared), ax, ncols=2, panel=(6.0, 4.0), what="reliability")
    _ranked(axes[0], est, n_labels)
    if compared:
        _against_measured(axes[1], compared, n_labels)
    return finish(fig, axes, show=show, save=save)


def _ranked(axis: Any, est: Estimates, n_labels: int) -> None:
    """Genes ranked by estimated r, each with its interval; the reliable ones filled and coloured."""
    from matplotlib.ticker import MaxNLocator

    order = np.argsort(-np.nan_to_num(est.cv_pcc, nan=-np.inf), kind="stable")
    rank = np.arange(1, len(order) + 1)
    cv, lo, hi, ok = est.cv_pcc[order], est.lo[order], est.hi[order], est.reliable[order]
    level = f"{est.level:.0%} interval" if est.level is not None else "interval"
    axis.vlines(rank, lo, hi, color="0.6", lw=1.0, label=level)
    axis.scatter(rank[ok], cv[ok], s=18, color="C0", edgecolor="k", linewidths=0.3, zorder=3,
                 label=f"reliable ({int(ok.sum())})")
    axis.scatter(rank[~ok], cv[~ok], s=14, color="0.75", edgecolor="0.3", linewidths=0.3, zorder=3,
                 label=f"not reliable ({int((~ok).sum())})")
    for k in range(min(n_labels, len(order))):
        axis.annotate(est.genes[order[k]], (rank[k], cv[k]), xytext=(4, 3), textcoords="offset points",
                      fontsize=8)
    axis.axhline(0.0, color="0.5", lw=0.8, ls="--")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("gene rank")
    axis.set_ylabel("estimated r on a new section")
    fdr = f", FDR {est.fdr:g}" if est.fdr is not None else ""
    axis.set_title(f"Estimated r per gene ({int(est.reliable.sum())} of {len(est.genes)} reliable{fdr})")
    axis.legend(frameon=False, fontsize=8, loc="upper right")


def _against_measured(axis: Any, compared: list[tuple], n_labels: int) -> None:
    """Estimated against measured r, one point per gene and section, with the identity line.

    The ``n_labels`` genes with the highest estimate are named (one section only).
    """
    from .._metrics import spearman_per_gene

    several = len(compared) > 1
    values = []
    for i, (sp, genes, cv, lo, hi, ok, r) in enumerate(compared):
        values.extend([cv, r, lo, hi])
        both = np.isfinite(cv) & np.isfinite(r)
        rho = spearman_per_gene(cv[both, None], r[both, None])[0] if both.sum() >= 2 else np.nan
        inside = int(((lo <= r) & (r <= hi))[both].sum())
        colour = f"C{i}" if several else "C0"
        name = f"{sp.name}: " if several else ""
        axis.hlines(r, lo, hi, color=colour if several else "0.6", lw=0.8, alpha=0.5)
        axis.scatter(cv, r, s=18, facecolors=[colour if o else "none" for o in ok], edgecolors=colour,
                     linewidths=0.8, zorder=3,
                     label=f"{name}Spearman ρ = {rho:.2f}; measured r in the interval: {inside} of "
                           f"{int(both.sum())} genes")
        if not several:
            for k in np.argsort(-np.nan_to_num(cv, nan=-np.inf), kind="stable")[:n_labels]:
                axis.annotate(genes[k], (cv[k], r[k]), xytext=(4, 3), textcoords="offset points", fontsize=8)
    finite = np.concatenate([v[np.isfinite(v)] for v in values] + [np.zeros(1)])
    lims = (float(finite.min()) - 0.05, float(finite.max()) + 0.05)
    axis.plot(lims, lims, color="k", lw=0.8, ls="--", label="identity")
    axis.set_xlim(lims)
    axis.set_ylim(lims)
    axis.set_xlabel("estimated r on a new section")
    axis.set_ylabel("measured r")
    axis.set_title("Estimated vs measured r" + ("" if several else f" on {compared[0][0].name}")
                   + " (filled: reliable)")
    axis.legend(frameon=False, fontsize=7, loc="upper left")
