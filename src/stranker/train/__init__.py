"""Training: the loop (torch only)."""

from . import checkpoint, distributed
from .loop import TrainData, resolve_device, train

__all__ = ["TrainData", "checkpoint", "distributed", "resolve_device", "train"]
