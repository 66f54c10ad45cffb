"""sr.pl.gene_map: measured beside predicted expression over the H&E, one colour scale per gene or panel."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._constants import Keys
from .._docs import doc_params
from .._errors import InputError
from .._settings import logger
from ..section import Section
from ..write import read_predictions
from ._utils import finish, has_measured, lighten, limit, measured, new_axes, sections, thumbnail


def _panel(
    ax: Any,
    sp: Section,
    thumb: Any,
    values: np.ndarray,
    *,
    cmap: Any,
    norm: Any,
    size: float,
    lighten_by: float,
    title: str,
) -> Any:
    """Spots of one section as filled circles of their real diameter over the lightened image."""
    from matplotlib.collections import EllipseCollection

    if thumb is not None:
        ax.imshow(lighten(thumb.rgb, lighten_by), extent=thumb.extent, interpolation="antialiased")
    d = sp.diameter if np.isfinite(sp.diameter) and sp.diameter > 0 else _spacing(sp.centers)
    coll = EllipseCollection(
        widths=d * size,
        heights=d * size,
        angles=0.0,
        units="xy",
        offsets=sp.centers,
        offset_transform=ax.transData,
        cmap=cmap,
        norm=norm,
        linewidths=0,
    )
    coll.set_array(np.asarray(values, dtype=np.float64))
    ax.add_collection(coll)
    if thumb is not None:
        left, right, bottom, top = thumb.extent
    else:
        pad = d
        left, right = sp.centers[:, 0].min() - pad, sp.centers[:, 0].max() + pad
        top, bottom = sp.centers[:, 1].min() - pad, sp.centers[:, 1].max() + pad
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)  # image rows grow downwards
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title)
    return coll


def _spacing(centers: np.ndarray) -> float:
    """Median nearest-neighbour distance (a spot size for sections that do not give one)."""
    if len(centers) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(centers).query(centers, k=2)
    return float(np.median(dist[:, 1])) or 1.0


@doc_params()
def gene_map(
    data: Any,
    genes: str | Sequence[str],
    *,
    layer: str = Keys.PREFIX,
    measured_expression: bool | None = None,
    reliable_only: bool = False,
    show_interval: bool = False,
    counts_layer: str | None = None,
    target_sum: float = 1e4,
    cmap: str = "viridis",
    vmin: float | str | None = None,
    vmax: float | str | None = None,
    scale: str = "shared",
    scalebar: bool = True,
    size: float = 1.0,
    lighten_image: float = 0.35,
    max_px: int = 800,
    ncols: int = 4,
    panel_size: float = 4.0,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    ax: Any = None,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    library_id: str | None = None,
    library_key: str | None = None,
    bin_size: int | None = None,
):
    """Measured and predicted expression of each gene side by side over the H&E image.

    Each gene gets one row: the measured expression (``log1p(counts / total * target_sum)``, the
    scale the model predicts on) beside the prediction in ``layers[layer]``, with one colour scale
    and one colour bar shared by the two (or one each, ``scale='separate'``), and Pearson r across
    the section's spots in the title; a gene that the model does not call reliable
    (``var[f'{layer}_reliable']``, see :func:`stranker.pl.reliability`) is marked ``unreliable`` there.
    A section without measured expression (such as the ``'stranker_table'`` that
    :func:`stranker.tl.predict` adds to an image-only slide) shows the prediction only. Spots are
    drawn as filled circles of their real diameter over a lightened thumbnail of the image, read at
    a coarse pyramid level.

    Parameters
    ----------
    data
        SpatialData or AnnData (squidpy layout), or a list (one block of rows per section), after
        :func:`stranker.tl.predict` or :func:`stranker.tl.fit`.
    genes
        One gene name or a list; each must be a gene the model predicts.
    layer
        Layer of predicted expression.
    measured_expression
        Show the measured side; ``None`` shows it whenever the table holds measurements (it does
        not when its ``X`` is the prediction itself).
    reliable_only
        Leave out the genes that the model does not call reliable (``var[f'{layer}_reliable']``, written
        by :func:`stranker.tl.predict` for a model fitted on several sections), naming them in a log line.
    show_interval
        Add a panel per gene of the width of its interval at each spot (``upper - lower`` of
        ``layers[f'{layer}_lower']`` and ``layers[f'{layer}_upper']``, written by
        :func:`stranker.tl.predict`), beside the prediction, with its own colour scale (``'magma'``):
        where the prediction is least certain.
    counts_layer
        Layer of raw counts for the measured side; ``None`` uses ``X``.
    target_sum
        Scaling of the measured side (as in :func:`stranker.tl.fit`).
    cmap
        Matplotlib colour map.
    vmin, vmax
        Limits of each gene's colour scale: numbers, percentiles such as ``'p99'``, or ``None`` for
        the 1st and 99th percentiles of the measured and predicted values of that gene together
        (of each panel's own values with ``scale='separate'``).
    scale
        ``'shared'``: measured and predicted share one colour scale, so equal colours are equal
        values; ``'separate'``: each panel has its own scale and colour bar, which shows the spatial
        pattern of a prediction that is right in shape but compressed in range (r is unchanged).
    scalebar
        Draw a scale bar (in µm) on the first panel of each section whose resolution is known.
    size
        Spot diameter as a multiple of the real one.
    lighten_image
        How far the image is blended towards white (0 keeps it as it is).
    max_px
        Longest side of the image thumbnail, in pixels.
    ncols
        Panels per row when only predictions are shown (without ``show_interval``).
    panel_size
        Width of one panel, in inches.
    show
        Show the figure; ``None`` shows it unless ``save`` is given.
    save
        File to write the figure to (format from the suffix, e.g. ``'gene_map.png'``).
    ax
        Axes to draw into: one per panel (2 per gene with measurements, 1 without; one more per gene
        with ``show_interval``).
    {doc_elements}
    {doc_library_key}
    {doc_bin_size}

    Returns
    -------
    The :class:`matplotlib.figure.Figure` when it is not shown, else ``None``.

    Examples
    --------
    >>> sr.tl.predict(model, sdata)  # doctest: +SKIP
    >>> sr.pl.gene_map(sdata, ["ERBB2", "CD74"], save="gene_map.png")  # doctest: +SKIP
    """
    from matplotlib import colormaps

    from .._metrics import pearson_per_gene

    if scale not in ("shared", "separate"):
        raise InputError(f"`scale` must be 'shared' or 'separate', got {scale!r}.")
    genes = [genes] if isinstance(genes, str) else list(genes)
    if not genes:
        raise InputError("`genes` is empty: name at least one gene.")
    secs = sections(
        data, image_key=image_key, shapes_key=shapes_key, table_key=table_key,
        library_id=library_id, library_key=library_key, bin_size=bin_size,
    )
    colormap = colormaps[cmap]
    unreliable = [_unreliable(sp, layer, genes) for sp in secs]
    if reliable_only:
        genes = _reliable_only(secs, genes, layer, unreliable)

    # every value first, so bad input raises before a figure exists
    rows = []
    for sp, bad in zip(secs, unreliable, strict=True):
        pred = read_predictions(sp, layer, genes)
        show_meas = (
            has_measured(sp, layer, counts_layer) if measured_expression is None else measured_expression
        )
        meas = measured(sp, genes, counts_layer, target_sum) if show_meas else None
        r = pearson_per_gene(pred, meas) if meas is not None else None
        width = _interval_width(sp, layer, genes) if show_interval else None
        rows.append((sp, pred, meas, r, width, bad or set()))
    with_meas = [row[2] is not None for row in rows]
    if any(with_meas) and not all(with_meas):
        raise InputError("Some sections have measured expression and some do not: plot them separately.")
    paired = all(with_meas)
    per_gene = (2 if paired else 1) + bool(show_interval)
    n_panels = len(secs) * len(genes) * per_gene
    ncol = per_gene if per_gene > 1 else max(1, min(ncols, n_panels))
    fig, axes = new_axes(n_panels, ax, ncols=ncol, panel=(panel_size, panel_size), what="gene_map")
    if ax is None:  # panels take the section's aspect; room for titles and one colour bar per gene
        bars = ((2 if scale == "separate" else 1) if paired else 1) + bool(show_interval)
        bars = bars if per_gene > 1 else ncol
        _fit_size(fig, secs[0], panel_size, ncols=ncol, nrows=-(-n_panels // ncol), bars=bars)
    prefix = len(secs) > 1
    k = 0
    for sp, pred, meas, r, width, bad in rows:
        thumb = thumbnail(sp, max_px=max_px)
        first = k
        for j, gene in enumerate(genes):
            both = pred[:, j] if meas is None else np.concatenate([pred[:, j], meas[:, j]])
            norm = _norm(both, vmin, vmax)
            name = f"{sp.name}: {gene}" if prefix else gene
            opts = dict(cmap=colormap, size=size, lighten_by=lighten_image)
            if meas is not None:
                own = scale == "separate"
                m_norm = _norm(meas[:, j], vmin, vmax) if own else norm
                p_norm = _norm(pred[:, j], vmin, vmax) if own else norm
                m_coll = _panel(axes[k], sp, thumb, meas[:, j], title=f"{name} measured", norm=m_norm, **opts)
                rj = r[j]
                rtxt = "r = n/a" if not np.isfinite(rj) else f"r = {rj:.2f}"
                rtxt += ", unreliable" if gene in bad else ""
                coll = _panel(axes[k + 1], sp, thumb, pred[:, j], title=f"{name} predicted ({rtxt})",
                              norm=p_norm, **opts)
                if own:
                    fig.colorbar(m_coll, ax=axes[k], shrink=0.8, pad=0.02)
                    fig.colorbar(coll, ax=axes[k + 1], shrink=0.8, pad=0.02, label="log1p expression")
                else:
                    pair = [axes[k], axes[k + 1]]
                    fig.colorbar(coll, ax=pair, shrink=0.8, pad=0.02, label="log1p expression")
                k += 2
            else:
                title = f"{name} predicted" + (" (unreliable)" if gene in bad else "")
                coll = _panel(axes[k], sp, thumb, pred[:, j], title=title, norm=norm, **opts)
                fig.colorbar(coll, ax=axes[k], shrink=0.8, pad=0.02, label="log1p expression")
                k += 1
            if width is not None:
                w_coll = _panel(axes[k], sp, thumb, width[:, j], title=f"{name} interval width",
                                norm=_norm(width[:, j], None, None), **{**opts, "cmap": colormaps["magma"]})
                fig.colorbar(w_coll, ax=axes[k], shrink=0.8, pad=0.02, label="upper - lower")
                k += 1
        if scalebar and sp.microns_per_pixel:
            _scalebar(axes[first], float(sp.microns_per_pixel))
    return finish(fig, fig, show=show, save=save)


def _unreliable(sp: Section, layer: str, genes: list[str]) -> set[str] | None:
    """Those of ``genes`` that ``var[f'{layer}_reliable']`` does not call reliable (``None``: no column)."""
    col = f"{layer}_reliable"
    if col not in sp.table.var:
        return None
    flags = sp.table.var[col].to_numpy(dtype=bool)
    return {g for g, i in zip(genes, sp.gene_columns(genes), strict=True) if i >= 0 and not flags[i]}


def _reliable_only(
    secs: list[Section], genes: list[str], layer: str, unreliable: list[set[str] | None]
) -> list[str]:
    """``genes`` less those some section does not call reliable, named in a log line."""
    lacking = [sp.name for sp, bad in zip(secs, unreliable, strict=True) if bad is None]
    if lacking:
        raise InputError(
            f"`reliable_only=True` needs `var[{layer + '_reliable'!r}]`, which section(s) {lacking} lack: "
            "predict with a model fitted on several sections (reliability=True), or pass reliable_only=False."
        )
    hidden = set().union(*unreliable)
    kept = [g for g in genes if g not in hidden]
    if hidden:
        names = [g for g in genes if g in hidden]
        logger.info(f"Not drawing {len(names)} gene(s) that the model does not call reliable "
                    f"(`var[{layer + '_reliable'!r}]`): {names}")
    if not kept:
        raise InputError(f"None of the genes {genes[:10]} is called reliable: pass reliable_only=False.")
    return kept


def _interval_width(sp: Section, layer: str, genes: list[str]) -> np.ndarray:
    """``upper - lower`` of each spot and gene, from the interval layers ``sr.tl.predict`` wrote."""
    names = [f"{layer}_lower", f"{layer}_upper"]
    missing = [n for n in names if n not in sp.table.layers]
    if missing:
        raise InputError(
            f"`show_interval=True` needs layers {missing} in section {sp.name!r}: predict with a model "
            "fitted on several sections (reliability=True), or pass show_interval=False."
        )
    return read_predictions(sp, names[1], genes) - read_predictions(sp, names[0], genes)


def _scalebar(ax: Any, mpp: float) -> None:
    """Draw a bar of a round length in µm, about a fifth of the panel wide, in the lower left corner."""
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    left, right = ax.get_xlim()
    want = abs(right - left) * mpp / 5  # µm
    um = max(n * 10.0**e for e in range(-1, 6) for n in (1, 2, 5) if n * 10.0**e <= max(want, 0.1))
    label = f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"
    bar = AnchoredSizeBar(ax.transData, um / mpp, label, "lower left", pad=0.3, borderpad=0.4, sep=3,
                          frameon=True, size_vertical=0, color="black")
    bar.patch.set(facecolor="white", alpha=0.85, edgecolor="none")
    bar.stranker_um = um
    ax.add_artist(bar)


def _norm(values: np.ndarray, vmin: float | str | None, vmax: float | str | None) -> Any:
    """Colour normalisation of ``values``: limits from ``vmin`` / ``vmax`` (default 1st-99th percentile)."""
    from matplotlib.colors import Normalize

    lo, hi = limit(vmin, values, 1.0), limit(vmax, values, 99.0)
    return Normalize(vmin=lo, vmax=max(hi, lo + 1e-6))


def _fit_size(fig: Any, sp: Section, width: float, *, ncols: int, nrows: int, bars: int) -> None:
    """Size the figure so that each panel has the aspect of the section."""
    c = sp.centers
    span = (
        np.ptp(c, axis=0) + (sp.diameter if np.isfinite(sp.diameter) else 0.0) if len(c) > 1 else (1.0, 1.0)
    )
    aspect = float(np.clip(span[1] / span[0], 0.3, 3.0)) if span[0] > 0 else 1.0
    fig.set_size_inches(width * ncols + 0.9 * bars, nrows * (width * aspect + 0.5))
