"""Files and folders written whole: built beside their target, then renamed into place (stdlib only)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def sibling(path: Path, tag: str) -> Path:
    """Return a fresh, unused hidden name beside ``path`` for a folder being written or replaced."""
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}")


def move_into_place(tmp: Path, path: Path, check: Callable[[Path], None]) -> None:
    """Rename the written folder ``tmp`` to ``path``, first moving what is there aside (then deleted).

    ``check(path)`` raises when what is at ``path`` may not be replaced; it is asked again each time
    another process got there first. On failure, what was at ``path`` is put back.
    """
    aside: list[Path] = []
    done = False
    try:
        for _ in range(100):
            try:
                os.rename(tmp, path)  # atomic; succeeds when path is absent or an empty folder
                done = True
                return
            except OSError:
                if not path.exists() and not path.is_symlink():
                    raise  # not a clash with what is there: e.g. permissions
                check(path)  # it may have changed since (another process wrote there)
                old = sibling(path, "replaced")
                try:
                    os.rename(path, old)
                except FileNotFoundError:  # another process moved it first
                    continue
                aside.append(old)
        raise OSError(f"Could not move {tmp.name} into {path}: other processes keep writing there.")
    finally:
        if not done and aside and not path.exists():
            os.rename(aside.pop(0), path)  # put back what was there
        for old in aside:
            if old.is_symlink():  # a link to the folder was moved aside, not the folder
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)


def write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write a file through ``write(tmp)`` into a temporary name beside it, then rename: whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp{os.getpid()}.{path.name}")  # keeps the suffix (writers choose by it)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
