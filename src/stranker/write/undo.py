"""Undo on failure: a public call that raises leaves the user's objects as they were.

Each writer assigns whole new values (never edits arrays in place), so a shallow record of the
containers a call may touch (tables' ``X``, ``layers``, ``obsm``, ``obs``, ``var``, ``uns``; a
SpatialData's elements) is enough to put them back, whatever step failed, even in the middle of
writing one section after another.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

_KINDS = {"SpatialData": "spatialdata", "AnnData": "anndata"}
_ELEMENTS = ("images", "labels", "points", "shapes", "tables")


def _kind(obj: Any) -> str | None:
    for cls in type(obj).__mro__:
        if cls.__name__ in _KINDS and cls.__module__.split(".")[0] == _KINDS[cls.__name__]:
            return cls.__name__
    return None


def _restore_mapping(live: Any, saved: dict[str, Any]) -> None:
    for k in [k for k in live.keys() if k not in saved]:
        del live[k]
    for k, v in saved.items():
        if k not in live or live[k] is not v:
            live[k] = v


def _snapshot_table(t: Any) -> Callable[[], None]:
    x, obs, var = t.X, t.obs.copy(deep=False), t.var.copy(deep=False)
    layers, obsm, uns = dict(t.layers), dict(t.obsm), dict(t.uns)

    def restore() -> None:
        if t.X is not x:
            t.X = x
        if not (t.obs.columns.equals(obs.columns) and t.obs.equals(obs)):
            t.obs = obs
        if not (t.var.columns.equals(var.columns) and t.var.equals(var)):
            t.var = var
        _restore_mapping(t.layers, layers)
        _restore_mapping(t.obsm, obsm)
        _restore_mapping(t.uns, uns)

    return restore


def snapshot(data: Any) -> Callable[[], None]:
    """Record the containers of ``data`` (SpatialData, AnnData or a list); the result puts them back."""
    items = list(data) if isinstance(data, list | tuple) else [data]
    undo: list[Callable[[], None]] = []
    seen: set[int] = set()
    for item in items:
        if id(item) in seen:
            continue
        seen.add(id(item))
        kind = _kind(item)
        if kind == "AnnData":
            undo.append(_snapshot_table(item))
        elif kind == "SpatialData":
            elements = {name: dict(getattr(item, name)) for name in _ELEMENTS}
            undo.extend(_snapshot_table(t) for t in elements["tables"].values())

            def restore(sdata: Any = item, saved: dict = elements) -> None:
                for name, content in saved.items():
                    _restore_mapping(getattr(sdata, name), content)

            undo.append(restore)

    def restore_all() -> None:
        for fn in reversed(undo):
            fn()

    return restore_all


def unchanged_on_failure(arg: str = "data") -> Callable:
    """Decorate a public function so that, when it raises, its argument ``arg`` is left as it was."""

    def decorate(func: Callable) -> Callable:
        sig = inspect.signature(func)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind_partial(*args, **kwargs)
            restore = snapshot(bound.arguments.get(arg))
            try:
                return func(*args, **kwargs)
            except BaseException:
                restore()
                raise

        return wrapper

    return decorate
