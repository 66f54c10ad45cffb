"""Tools: fit, predict and evaluate image-gene models."""

from ._backbones import backbones
from ._classify import classify
from ._cohort import predict_slides
from ._evaluate import evaluate
from ._fit import fit
from ._predict import predict
from ._slides import embed_slides
from ._survival import survival

__all__ = ["backbones", "classify", "embed_slides", "evaluate", "fit", "predict", "predict_slides",
           "survival"]
