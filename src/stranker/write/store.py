"""The user's SpatialData stores on disk: a new store written whole, or a call's results written into one.

- before any work: :func:`check_destination` (``--out`` replaces only a store stranker wrote there, never
  the input or a folder that holds it), :func:`check_store_writable` and :func:`check_space`;
- :func:`write_new_store`: a whole store at a new path, built beside it and renamed into place, marked
  as stranker's in its root attributes (``attrs[MARK]``: the path it was written to and its elements);
- :func:`write_in_place`: only what a call added or replaced, given the :func:`element_state` before it.
  Keys of a table (``layers[k]``, ``obsm[k]``, ``uns[k]``, columns of ``obs`` and ``var``) and whole
  elements stranker added are each written beside the store and renamed into it; every other file of
  the store stays as it was (but the column list of a dataframe that gains a column, and the root
  metadata, which indexes the store, consolidated anew when the store had it consolidated).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._atomic import move_into_place, temporary_beside, uninterrupted
from .._errors import InputError
from .elements import written_by_stranker

MARK = "stranker_store"
_KINDS = ("images", "labels", "points", "shapes", "tables")
_META = {"zarr.json", ".zgroup", ".zattrs", ".zmetadata"}
_FIELDS = ("layers", "obsm", "uns")  # what a model's outputs add to a table: written key by key
_FRAMES = ("obs", "var")  # and column by column


def absolute(path: str | Path) -> Path:
    """Return ``path`` with ``~`` expanded, made absolute (not resolved: links stay as they are)."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def root_attributes(path: str | Path) -> dict:
    """Return the root attributes of the zarr store at ``path`` (v3 or v2); raise if unreadable."""
    path = Path(path)
    if (path / "zarr.json").is_file():
        return json.loads((path / "zarr.json").read_text()).get("attributes") or {}
    return json.loads((path / ".zattrs").read_text())


def stranker_store(path: str | Path) -> dict | None:
    """Return the record in the root attributes of a store stranker wrote at ``path``, else ``None``.

    A store copied or moved elsewhere (its record names another path) is not taken for one.
    """
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return None
    try:
        attrs = root_attributes(path)
    except (OSError, ValueError, AttributeError):
        return None
    rec = attrs.get(MARK) if isinstance(attrs, dict) else None
    return rec if isinstance(rec, dict) and rec.get("path") == str(absolute(path)) else None


def check_replaceable(path: Path) -> None:
    """Raise :class:`FileExistsError` unless ``path`` is empty or a store stranker wrote there (only that)."""
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return  # an empty folder: nothing to lose
    rec = stranker_store(path)
    if rec is None:
        kind = "a folder" if path.is_dir() else "a file"
        raise FileExistsError(
            f"{path} exists and is {kind} that stranker did not write (no record of a `stranker predict "
            f"--out` to this path in its root attributes): it is never replaced, with --overwrite or not. "
            "Choose a new path for --out."
        )
    ours = set(rec.get("elements") or [])
    foreign = sorted(p.name for p in path.iterdir() if p.name not in _META and p.name not in _KINDS)
    foreign += [f"{kind}/{e}" for kind, e in _on_disk(path) if f"{kind}/{e}" not in ours]
    if foreign:
        raise FileExistsError(
            f"{path} is a store stranker wrote, but it now also holds {foreign[:5]}, which stranker did not "
            "write: it is not replaced. Move them out of it, or choose a new path for --out."
        )


