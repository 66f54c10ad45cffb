"""The check of ``key_added`` before a model writes its outputs (never over data stranker did not write)."""

from __future__ import annotations

from typing import Any

from .._errors import InputError
from ..section import Section
from .tables import unique_tables


def is_run_record(rec: Any) -> bool:
    """Whether ``uns[key_added]`` is the record of a stranker fit / predict (its outputs may be replaced)."""
    return isinstance(rec, dict) and {"genes", "in_sample", "params"} <= set(rec)


def check_key_added(secs: list[Section], key_added: Any) -> None:
    """Refuse a ``key_added`` that is not a name, or whose keys hold data stranker did not write.

    A previous stranker result under the same key (``uns[key_added]`` is its run record) is replaced;
    a layer, ``obsm['X_{key_added}']`` or ``uns`` entry of the user's own (e.g. ``key_added='counts'``)
    is never overwritten.
    """
    if not isinstance(key_added, str) or not key_added.strip():
        raise InputError(f"`key_added` must be a non-empty string, got {key_added!r}.")
    for sp in unique_tables(secs):
        t = sp.table
        if is_run_record(t.uns.get(key_added)):
            continue
        taken = [f"layers[{key_added!r}]"] * (key_added in t.layers)
        taken += [f"obsm['X_{key_added}']"] * (f"X_{key_added}" in t.obsm)
        taken += [f"uns[{key_added!r}]"] * (key_added in t.uns)
        if taken:
            raise InputError(
                f"`key_added={key_added!r}` would overwrite {', '.join(taken)} in the table of section "
                f"{sp.name!r}, which no stranker fit or predict wrote. Pass another `key_added=`."
            )
