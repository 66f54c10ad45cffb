"""Files and folders written whole: built beside their target, then renamed into place (stdlib only).

Every temporary folder stranker makes is named ``.{target}.{tag}-{12 hex digits}`` and holds a lock
file while its writer runs. It is removed however the writer ends: an exception, Ctrl-C (a second
Ctrl-C does not cut the removal short) or, in the command line, SIGTERM / SIGHUP; files that background
threads (dask's, finishing a chunk) put there after that are removed when the process exits. One left
by a process that was killed outright (its lock held by no one) is removed by the next write of the
same target.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ._errors import InputError

_LOCK = ".stranker-lock"
_STALE_S = 60.0  # a temporary folder without its lock file, untouched this long, is abandoned
_MADE: set[Path] = set()  # temporary folders this process made: those still there at exit are removed


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
    """Write a file through ``write(tmp)`` into a temporary folder beside it, then rename: whole or absent.

    The temporary file keeps the name of ``path`` (writers choose the format by its suffix) inside a
    hidden folder, so that one left over is never taken for the file (e.g. by a ``*.h5ad`` glob).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary_beside(path) as tmp:
        write(tmp / path.name)
        os.replace(tmp / path.name, path)


@contextlib.contextmanager
def temporary_beside(path: Path, tag: str = "writing") -> Iterator[Path]:
    """Yield a new empty hidden folder beside ``path`` to build it in; removed however the block ends.

    Abandoned folders of the same name pattern (a writer of ``path`` that was killed) are removed first.
    """
    path = Path(path)
    remove_stale(path, tag)
    tmp = sibling(path, tag)
    tmp.mkdir()
    _MADE.add(tmp)
    lock = _hold_lock(tmp)
    try:
        yield tmp
    finally:
        try:
            remove(tmp)
        finally:
            if lock is not None:
                lock.close()


def remove(path: Path) -> None:
    """Remove a temporary folder for good, Ctrl-C or not, and again if background writers refill it."""
    with uninterrupted():
        for _ in range(20):
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                time.sleep(0.01)  # a thread still finishing a chunk re-creates it just after
                if not path.exists():
                    return


def remove_stale(path: Path, tag: str = "writing") -> list[Path]:
    """Remove the temporary folders of ``path`` that a killed writer left (none of its processes live).

    Only folders named as :func:`sibling` names them are looked at; one whose lock another process holds
    (a writer at work) is left alone. Returns those removed.
    """
    from ._settings import logger

    pattern = re.compile(rf"\.{re.escape(path.name)}\.{re.escape(tag)}-[0-9a-f]{{12}}")
    removed = []
    if not path.parent.is_dir():
        return removed
    for p in path.parent.iterdir():
        if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink() and _abandoned(p):
            remove(p)
            removed.append(p)
            logger.warning(f"Removed {p}: a temporary folder left by a stranker run that was killed "
                           f"while writing {path}.")
    return removed


def nearest_existing(path: str | Path) -> Path:
    """Return ``path`` made absolute, or its nearest ancestor that exists."""
    here = Path(os.path.abspath(path))
    while not here.exists() and here != here.parent:
        here = here.parent
    return here


def check_writable(folder: str | Path, what: str, fix: str = "Choose a path you can write to.") -> None:
    """Raise :class:`InputError` unless ``folder`` can be created (when absent) and written into.

    Tried for real (a temporary folder made and removed in the nearest folder that exists), so that a
    read-only file system, missing permissions and a path under a regular file are all found before
    any work is done; ``what`` names the path and its argument in the message, ``fix`` what to do.
    """
    here = nearest_existing(folder)
    if not here.is_dir():
        raise InputError(f"{what} cannot be written: {here} is a file, not a folder. {fix}")
    try:
        os.rmdir(tempfile.mkdtemp(dir=here, prefix=".stranker-probe-"))
    except OSError as err:
        reason = ("is on a read-only file system" if err.errno == errno.EROFS
                  else f"cannot be written ({err.strerror})")
        raise InputError(f"{what} cannot be written: {here} {reason}. {fix}") from None


def _hold_lock(folder: Path):
    """Open and lock ``folder``'s lock file (kept while the writer runs; released when it dies)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): abandoned folders are told by their age alone
        return None
    f = open(folder / _LOCK, "w")  # noqa: SIM115  (held open until the folder is removed)
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def _abandoned(folder: Path) -> bool:
    """Whether no live process writes ``folder``: its lock is free (or it has none and is old)."""
    lock = folder / _LOCK
    try:
        import fcntl

        with open(lock) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # held: a writer at work
            return True
    except (ImportError, OSError):  # no lock file (being made now, or refilled after removal)
        try:
            return time.time() - folder.stat().st_mtime > _STALE_S
        except OSError:
            return False


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Ignore Ctrl-C while the block runs (in the main thread; elsewhere signals do not arrive)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@atexit.register
def _remove_left_over() -> None:
    """At exit (after worker threads are joined), remove the temporary folders writes left behind."""
    for tmp in list(_MADE):
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
