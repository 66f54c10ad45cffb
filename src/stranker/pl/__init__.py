"""Plotting: gene maps, per-gene correlation and reliability, training history, embedding UMAP."""

from ._correlation import correlation
from ._embedding import embedding
from ._gene_map import gene_map
from ._history import history
from ._kaplan_meier import kaplan_meier
from ._reliability import reliability

__all__ = ["correlation", "embedding", "gene_map", "history", "kaplan_meier", "reliability"]
