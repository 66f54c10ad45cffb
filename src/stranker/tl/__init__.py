"""Tools: fit, predict and evaluate image-gene models."""

from ._evaluate import evaluate
from ._fit import fit
from ._predict import predict

__all__ = ["evaluate", "fit", "predict"]
