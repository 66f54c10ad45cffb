"""The check of ``key_added`` before a model writes its outputs (never over data stranker did not write)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .._errors import InputError
from .._settings import logger
from ..section import Section
from .tables import unique_tables


def is_run_record(rec: Any) -> bool:
    """Whether ``uns[key_added]`` is the record of a stranker fit / predict (its outputs may be replaced)."""
    return isinstance(rec, dict) and {"genes", "in_sample", "params"} <= set(rec)


def check_name(key: Any, arg: str = "`key_added`") -> None:
    """Refuse a key that a SpatialData (zarr) store cannot hold, before any work is done.

    SpatialData names elements and table keys with letters, digits, ``_``, ``-`` and ``.`` only, not
    starting with ``__`` and not ``.`` or ``..`` (:func:`spatialdata.models.check_valid_name`); the keys
    stranker derives (``X_{key}``, ``{key}_table``, ...) are then valid too.
    """
    if not isinstance(key, str) or not key.strip():
        raise InputError(f"{arg} must be a non-empty string, got {key!r}.")
    bad = sorted({c for c in key if not (c.isalnum() or c in "_-.")})
    if bad or key.startswith("__") or key in (".", ".."):
        fixed = re.sub(r"_+", "_", "".join(c if c.isalnum() or c in "-." else "_" for c in key)).strip("_.")
        why = (f"it holds {''.join(bad)!r}" if bad else "it starts with '__'" if key.startswith("__")
               else "it is a path")
        raise InputError(
            f"{arg} {key!r} cannot be stored in a SpatialData (zarr) store: {why}; keys take letters, "
            f"digits, '_', '-' and '.' only and do not start with '__'. Pass e.g. {fixed or 'stranker'!r}."
        )


def check_key_added(secs: list[Section], key_added: Any, model: Any = None) -> None:
    """Refuse a ``key_added`` that is not a storable name, or whose keys hold data stranker did not write.

    A previous stranker result under the same key (``uns[key_added]`` is its run record) is replaced
    when this call writes every row of the table, or when it came from the same ``model``; a call that
    would leave another model's predictions in the table's other rows under the same key (two models'
    results under one record) is refused. A layer, ``obsm['X_{key_added}']`` or ``uns`` entry of the
    user's own (e.g. ``key_added='counts'``), or one that differs from the keys only in case (a zarr
    store cannot hold both), is never overwritten.

    Parameters
    ----------
    secs
        The sections the outputs go to.
    key_added
        The prefix of the keys written.
    model
        The model whose outputs are written (``None``: a model being fitted, never an earlier one).
    """
    check_name(key_added)
    for sp in unique_tables(secs):
        t = sp.table
        rec = t.uns.get(key_added)
        if is_run_record(rec):
            _check_replace(sp, [s for s in secs if s.table is t], rec, key_added, model)
        names = {"layers": key_added, "obsm": f"X_{key_added}", "uns": key_added}
        taken = [f"{field}[{k!r}]" for field, name in names.items() for k in getattr(t, field)
                 if k.lower() == name.lower() and not (k == name and is_run_record(rec))]
        if taken:
            raise InputError(
                f"`key_added={key_added!r}` would overwrite {', '.join(taken)} in the table of section "
                f"{sp.name!r}, which no stranker fit or predict wrote under that key (a zarr store cannot "
                "hold two keys that differ only in case either). Pass another `key_added=`."
            )


def _check_replace(sp: Section, secs: list[Section], rec: dict, key_added: str, model: Any) -> None:
    """Refuse to mix another model's predictions with this call's under one key of one table."""
    t = sp.table
    if _same_model(rec, model):
        return
    rows = np.unique(np.concatenate([np.asarray(s.rows) for s in secs]))
    if len(rows) < t.n_obs:
        raise InputError(
            f"The table of section {sp.name!r} holds predictions of another model under `key_added="
            f"{key_added!r}` (uns[{key_added!r}]: trained on {_plain(rec.get('train_sections'))}); this call "
            f"writes {len(rows)} of its {t.n_obs} rows, so the others would keep that model's predictions "
            "under this model's record. Pass another `key_added=`, or predict on every section of the table "
            "in one call."
        )
    logger.info(f"Replacing the results of another model under key {key_added!r} in the table of section "
                f"{sp.name!r} (trained on {_plain(rec.get('train_sections'))}).")


def _same_model(rec: dict, model: Any) -> bool:
    """Whether the run record ``rec`` was written by ``model`` (its fit: sections, duration and genes)."""
    meta = getattr(model, "meta", None)
    if meta is None or rec.get("fit_seconds") is None:
        return False
    genes = set(_plain(rec.get("genes", []))) | set(_plain(rec.get("genes_absent", [])))
    return (_plain(rec.get("train_sections")) == _plain(getattr(meta, "sections", None))
            and _plain(rec.get("fit_seconds")) == _plain(getattr(meta, "fit_seconds", None))
            and genes == set(_plain(list(model.genes))))


def _plain(x: Any) -> Any:
    """Turn what a zarr round trip may return (arrays, numpy scalars) into plain lists and numbers."""
    if isinstance(x, np.ndarray | list | tuple):
        return [_plain(v) for v in x]
    return x.item() if isinstance(x, np.generic) else x
