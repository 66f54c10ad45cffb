"""Pixel values of any numeric type -> uint8: the one conversion every image reader uses.

The pixel range of an image (the value that is white) is decided here, once for the whole image:

- ``uint8``: 0–255; ``bool``: 0 / 1. The dtype settles it and no pixel is looked at.
- Other integer and float types: from the largest finite value of the image (for a pyramid, of its
  coarsest level; an alpha channel is not looked at). A float image whose values are at most 1 (to
  within half an 8-bit level, 1/510) is 0–1; else an image whose values are at most 255 is 0–255
  (8-bit data in a wider type), at most 4095 is 0–4095 (12-bit), at most 65535 is 0–65535 (16-bit),
  each capped at the dtype's own maximum (an ``int16`` is at most 0–32767). Integer values beyond
  65535 are read on the dtype's full range; a float image with values beyond 65535 is refused.
- Refused, as images stranker cannot read: no finite value (all NaN); a constant image (no dynamic
  range); a range chosen by a few stray values, i.e. fewer than :data:`STRAY_FRACTION` of the pixels
  above the next smaller range (a 0–1 float image with a pixel at 1.02, 8-bit data with a hot pixel
  at 4000), which read on the larger range would be an all-black image.

Negative values read as black (0) and NaN as black; ``+inf`` as white.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ._errors import InputError

TOPS = (255.0, 4095.0, 65535.0)  # 8-, 12-, 16-bit data, whatever the dtype holding it
STRAY_FRACTION = 0.01  # fewer pixels than this above the next smaller range: stray values, refused
_STRIP = 1 << 24  # values per strip when the range is computed strip by strip


def _tops(dtype: np.dtype) -> list[float]:
    """Candidate white levels of a dtype, smallest first."""
    if np.issubdtype(dtype, np.floating):
        return [1.0, *TOPS]
    top = float(np.iinfo(dtype).max)
    return [t for t in TOPS if t < top] + [top]


def white_level(strips: Iterable[np.ndarray], dtype: Any, name: str = "image") -> float | None:
    """Return the value that is white in an image, decided from its pixels (the rule of this module).

    Parameters
    ----------
    strips
        The image's values (of its coarsest level), in one or more arrays, read one at a time: not
        read at all for ``uint8`` and ``bool``.
    dtype
        The image's dtype.
    name
        The image, for messages.

    Returns
    -------
    ``None`` for ``uint8`` and ``bool`` (the dtype settles it), else the white value to pass to
    :func:`to_uint8`.

    Raises
    ------
    InputError
        For an image that cannot be read: all NaN, constant, or a range set by a few stray values.
    """
    dt = np.dtype(dtype)
    if dt == np.uint8 or dt == np.bool_:
        return None
    if not (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)):
        raise InputError(f"Image {name!r} has pixel values of dtype {dt}; stranker reads numbers only.")
    tops = _tops(dt)
    n, lo, hi = 0, np.inf, -np.inf
    above = np.zeros(len(tops))
    for strip in strips:
        v = np.asarray(strip).reshape(-1)
        if np.issubdtype(v.dtype, np.floating):
            v = v[np.isfinite(v)]
        if not v.size:
            continue
        n += v.size
        lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
        above += [np.count_nonzero(v > t) for t in tops]
    fix = "Convert it to uint8 (0–255) yourself, e.g. with skimage.util.img_as_ubyte, and pass that."
    if n == 0:
        raise InputError(f"Image {name!r} holds no finite pixel value (all NaN): there is nothing to read.")
    if hi <= lo:
        raise InputError(
            f"Image {name!r} is constant (every pixel is {hi:g}): an image without dynamic range has no "
            "tissue to read, and no pixel range can be told from it. Check that the right image was given."
        )
    # a float within half an 8-bit level of a range still fits it (a 0-1 image resampled to 1.001)
    tol = 0.5 / 255 if np.issubdtype(dt, np.floating) else 0.0
    fits = [i for i, t in enumerate(tops) if hi <= t * (1 + tol)]
    if not fits:
        raise InputError(
            f"Image {name!r} has values up to {hi:g}: not a 0–1, 8-, 12- or 16-bit image. {fix}"
        )
    i = fits[0]
    if i > 0 and above[i - 1] < STRAY_FRACTION * n:
        lower = tops[i - 1]
        raise InputError(
            f"Image {name!r}: {int(above[i - 1])} of {n} values ({above[i - 1] / n:.2%}) exceed {lower:g}, "
            f"up to {hi:g}. Read as 0–{tops[i]:g} it would be almost black; read as 0–{lower:g} those "
            f"values would be clipped. Clip them (`np.clip(img, 0, {lower:g})`) if it is a 0–{lower:g} "
            f"image, or {fix[0].lower()}{fix[1:]}"
        )
    return float(tops[i])


def pixel_range(values: Any, name: str = "image", *, channel_axis: int | None = None) -> float | None:
    """White value of a whole image (or a whole pyramid level): :func:`white_level` of an array.

    ``values`` is any array (numpy, dask, zarr); it is read strip by strip along its first axis other than
    ``channel_axis``, whose 4th channel (alpha) is not looked at.
    """
    dt = np.dtype(values.dtype)
    if dt == np.uint8 or dt == np.bool_:
        return None
    shape = tuple(int(s) for s in values.shape)
    key: list[Any] = [slice(None)] * len(shape)
    if channel_axis is not None and shape[channel_axis] == 4:
        key[channel_axis] = slice(0, 3)
    axis = next((a for a in range(len(shape)) if a != channel_axis), 0) if shape else 0

    def strips():
        if not shape:
            yield np.asarray(values)
            return
        rows = max(1, _STRIP // max(1, int(np.prod(shape)) // max(shape[axis], 1)))
        for r0 in range(0, shape[axis], rows):
            k = list(key)
            k[axis] = slice(r0, min(r0 + rows, shape[axis]))
            win = values[tuple(k)]
            yield np.asarray(win.compute() if hasattr(win, "compute") else win)

    return white_level(strips(), dt, name)


def float_range(values: Any) -> float:
    """Top of the value range of a float image (``1.0`` or ``255.0``, ...): :func:`pixel_range` of it."""
    return pixel_range(np.asarray(values, dtype=np.float64))


def to_uint8(values: np.ndarray, white: float | None = None) -> np.ndarray:
    """Scale an image array to uint8, whatever its dtype.

    Parameters
    ----------
    values
        Pixel values. Booleans map to 0 / 255; negative values and NaN to 0.
    white
        The value that is white, decided for the whole image by :func:`pixel_range` (the rule of
        :mod:`stranker._pixels`). Required for floats; integers without it are scaled by their dtype's
        range (``0 .. iinfo.max``), which image readers never rely on.

    Returns
    -------
    A uint8 array of the same shape (values rounded to the nearest level).
    """
    values = np.asarray(values)
    dt = values.dtype
    if dt == np.uint8:
        return values
    if dt == np.bool_:
        return values.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(dt, np.integer):
        top = float(np.iinfo(dt).max) if white is None else float(white)
        out = values.astype(np.float64 if dt.itemsize > 2 else np.float32) * (255.0 / top)
    elif np.issubdtype(dt, np.floating):
        if white is None:
            raise ValueError(
                "A float image has no default white (no float_max): pass `white`, decided for the whole "
                "image by `pixel_range`."
            )
        out = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=float(white), neginf=0.0)
        out *= 255.0 / float(white)
    else:
        raise TypeError(f"Cannot read pixel values of dtype {dt} as an image.")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
