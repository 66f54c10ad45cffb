"""Training: the loop (torch only)."""

from .loop import TrainData, resolve_device, train

__all__ = ["TrainData", "resolve_device", "train"]
