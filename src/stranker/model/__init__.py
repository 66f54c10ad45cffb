"""The model core: pure torch (+ timm, numpy); nothing here knows AnnData."""

from .aligner import Aligner, retrieve
from .config import PRESETS, Config, make_config

__all__ = ["Aligner", "Config", "PRESETS", "make_config", "retrieve"]
