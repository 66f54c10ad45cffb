"""Shared plumbing of the plots: figure/axes handling, saving and showing, the H&E thumbnail, values."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import InputError
from ..section import Section


def pyplot():
    """Import pyplot only when a plot is drawn (``import stranker`` stays light)."""
    import matplotlib.pyplot as plt

    return plt


def new_axes(n: int, ax: Any, *, ncols: int, panel: tuple[float, float], what: str):
    """``n`` axes: the user's (one Axes or a sequence of ``n``) or a new constrained-layout grid.

    Returns the figure and a flat list of ``n`` axes.
    """
    plt = pyplot()
    if ax is not None:
        axes = list(np.ravel(ax)) if isinstance(ax, Sequence | np.ndarray) else [ax]
        if len(axes) != n:
            raise InputError(
                f"{what} draws {n} panel(s) but `ax` holds {len(axes)}; pass {n} axes or `ax=None`."
            )
        return axes[0].figure, axes
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, grid = plt.subplots(
        nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained", squeeze=False
    )
    flat = list(grid.ravel())
    for extra in flat[n:]:
        extra.set_visible(False)
    return fig, flat[:n]


def finish(fig: Any, ret: Any, *, show: bool | None, save: str | os.PathLike | None, dpi: int | None = None):
    """Save to ``save`` (format from its suffix), show, and return ``ret`` when the figure is not shown.

    ``show=None`` shows the figure unless it is being saved (scanpy shows by default too). The saved
    file holds everything drawn, legends outside the axes included (a tight bounding box).
    """
    plt = pyplot()
    if save is not None:
        fig.savefig(os.fspath(save), dpi=dpi or fig.dpi, bbox_inches="tight")
    if show is None:
        show = save is None
    if show:
        plt.show()
        return None
    return ret


def sections(data: Any, **keys: Any) -> list[Section]:
    """Sections with a table, image optional (the adapter does the format work)."""
    secs = as_list(data, **keys)
    for sp in secs:
        if sp.table is None:
            raise InputError(f"Section {sp.name!r} has no table: run `sr.tl.predict(model, data)` first.")
    return secs


def as_list(data: Any, **keys: Any) -> list[Section]:
    from ..section import as_sections

    return as_sections(
        data, need_image=False, need_table=False, **{k: v for k, v in keys.items() if v is not None}
    )


def has_measured(sp: Section, layer: str, counts_layer: str | None) -> bool:
    """Whether the table holds measured expression, not only the predictions ``sr.tl.predict`` put in ``X``.

    A table made by ``sr.tl.predict`` for an image-only slide holds its predictions in ``X`` and says
    so in ``uns[layer]['x_is_prediction']``.
    """
    if counts_layer is not None:
        return True
    if sp.table.X is None:
        return False
    return not bool((sp.table.uns.get(layer) or {}).get("x_is_prediction", False))


def measured(sp: Section, genes: Sequence[str], counts_layer: str | None, target_sum: float) -> np.ndarray:
    """Measured expression on the model's target scale: ``log1p(counts / total * target_sum)``."""
    from .._expression import log_expression

    return log_expression(sp, genes, counts_layer, target_sum)


# --------------------------------------------------------------------------------------------
# the H&E thumbnail
# --------------------------------------------------------------------------------------------
@dataclass
class Thumbnail:
    """An RGB crop of the image and where it lies in level-0 pixels (``extent`` for ``imshow``)."""

    rgb: np.ndarray
    extent: tuple[float, float, float, float]  # left, right, bottom, top (level-0 px)


def thumbnail(sp: Section, *, max_px: int = 800, margin: float | None = None) -> Thumbnail | None:
    """Read the image around the spots at the coarsest pyramid level that still gives ``max_px`` pixels.

    The crop is the spots' bounding box plus ``margin`` level-0 pixels (default: one spot diameter).
    The full-resolution level is never read unless the image is already small.
    """
    if sp.image is None or sp.n_spots == 0:
        return None
    from PIL import Image

    img = sp.image
    d = sp.diameter if np.isfinite(sp.diameter) else 0.0
    m = d if margin is None else float(margin)
    h0, w0 = img.shape
    x0 = max(float(sp.centers[:, 0].min()) - d / 2 - m, 0.0)
    x1 = min(float(sp.centers[:, 0].max()) + d / 2 + m, float(w0))
    y0 = max(float(sp.centers[:, 1].min()) - d / 2 - m, 0.0)
    y1 = min(float(sp.centers[:, 1].max()) + d / 2 + m, float(h0))
    if x1 <= x0 or y1 <= y0:
        return None
    factor = max(x1 - x0, y1 - y0) / max_px  # level-0 pixels per output pixel
    level = img.level_for(2.0 * factor)  # the coarsest level no coarser than the output
    s = img.scales[level]
    lx0, lx1 = int(np.floor(x0 / s)), int(np.ceil(x1 / s))
    ly0, ly1 = int(np.floor(y0 / s)), int(np.ceil(y1 / s))
    rgb = img.read(level, ly0, ly1, lx0, lx1)
    out_w = max(1, int(round((lx1 - lx0) * s / max(factor, 1e-9))))
    out_h = max(1, int(round((ly1 - ly0) * s / max(factor, 1e-9))))
    if out_w < rgb.shape[1]:
        rgb = np.asarray(Image.fromarray(rgb).resize((out_w, out_h), Image.Resampling.LANCZOS))
    return Thumbnail(rgb=rgb, extent=(lx0 * s, lx1 * s, ly1 * s, ly0 * s))


def lighten(rgb: np.ndarray, amount: float) -> np.ndarray:
    """Blend an RGB image towards white by ``amount`` (0 keeps it, 1 gives white)."""
    return (rgb.astype(np.float32) * (1.0 - amount) + 255.0 * amount).astype(np.uint8)


def limit(value: float | str | None, values: np.ndarray, default: float) -> float:
    """Read a colour limit (number, percentile ``'p99'``, ``None`` for ``default``) into a number."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0
    if value is None:
        return float(np.percentile(finite, default))
    if isinstance(value, str):
        if not value.startswith("p"):
            raise InputError(f"A colour limit must be a number or a percentile such as 'p99', got {value!r}.")
        return float(np.percentile(finite, float(value[1:])))
    return float(value)
