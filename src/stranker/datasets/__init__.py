"""Datasets: her2st sections (pooch, verified), HEST-1k samples (Hugging Face Hub), synthetic generators."""

from ._cohort import synthetic_cohort
from ._her2st import her2st
from ._her2st import sections as her2st_sections
from ._hest import hest
from ._hest_synthetic import synthetic_hest
from ._synthetic import synthetic

__all__ = ["her2st", "her2st_sections", "hest", "synthetic", "synthetic_cohort", "synthetic_hest"]
