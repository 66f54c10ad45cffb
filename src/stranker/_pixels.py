"""Pixel values of any numeric type -> uint8: the one conversion every image reader uses."""

from __future__ import annotations

from typing import Any

import numpy as np


def float_range(values: Any) -> float:
    """Top of the value range of a float image, from the whole image (or a whole pyramid level of it).

    ``1.0`` when no finite value exceeds 1 (the 0–1 convention of scikit-image), else ``255.0``.
    Decided once per image, never per window: a dark window of a 0–255 image must not read as 0–1.
    """
    v = np.asarray(values)
    finite = v[np.isfinite(v)] if v.size else v
    return 1.0 if finite.size == 0 or float(finite.max()) <= 1.0 + 1e-6 else 255.0


def to_uint8(values: np.ndarray, float_max: float | None = None) -> np.ndarray:
    """Scale an image array to uint8, whatever its dtype.

    Parameters
    ----------
    values
        Pixel values. Unsigned and signed integers are scaled by their dtype's range
        (``0 .. iinfo.max``; negative values clip to 0), booleans map to 0 / 255.
    float_max
        For float arrays: the value that is white, ``1.0`` or ``255.0``, decided for the whole image
        by :func:`float_range` (or the file's metadata). Required for floats.

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
        scale = 255.0 / float(np.iinfo(dt).max)
        out = values.astype(np.float64 if dt.itemsize > 2 else np.float32) * scale
    elif np.issubdtype(dt, np.floating):
        if float_max is None:
            raise ValueError("A float image needs `float_max` (1.0 or 255.0), decided for the whole image.")
        out = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=float_max, neginf=0.0)
        out *= 255.0 / float(float_max)
    else:
        raise TypeError(f"Cannot read pixel values of dtype {dt} as an image.")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
