"""sr.pl.correlation: per-gene Pearson r of predicted against measured expression, ranked."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .._constants import Keys
from .._docs import doc_params
from .._errors import InputError
from ..section import Section
from ..write import modelled_genes, read_predictions
from ._utils import finish, measured, new_axes, sections


def gene_scores(
    sp: Section, *, layer: str, key: str, counts_layer: str | None, target_sum: float, n_heg: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Modelled genes, their r and HEG flags.

    r is ``var[f'{key}_pcc']`` when :func:`stranker.tl.evaluate` wrote it, else computed here.
    """
    from .._metrics import pearson_per_gene

    genes = modelled_genes(sp, layer)
    if not genes:
        raise InputError(f"Layer {layer!r} of section {sp.name!r} predicts no gene.")
    meas = measured(sp, genes, counts_layer, target_sum)
    col = f"{key}_pcc"
    if col in sp.table.var:
        r = sp.table.var[col].to_numpy(dtype=np.float64)[sp.table.var_names.get_indexer(genes)]
    else:
        r = pearson_per_gene(read_predictions(sp, layer, genes), meas).astype(np.float64)
    heg = np.zeros(len(genes), dtype=bool)
    heg[np.argsort(-meas.mean(0), kind="stable")[: min(n_heg, len(genes))]] = True
    return genes, r, heg


@doc_params()
def correlation(
    data: Any,
    *,
    layer: str = Keys.PREFIX,
    key: str = Keys.PREFIX,
    n_heg: int = 50,
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
    """Per-gene Pearson r of predicted against measured expression, genes ranked from best to worst.

    The ``n_heg`` most expressed genes (HEG, mclSTExp's definition: highest mean measured
    expression in the section) are marked; the legend gives the mean r over all genes (ACG) and
    over the HEG. One curve per section.

    Parameters
    ----------
    data
        SpatialData or AnnData with measured counts and ``layers[layer]``, or a list of sections.
    layer
        Layer of predicted expression.
    key
        Reads ``var[f'{key}_pcc']`` written by :func:`stranker.tl.evaluate`; computes r itself
        when it is absent.
    n_heg
        Number of most expressed genes to mark.
    n_labels
        Label this many best-predicted genes by name (single section only).
    counts_layer
        Layer of raw counts; ``None`` uses ``X``.
    target_sum
        Scaling of the measured side.
    show
        Show the figure; ``None`` shows it unless ``save`` is given.
    save
        File to write the figure to.
    ax
        Axes to draw into.
    {doc_tables}
    {doc_bin_size}

    Returns
    -------
    The :class:`matplotlib.axes.Axes` when the figure is not shown, else ``None``.
    """
    secs = sections(data, table_key=table_key, library_id=library_id, bin_size=bin_size)
    scores = [
        gene_scores(sp, layer=layer, key=key, counts_layer=counts_layer, target_sum=target_sum, n_heg=n_heg)
        for sp in secs
    ]
    fig, (axis,) = new_axes(1, ax, ncols=1, panel=(6.0, 4.0), what="correlation")
    for i, (sp, (genes, r, heg)) in enumerate(zip(secs, scores, strict=True)):
        order = np.argsort(-np.nan_to_num(r, nan=-np.inf), kind="stable")
        rank = np.arange(1, len(order) + 1)
        rs, hs = r[order], heg[order]
        colour = f"C{i}"
        label = f"{sp.name}: " if len(secs) > 1 else ""
        axis.plot(
            rank,
            rs,
            color=colour,
            lw=1.5,
            label=f"{label}all {len(genes)} genes (mean r = {np.nanmean(r):.3f})",
        )
        axis.scatter(
            rank[hs],
            rs[hs],
            s=16,
            color=colour if len(secs) > 1 else "C1",
            edgecolor="k",
            linewidths=0.3,
            zorder=3,
            label=f"{label}{int(heg.sum())} most expressed (mean r = {np.nanmean(r[heg]):.3f})",
        )
        if len(secs) == 1:
            for k in range(min(n_labels, len(order))):
                axis.annotate(
                    genes[order[k]],
                    (rank[k], rs[k]),
                    xytext=(6, -2 - 9 * k),
                    textcoords="offset points",
                    fontsize=8,
                )
    axis.axhline(0.0, color="0.5", lw=0.8, ls="--")
    axis.set_xlabel("gene rank")
    axis.set_ylabel("Pearson r (predicted vs measured)")
    axis.set_title("Per-gene correlation" + (f" on {secs[0].name}" if len(secs) == 1 else ""))
    axis.legend(frameon=False, fontsize=8, loc="upper right")
    return finish(fig, axis, show=show, save=save)
