"""Elements stranker adds to a SpatialData: who owns a name, and the one way they are added."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .._constants import Keys
from .._errors import InputError
from ..section.spatialdata import table_region

_ELEMENT_TYPES = ("images", "labels", "points", "shapes", "tables")


def _record(element: Any) -> dict:
    """Where an element keeps stranker's record: a table's ``uns``, a shapes' or image's ``attrs``."""
    return element.uns if hasattr(element, "uns") else element.attrs


def written_by_stranker(element: Any, key: str) -> bool:
    """Whether stranker added ``element`` to a SpatialData under the name ``key`` (so it may replace it)."""
    rec = _record(element).get(Keys.WRITTEN)
    return isinstance(rec, Mapping) and rec.get("key") == key


def check_free(
    sdata: Any,
    *,
    tables: Sequence[str] = (),
    shapes: Sequence[str] = (),
    images: Sequence[str] = (),
    arg: str = "key_added",
    fix: str | None = None,
) -> None:
    """Refuse names held by an element that stranker did not write there (before any work is done).

    A name is free when no element of any type holds it (SpatialData names are unique across types,
    whatever their case), or when the element of that type under that name is one stranker added.
    Shapes that stay annotated by a table not written in the same call are not replaced either.

    Parameters
    ----------
    sdata
        The SpatialData.
    tables, shapes, images
        Names of the elements to write.
    arg
        The argument that named them, for the message.
    fix
        What the message tells the user to do instead of passing another ``arg`` (for names the
        user did not choose).
    """
    fix = fix or f"Pass another `{arg}=`."
    wanted = {"tables": list(tables), "shapes": list(shapes), "images": list(images)}
    for kind, names in wanted.items():
        for name in names:
            for other in _ELEMENT_TYPES:
                for key, element in getattr(sdata, other).items():
                    if key.lower() != name.lower() or (
                        other == kind and key == name and written_by_stranker(element, key)
                    ):
                        continue
                    raise InputError(
                        f"The SpatialData holds {other} element {key!r}, which stranker did not write: "
                        f"it is not replaced. {fix}"
                    )
    for name in wanted["shapes"]:
        others = {k: t for k, t in sdata.tables.items() if k not in wanted["tables"]}
        users = [k for k, t in others.items() if name in table_region(t)[0]]
        if name in sdata.shapes and users:
            raise InputError(
                f"Shapes {name!r} are annotated by table(s) {users}: they are not replaced. {fix} "
                "Or delete those tables first."
            )


def add_elements(
    sdata: Any,
    *,
    tables: Mapping[str, Any] | None = None,
    shapes: Mapping[str, Any] | None = None,
    images: Mapping[str, Any] | None = None,
    by: str | None = None,
    arg: str = "key_added",
) -> None:
    """Add elements to a SpatialData: the one way stranker writes them.

    An element of the user's under a name is never replaced (:func:`check_free` refuses, naming
    ``arg``); one that stranker added earlier under that name is.

    Parameters
    ----------
    sdata
        The SpatialData.
    tables, shapes, images
        New elements by name (parsed by their ``spatialdata.models``); shapes and images are added
        before the tables that annotate them.
    by
        The stranker function that derived them (e.g. ``'sr.tl.predict'``), recorded in each element
        (``uns`` / ``attrs[Keys.WRITTEN]``; kept by a zarr round trip for tables and shapes, not for
        images) so that a later call may replace it; ``None`` for elements that are the data itself
        (a reader's).
    arg
        The argument that named them, for the message.
    """
    groups = {"images": dict(images or {}), "shapes": dict(shapes or {}), "tables": dict(tables or {})}
    check_free(sdata, **{k: list(v) for k, v in groups.items()}, arg=arg)
    for kind, elements in groups.items():
        for name, element in elements.items():
            if by is not None:
                _record(element)[Keys.WRITTEN] = {"by": by, "key": name}
            getattr(sdata, kind)[name] = element
