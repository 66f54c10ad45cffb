"""Input: whole-slide images (SVS, NDPI, OME-TIFF, pyramidal TIFF) as lazily read SpatialData."""

from ._slide import read_slide

__all__ = ["read_slide"]
