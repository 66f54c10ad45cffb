"""The datasets' in-memory pyramids: numpy levels identical to spatialdata's own (xarray coarsen)."""

import numpy as np
import pytest

from stranker.datasets._image import multiscale


@pytest.mark.parametrize("shape", [(3, 101, 203), (3, 64, 64), (3, 257, 130)])
def test_levels_equal_spatialdata_default(shape):
    from spatialdata.models import Image2DModel

    a = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    ref = Image2DModel.parse(a, dims=("c", "y", "x"), c_coords=["r", "g", "b"], scale_factors=[2, 2, 2],
                             chunks=(3, 64, 64))
    got = multiscale(a, [2, 2, 2], chunks=(3, 64, 64))
    assert list(got) == list(ref)
    for k in ref:
        r, g = ref[k]["image"], got[k]["image"]
        np.testing.assert_array_equal(g.values, r.values)
        assert g.dtype == r.dtype and g.data.chunks == r.data.chunks
        assert all(np.array_equal(g[c], r[c]) for c in r.coords)
