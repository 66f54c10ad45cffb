"""Shared parameter docs (scanpy's ``_doc_params``): one text for the paragraphs many functions repeat.

A docstring line holding only ``{name}`` is replaced by the paragraph ``name``, indented as that line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

doc_elements = """\
image_key, shapes_key, table_key, library_id
    Which elements to use when an object has several."""

doc_tables = """\
table_key, library_id
    Which table / library when there are several."""

doc_bin_size = """\
bin_size
    Visium HD: the bin size in µm (2, 8, 16) whose table and squares to use; the same as
    ``table_key='square_{bin_size:03d}um'``."""

doc_library_key = """\
library_key
    AnnData with several libraries: the ``obs`` column naming each spot's library (squidpy's
    ``library_key``; default ``'library_id'``)."""

doc_resolution = """\
spot_diameter_um, microns_per_pixel
    The physical scale, for data that does not record it (give at most one; it overrides what the
    data records): the spots' diameter in µm (e.g. ``100`` for legacy ST), or µm per full-resolution
    pixel. Visium read from Space Ranger output (spatialdata-io, squidpy, scanpy) needs neither: its
    55 µm spot gives the scale."""

doc_crossval = """\
cv
    Number of folds.
seed
    Seed of the folds and of the models (default ``sr.settings.seed``).
use_rep
    ``obsm`` key of the slide features (``None``: ``X``). Unused by ``'attention'``.
n_pcs
    Reduce the standardised features to this many principal components within each fold.
tiles_key
    ``uns`` key of the tile embeddings (for ``'attention'``).
epochs
    Training steps of the attention network.
key_added
    Prefix of the written keys.
copy
    Write into a copy of ``cohort`` and return it (the dict is in its ``uns``) instead of the dict.
model
    Deprecated name of ``method``."""

PARAMS = {"doc_crossval": doc_crossval, "doc_elements": doc_elements, "doc_library_key": doc_library_key,
          "doc_tables": doc_tables, "doc_bin_size": doc_bin_size, "doc_resolution": doc_resolution}


def doc_params(**params: str) -> Callable[[F], F]:
    """Fill the ``{name}`` lines of the decorated object's docstring with ``params`` (default: all shared)."""
    texts = params or PARAMS

    def fill(obj: F) -> F:
        lines = []
        for line in (obj.__doc__ or "").split("\n"):
            name = line.strip()
            if name.startswith("{") and name.endswith("}") and name[1:-1] in texts:
                pad = line[: len(line) - len(line.lstrip())]
                lines.extend(pad + t if t else t for t in texts[name[1:-1]].split("\n"))
            else:
                lines.append(line)
        obj.__doc__ = "\n".join(lines)
        return obj

    return fill
