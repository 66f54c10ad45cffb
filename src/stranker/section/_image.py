"""The lazy image handle of a section: pyramid levels read window by window, as RGB uint8."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import InputError
from .._pixels import pixel_range, to_uint8


@dataclass
class ImageHandle:
    """A lazily read RGB image with one or more resolution levels.

    Parameters
    ----------
    levels
        Arrays of dims ``(c, y, x)`` (numpy or dask), finest first.
    scales
        For each level, how many level-0 pixels one pixel of the level spans (1.0 for level 0).
    name
        Where the image came from, for messages.
    white
        The value that is white; by default decided on first read by :func:`stranker._pixels.pixel_range`
        (from the coarsest level; ``None`` for ``uint8``).
    """

    levels: list[Any]
    scales: list[float]
    name: str = "image"
    white: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of level 0."""
        return int(self.levels[0].shape[1]), int(self.levels[0].shape[2])

    @property
    def n_channels(self) -> int:
        return int(self.levels[0].shape[0])

    def level_for(self, factor: float) -> int:
        """Return the coarsest level that still samples at least twice as finely as ``factor`` asks.

        ``factor`` is the number of level-0 pixels per output pixel. Keeping 2x oversampling before
        an antialiased resize keeps the patch close to one read from level 0.
        """
        best = 0
        for i, s in enumerate(self.scales):
            if s <= max(factor / 2.0, 1.0) + 1e-9 and s >= self.scales[best]:
                best = i
        return best

    def to_rgb(self, win: Any) -> np.ndarray:
        """Convert a ``(c, y, x)`` window of any level to ``(y, x, 3)`` uint8.

        A ``uint8`` image is read as it is; any other is 0–1, 0–255, 0–4095 or 0–65535 as decided once
        for the whole image from the values of its coarsest level (unless ``white`` was given), by the
        rule of :mod:`stranker._pixels`, which refuses an image it cannot read (all NaN, constant); the
        values are scaled by :func:`stranker._pixels.to_uint8`. A grey image is repeated into three
        channels, an alpha channel dropped.
        """
        win = np.asarray(win.compute() if hasattr(win, "compute") else win)
        if win.dtype not in (np.uint8, np.bool_) and self.white is None:
            coarsest = self.levels[int(np.argmax(self.scales))]
            self.white = pixel_range(coarsest, self.name, channel_axis=0)
        c = win.shape[0]
        if c == 4:
            win = win[:3]
        elif c == 1:
            win = np.repeat(win, 3, axis=0)
        elif c != 3:
            raise InputError(
                f"Image {self.name!r} has {c} channels; stranker expects an RGB H&E image (3 channels)."
            )
        try:
            win = to_uint8(win, self.white)
        except TypeError as e:
            raise InputError(f"Image {self.name!r}: {e}") from e
        return np.moveaxis(win, 0, -1)

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int, pad_value: int = 255) -> np.ndarray:
        """Read the window ``[y0:y1, x0:x1]`` of a level as ``(y, x, c)`` uint8, padding outside."""
        arr = self.levels[level]
        _, h, w = arr.shape
        out = np.full((y1 - y0, x1 - x0, 3), pad_value, dtype=np.uint8)
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        if cy1 <= cy0 or cx1 <= cx0:
            return out
        out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = self.to_rgb(arr[:, cy0:cy1, cx0:cx1])
        return out


class ScaledImage(ImageHandle):
    """Image whose level 0 is a full-resolution frame that may not be stored (Visium hires/lowres).

    ``scales[i]`` says how many full-resolution pixels one pixel of level ``i`` spans; the full
    resolution itself is addressed through the finest stored level.
    """

    @property
    def shape(self) -> tuple[int, int]:
        s = self.scales[0]
        return int(round(self.levels[0].shape[1] * s)), int(round(self.levels[0].shape[2] * s))

