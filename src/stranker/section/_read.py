"""The one entry point: SpatialData | AnnData | a list of either -> :class:`Section` s.

Each format is one module of this package (``spatialdata``, ``anndata``; Visium HD naming and bins in
``visium_hd``; patch geometry and reading in ``patches``). Adding a format is adding a module and one
branch of :func:`as_sections`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._errors import InputError
from ._record import Section


def as_sections(
    data: Any,
    *,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    library_id: str | None = None,
    library_key: str | None = None,
    coordinate_system: str | None = None,
    bin_size: int | None = None,
    spot_diameter_um: float | None = None,
    microns_per_pixel: float | None = None,
    need_image: bool = True,
    need_table: bool = True,
) -> list[Section]:
    """Turn a SpatialData, an AnnData in squidpy layout, or a list of either into Section.

    Parameters
    ----------
    data
        The user's object(s).
    image_key, shapes_key, table_key
        Elements of a SpatialData; detected when there is exactly one candidate.
    library_id
        Library of an AnnData's ``uns['spatial']``; detected when there is one.
    library_key
        Column of an AnnData's ``obs`` that holds each spot's library (squidpy's ``library_key``);
        default ``'library_id'`` when the AnnData holds several libraries.
    coordinate_system
        Coordinate system that links image and spots; detected when one is shared (or when the
        shared ones place the spots on the same image pixels).
    bin_size
        Visium HD: bin size in micrometres (2, 8, 16): uses table ``'square_{bin_size:03}um'`` and the
        squares it annotates (``spatialdata_io.visium_hd`` layout). Each bin is one spot.
    spot_diameter_um, microns_per_pixel
        The physical scale, for data that does not record it (at most one): the spots' diameter in µm
        (e.g. 100 for legacy ST), or µm per full-resolution pixel. Overrides what the data records.
    need_image, need_table
        Raise when the section has no image / no table.

    Returns
    -------
    One :class:`Section` per section.
    """
    items = list(data) if isinstance(data, list | tuple) else [data]
    if not items:
        raise InputError("Got an empty list: pass at least one SpatialData or AnnData.")
    out: list[Section] = []
    for i, item in enumerate(items):
        kind = kind_of(item)
        if kind == "spatialdata":
            from .spatialdata import from_spatialdata

            sp = from_spatialdata(
                item,
                image_key=image_key,
                shapes_key=shapes_key,
                table_key=table_key,
                coordinate_system=coordinate_system,
                bin_size=bin_size,
                spot_diameter_um=spot_diameter_um,
                microns_per_pixel=microns_per_pixel,
                need_image=need_image,
                need_table=need_table,
            )
        elif kind == "anndata":
            from .anndata import from_anndata

            sp = from_anndata(
                item, library_id=library_id, library_key=library_key, spot_diameter_um=spot_diameter_um,
                microns_per_pixel=microns_per_pixel, need_image=need_image,
            )
        else:
            raise InputError(
                f"Item {i} is a {type(item).__name__}; stranker takes a SpatialData, an AnnData in "
                "squidpy layout (obsm['spatial'], uns['spatial']), or a list of these."
            )
        if len(items) > 1 and sp.name in {s.name for s in out}:
            sp.name = f"{sp.name}_{i}"
        out.append(sp)
    return out


def kind_of(obj: Any) -> str:
    """``'spatialdata'``, ``'anndata'`` or ``'other'``: the format of a user's object."""
    for cls in type(obj).__mro__:
        if cls.__name__ == "SpatialData" and cls.__module__.startswith("spatialdata"):
            return "spatialdata"
        if cls.__name__ == "AnnData" and cls.__module__.startswith("anndata"):
            return "anndata"
    return "other"


def choose(kind: str, candidates: Sequence[str], key: str | None, arg: str, where: str) -> str:
    """Pick a key among candidates; the error lists them."""
    candidates = list(candidates)
    if key is not None:
        if key not in candidates:
            raise InputError(f"{kind} {key!r} not found in {where}; candidates: {candidates}.")
        return key
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise InputError(f"{where} has no {kind}.")
    raise InputError(f"{where} has several {kind}s {candidates}: choose one with `{arg}=`.")

