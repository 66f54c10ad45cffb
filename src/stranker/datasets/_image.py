"""In-memory multiscale images for the datasets."""

from __future__ import annotations

from typing import Any

import numpy as np


def multiscale(rgb: np.ndarray, scale_factors: list[int], **kwargs: Any) -> Any:
    """Return a SpatialData multiscale image of a ``(c, y, x)`` array whose coarser levels are computed once.

    Without this, every read of a coarse level recomputes it from full resolution through dask
    (seconds per patch on a her2st section instead of milliseconds). The levels are those of
    spatialdata's default (xarray ``coarsen(boundary='trim', side='right').mean()`` cast back to the
    dtype, each level from the one before), computed here in numpy: a her2st section's pyramid takes
    about a second instead of tens of seconds through dask's scheduler.
    """
    import dask.array as da
    from spatialdata.models import Image2DModel

    image = Image2DModel.parse(rgb, dims=("c", "y", "x"), c_coords=["r", "g", "b"],
                               scale_factors=scale_factors, **kwargs)
    level = np.asarray(rgb)
    for i, factor in enumerate(scale_factors, start=1):
        level = coarsen(level, int(factor))
        node = image[f"scale{i}"]
        (name,) = node.data_vars
        arr = node[name]
        if arr.shape != level.shape:  # pragma: no cover - a spatialdata whose levels we do not reproduce
            raise RuntimeError(f"pyramid level {i}: spatialdata made {arr.shape}, numpy {level.shape}")
        node[name] = arr.copy(data=da.from_array(level, chunks=arr.data.chunks))
    return image.map_over_datasets(lambda ds: ds.persist())


def coarsen(x: np.ndarray, f: int) -> np.ndarray:
    """Mean over ``f x f`` blocks of the last two axes, windows aligned to the end (xarray ``side='right'``).

    Leading rows/columns that do not fill a block are dropped; the mean is cast back to the dtype
    (truncated, as numpy's ``astype`` does).
    """
    c, h, w = x.shape
    h2, w2 = h // f, w // f
    v = x[:, h - h2 * f:, w - w2 * f:]
    if np.issubdtype(x.dtype, np.unsignedinteger) and x.dtype.itemsize <= 2:
        acc = np.zeros((c, h2, w2), dtype=np.uint32 if x.dtype.itemsize == 1 else np.uint64)
        for dy in range(f):
            for dx in range(f):
                acc += v[:, dy::f, dx::f]
        return (acc // (f * f)).astype(x.dtype)  # exact: the floor of the mean, as the cast truncates it
    return v.reshape(c, h2, f, w2, f).mean((2, 4)).astype(x.dtype)