def check_destination(src: str | Path, out: str | Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that would replace the input, hold it, lie in it, or is not stranker's store.

    ``--out`` may be a new path, an empty folder or, with ``overwrite``, a store that an earlier
    ``stranker predict --out`` wrote at that same path and that holds nothing else since.
    """
    src, out = Path(src), Path(out)
    s, o = Path(os.path.realpath(src)), Path(os.path.realpath(out))
    if o == s:
        raise InputError("--out names the input store; leave --out out to write into it in place.")
    if s.is_relative_to(o):
        raise InputError(f"--out {out} holds the input store {src}: it is never replaced. Choose a new path "
                         "for --out.")
    if o.is_relative_to(s):
        raise InputError(f"--out {out} lies inside the input store {src}. Choose a path outside it, or leave "
                         "--out out to write into the input store in place.")
    if (out.exists() or out.is_symlink()) and not (out.is_dir() and not any(out.iterdir())):
        check_replaceable(out)
        if not overwrite:
            raise FileExistsError(f"{out} holds a store stranker wrote before; pass --overwrite to replace "
                                  "it.")


def check_store_writable(store: str | Path) -> None:
    """Raise :class:`InputError` when the results cannot be written into ``store`` (read-only, no rights)."""
    from .._atomic import check_writable

    store = Path(os.path.realpath(store))
    check_writable(store.parent, f"{store} (written in place through a folder beside it)",
                   "Make it writable, or write a new store elsewhere with --out.")
    dirs = [store, *(store / k for k in _KINDS)]
    dirs += [store / "tables" / e / f for k, e in _on_disk(store) if k == "tables" for f in _FIELDS]
    locked = [d for d in dirs if d.is_dir() and not os.access(d, os.W_OK | os.X_OK)]
    if locked:
        raise InputError(
            f"{store} cannot be written in place: {locked[0]} is read-only. Make it writable, or write a new "
            "store with --out."
        )


def check_space(where: str | Path, needed: int) -> None:
    """Raise :class:`InputError` when the disk of ``where`` has fewer than ``needed`` bytes free."""
    import shutil

    from .._atomic import nearest_existing

    here = nearest_existing(absolute(where))
    free = shutil.disk_usage(here).free
    if free < needed:
        raise InputError(
            f"Not enough space on the disk of {here}: the results need about {_mb(needed)}, {_mb(free)} "
            "are free. Free some space, or write elsewhere with --out."
        )


def store_size(path: str | Path) -> int:
    """Bytes held by the files of a store."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink())


def write_new_store(sdata: Any, target: str | Path, *, source: str | Path | None = None) -> None:
    """Write ``sdata`` to the new store ``target`` whole or not at all, marked as stranker's.

    It is written into a temporary folder beside ``target``, then renamed to it; what is at ``target``
    is replaced only when it is a store stranker wrote there (:func:`check_replaceable`, asked again
    just before). ``sdata.attrs[MARK]`` records the path and the elements written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sdata.attrs = {**sdata.attrs, MARK: {
        "by": "stranker predict", "version": _version(), "path": str(absolute(target)),
        "source": None if source is None else str(absolute(source)),
        "elements": sorted(f"{kind}/{name}" for kind, name, _ in sdata.gen_elements()),
    }}
    with clear_os_errors(target, "nothing was written"), temporary_beside(target) as tmp:
        sdata.write(tmp / "store", update_sdata_path=False)
        move_into_place(tmp / "store", target, check_replaceable)


def element_state(sdata: Any) -> dict[tuple[str, str], tuple]:
    """Record what a call may change in ``sdata``: its elements, and its tables' containers (by identity)."""
    state = {}
    for kind in _KINDS:
        for name, el in getattr(sdata, kind).items():
            if kind == "tables":
                fields = {f: dict(getattr(el, f)) for f in _FIELDS}
                fields.update({f: getattr(el, f).copy(deep=False) for f in _FRAMES})
                state[kind, name] = (el, fields, _rest(el))
            else:
                state[kind, name] = (el, None, None)
    return state


def write_in_place(sdata: Any, store: str | Path, before: dict[tuple[str, str], tuple]) -> list[str]:
    """Write what changed in ``sdata`` since ``before`` (:func:`element_state`) into its ``store``.

    New, replaced or dropped keys of a table's ``layers``, ``obsm`` and ``uns`` and columns of its ``obs``
    and ``var`` are written one by one, and elements stranker added whole; each is written into a
    temporary folder beside the store, then renamed into it (what it replaces is moved aside first,
    and put back if any step fails). No other file of the store is touched, except the list of
    columns of a dataframe that gains or loses one and the consolidated root metadata, rewritten last.
    Returns the paths written, relative to the store.
    """
    store = Path(os.path.realpath(store))
    elements, keys = _changes(sdata, before)
    if not elements and not keys:
        return []
    v3 = (store / "zarr.json").is_file()
    consolidated = _consolidated(store, v3)
    with clear_os_errors(store, "the store is as it was"), temporary_beside(store) as tmp:
        moves = _write_keys(keys, store, tmp, v3) + _write_elements(sdata, elements, store, tmp, v3)
        _swap(moves, store, tmp, consolidated, v3)
    return [str(dest.relative_to(store)) for _, dest in moves]


@contextlib.contextmanager
def clear_os_errors(where: Path, state: str) -> Iterator[None]:
    """Say what a full disk or a read-only / forbidden path means, and that ``state`` (it holds)."""
    try:
        yield
    except OSError as err:
        why = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
        if hasattr(errno, "EDQUOT"):
            why[errno.EDQUOT] = "the disk quota is exceeded"
        if err.errno not in why:
            raise
        raise OSError(err.errno, f"Could not write {where}: {why[err.errno]} ({err.filename or where}); "
                                 f"{state}. Free space or fix the permissions, or write elsewhere.") from err


# ------------------------------------------------------------------------------------------------ helpers
def _version() -> str:
    from .. import __version__

    return __version__


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"


def _on_disk(store: Path) -> list[tuple[str, str]]:
    """(kind, name) of the elements in a store's folders."""
    return [(k, p.name) for k in _KINDS if (store / k).is_dir()
            for p in sorted((store / k).iterdir()) if p.name not in _META]


def _rest(t: Any) -> tuple:
    """Return a table's parts that a model's outputs never change (its matrix, names, pairwise arrays)."""
    return (t.X, t.obs_names, t.var_names, dict(t.obsp), dict(t.varm), dict(t.varp), t.raw)


def _same(a: tuple, b: tuple) -> bool:
    for x, y in zip(a, b, strict=True):
        if isinstance(x, dict):
            if x.keys() != y.keys() or any(x[k] is not y[k] for k in x):
                return False
        elif x is not y and not (hasattr(x, "equals") and x.equals(y)):
            return False
    return True


_DROP = object()  # a key the call removed (an output of an earlier call that this one does not write)


def _changes(sdata: Any, before: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str, str, Any]]]:
    """Elements added or replaced whole; (table, field, key, value or _DROP) of tables that stayed.

    For ``obs`` and ``var``, key ``None`` carries the new column order when columns came or went.
    """
    now = element_state(sdata)
    elements, keys, odd = [], [], [f"{k}/{n} removed" for k, n in before if (k, n) not in now]
    for (kind, name), (el, fields, rest) in now.items():
        old = before.get((kind, name))
        if old is None or old[0] is not el:
            if old is not None and not written_by_stranker(old[0], name):
                odd.append(f"{kind}/{name} replaced")
            elements.append((kind, name))
            continue
        if kind != "tables":
            continue
        if not _same(old[2], rest):
            odd.append(f"tables/{name}: X, the names of its rows or columns, or their like changed")
        for f in _FIELDS:
            was, now_f = old[1][f], fields[f]
            keys += [(name, f, k, _DROP) for k in was if k not in now_f]
            keys += [(name, f, k, v) for k, v in now_f.items() if was.get(k) is not v]
        for f in _FRAMES:
            was, df = old[1][f], fields[f]
            keys += [(name, f, k, _DROP) for k in was.columns if k not in df.columns]
            keys += [(name, f, k, df[k]._values) for k in df.columns
                     if k not in was.columns or not df[k].equals(was[k])]
            if list(was.columns) != list(df.columns):
                keys.append((name, f, None, [str(c) for c in df.columns]))
    if odd:  # stranker's writers never do these: refuse rather than write over the user's data
        raise RuntimeError(f"Not written in place (stranker writes only its own keys and elements): {odd}.")
    return elements, keys


