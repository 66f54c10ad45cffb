"""Input: whole slides (SVS, NDPI, OME-TIFF, pyramidal TIFF) as lazy SpatialData; Visium HD bins."""

from ._bins import aggregate_bins
from ._slide import read_slide

__all__ = ["aggregate_bins", "read_slide"]
