"""Preprocessing: genes (normalise, select), spatial smoothing, patches, frozen features, splits."""

from ._embed import embed_patches
from ._genes import normalize, select_genes
from ._patches import patches
from ._smooth import smooth
from ._split import split_sections

__all__ = ["embed_patches", "normalize", "patches", "select_genes", "smooth", "split_sections"]
