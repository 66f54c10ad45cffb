"""In-memory multiscale images for the datasets."""

from __future__ import annotations

from typing import Any

import numpy as np


def multiscale(rgb: np.ndarray, scale_factors: list[int], **kwargs: Any) -> Any:
    """Return a SpatialData multiscale image of a ``(c, y, x)`` array whose coarser levels are computed once.

    Without this, every read of a coarse level recomputes it from full resolution through dask
    (seconds per patch on a her2st section instead of milliseconds).
    """
    from spatialdata.models import Image2DModel

    image = Image2DModel.parse(rgb, dims=("c", "y", "x"), c_coords=["r", "g", "b"],
                               scale_factors=scale_factors, **kwargs)
    return image.map_over_datasets(lambda ds: ds.persist())
