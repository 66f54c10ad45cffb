"""Preprocessing: genes (normalise, select), spatial smoothing, patches."""

from ._genes import normalize, select_genes
from ._patches import patches
from ._smooth import smooth

__all__ = ["normalize", "patches", "select_genes", "smooth"]
