"""Datasets: real her2st sections (pooch, verified) and an offline synthetic generator."""

from ._cohort import synthetic_cohort
from ._her2st import her2st
from ._her2st import sections as her2st_sections
from ._synthetic import synthetic

__all__ = ["her2st", "her2st_sections", "synthetic", "synthetic_cohort"]
