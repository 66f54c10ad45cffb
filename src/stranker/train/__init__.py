"""Training: the loop (torch only)."""

from . import distributed
from .loop import TrainData, resolve_device, train

__all__ = ["TrainData", "distributed", "resolve_device", "train"]
