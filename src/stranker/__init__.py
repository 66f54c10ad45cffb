"""stranker: ranking-aligned image-gene models for spatial transcriptomics on H&E slides."""

__version__ = "0.1.0"

from . import datasets, io, pl, pp, tl
from ._errors import InputError
from ._settings import settings

__all__ = ["InputError", "datasets", "io", "pl", "pp", "settings", "tl", "__version__"]


def __getattr__(name: str):
    # The model class and the torch-only packages pull in torch: import them only when asked for.
    if name == "Model":
        from .tl._model import Model

        return Model
    if name in ("model", "train"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'stranker' has no attribute {name!r}")