def _write_keys(keys: list, store: Path, tmp: Path, v3: bool) -> list[tuple[Path | None, Path]]:
    """Write each new key of a table as a zarr node beside the store; return (written, destination).

    A dropped key has no written node (it is only moved out of the store); a new column order is a new
    copy of the dataframe group's attributes file.
    """
    if not keys:
        return []
    import zarr
    from anndata.io import write_elem

    group = zarr.open_group(tmp / "keys", mode="w", zarr_format=3 if v3 else 2)
    moves: list[tuple[Path | None, Path]] = []
    missing: dict[tuple[str, str], dict] = {}
    for name, field, key, value in keys:
        where = store / "tables" / name / field
        if not (store / "tables" / name).is_dir():
            raise RuntimeError(f"tables/{name} is not in {store}: not written in place.")
        new = tmp / "keys" / str(len(moves))
        if key is None:  # the column order of obs / var
            meta = where / ("zarr.json" if v3 else ".zattrs")
            doc = json.loads(meta.read_text())
            (doc["attributes"] if v3 else doc)["column-order"] = value
            new.write_text(json.dumps(doc, indent=2))
            moves.append((new, meta))
        elif value is _DROP:
            moves.append((None, where / key))
        elif where.is_dir():  # anndata writes the group of every field, empty or not
            write_elem(group, new.name, value)
            moves.append((new, where / key))
        else:
            missing.setdefault((name, field), {})[key] = value
    for (name, field), values in missing.items():
        write_elem(group, str(len(moves)), values)
        moves.append((tmp / "keys" / str(len(moves)), store / "tables" / name / field))
    return moves


