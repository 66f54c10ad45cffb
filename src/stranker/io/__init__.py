"""Input: whole slides (SVS, NDPI, OME-TIFF, pyramidal TIFF) as lazy SpatialData; Visium HD bins; HEST-1k."""

from ._bins import aggregate_bins
from ._hest import read_hest, read_hest_patches
from ._slide import read_slide

__all__ = ["aggregate_bins", "read_hest", "read_hest_patches", "read_slide"]