def _write_elements(sdata: Any, elements: list, store: Path, tmp: Path, v3: bool) -> list[tuple[Path, Path]]:
    """Write the elements added whole into a store beside ``store``; return (written, destination)."""
    if not elements:
        return []
    from spatialdata import SpatialData

    formats = None
    if not v3:  # a store of zarr v2 (spatialdata < 0.5) gets elements of the formats it holds
        from spatialdata._io.format import SpatialDataContainerFormatV01

        formats = [SpatialDataContainerFormatV01()]
    part, built = SpatialData(), tmp / "elements"
    part.write(built, sdata_formats=formats)
    moves, new_kinds = [], set()
    for kind, name in sorted(elements, key=lambda e: _KINDS.index(e[0])):  # tables after what they annotate
        getattr(part, kind)[name] = getattr(sdata, kind)[name]
        part.write_element(name, sdata_formats=formats)
        if (store / kind).is_dir():
            moves.append((built / kind / name, store / kind / name))
        elif kind not in new_kinds:  # the store has no such group yet: it comes whole
            new_kinds.add(kind)
            moves.append((built / kind, store / kind))
    return moves


def _swap(moves: list[tuple[Path | None, Path]], store: Path, tmp: Path, consolidated: bool,
          v3: bool) -> None:
    """Rename each written node into the store (``None``: move out only); on any failure put all back."""
    done: list[tuple[Path | None, Path, Path | None]] = []
    aside = tmp / "old"
    aside.mkdir()
    try:
        for new, dest in moves:
            old = None
            if dest.exists() or dest.is_symlink():
                old = aside / str(len(done))
                os.rename(dest, old)
            try:
                if new is not None:
                    os.rename(new, dest)
            except BaseException:
                if old is not None:
                    os.rename(old, dest)
                raise
            done.append((new, dest, old))
        if consolidated:
            _consolidate(store, v3)
    except BaseException:
        with uninterrupted():
            for new, dest, old in reversed(done):
                if new is not None:
                    os.rename(dest, new)
                if old is not None:
                    os.rename(old, dest)
        raise


def _consolidated(store: Path, v3: bool) -> bool:
    if not v3:
        return (store / ".zmetadata").is_file()
    try:
        return bool(json.loads((store / "zarr.json").read_text()).get("consolidated_metadata"))
    except (OSError, ValueError):
        return False


def _consolidate(store: Path, v3: bool) -> None:
    import warnings

    import zarr

    with warnings.catch_warnings():  # files that are not zarr's (a README) are named in warnings: they stay
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(store), zarr_format=3 if v3 else 2)
