"""Training checkpoints: safe to load, written whole, by one fit at a time, resumed only by the same fit.

- The file holds tensors and plain containers only and is read with ``weights_only=True``: a file
  that would need anything else (a pickle that runs code) is refused, never executed.
- It is written to a unique temporary file beside it and renamed into place: ``last.pt`` is always
  one whole checkpoint.
- A lock file in the folder keeps a second fit from writing checkpoints into it at the same time.
- It records what it is a checkpoint of (configuration, genes, a fingerprint of the training data,
  steps per epoch); resuming another fit from it is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = "last.pt"
LOCK = "fit.lock"
FORMAT = 1  # version of the checkpoint layout
# configuration fields that change prediction only, not training: they may differ on resume
PREDICTION_ONLY = ("predict", "blend", "top_k", "tta")
_AFRESH = ("To start afresh, pass `resume=False` (`stranker fit` without `--resume`; the checkpoint is "
           "replaced after the first epoch) or another `checkpoint_dir`.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely, or is of another fit than the one resuming it."""


def check_arguments(checkpoint_dir: str | Path | None, checkpoint_every: int, resume: bool) -> None:
    """Raise :class:`ValueError` for checkpoint arguments that cannot work (before any work is done)."""
    if resume and checkpoint_dir is None:
        raise ValueError("`resume=True` needs `checkpoint_dir=`.")
    if int(checkpoint_every) < 1:
        raise ValueError(f"`checkpoint_every` must be at least 1 (epochs), got {checkpoint_every}.")
    if checkpoint_dir is not None and Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
        raise ValueError(f"`checkpoint_dir` {checkpoint_dir} is a file; checkpoints are kept in a folder.")


def data_fingerprint(data: Any) -> dict[str, Any]:
    """Return what identifies the training data ``data`` (a :class:`~stranker.train.TrainData`), cheaply.

    Spots per section, input kind and shape, and a hash of a sample of rows (targets and positions)
    and of the first inputs, rounded to 4 decimals so that float noise between machines does not
    count as other data. Streamed and in-memory patches of the same data give the same fingerprint.
    """
    n = len(data.expr)
    rows = torch.from_numpy(np.unique(np.linspace(0, max(n - 1, 0), min(n, 256)).round().astype(np.int64)))
    h = hashlib.sha256()
    for t in (data.expr, data.pos, data.section):
        h.update(np.round(t[rows].double().numpy(), 4).tobytes())
    first = np.flatnonzero(data.section.numpy() == int(data.section[0]))[:8] if n else np.zeros(0, int)
    if data.streamed:  # the same patches as in memory, read for the spots of one section
        sample = torch.from_numpy(np.ascontiguousarray(data.read(first)))
    else:
        sample = data.images[torch.from_numpy(first)]
    h.update(sample.numpy().tobytes() if sample.dtype == torch.uint8 else
             np.round(sample.double().numpy(), 4).tobytes())
    unl = getattr(data, "unlabeled", None)
    if unl is not None:
        h.update(f"unlabeled {list(unl.shape)}".encode())
        h.update(unl[:8].numpy().tobytes())
    return {
        "spots_per_section": np.bincount(data.section.numpy()).tolist() if n else [],
        "n_targets": int(data.expr.shape[1]),
        "inputs": f"{str(sample.dtype).removeprefix('torch.')} {list(sample.shape[1:])}",
        "sample_sha256": h.hexdigest(),
    }


def training_config(cfg: Any) -> dict[str, Any]:
    """Return the configuration fields that shape training (those a resumed fit must share).

    ``chosen`` (which fields the user set) is left out: the values it led to are compared.
    """
    return {k: v for k, v in cfg.to_dict().items() if k not in PREDICTION_ONLY and k != "chosen"}


def _describe(value: Any) -> str:
    if isinstance(value, list) and len(value) > 6:
        return f"[{', '.join(map(repr, value[:3]))}, ... {len(value)} in all]"
    return repr(value)


def check_same_fit(path: Path, recorded: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` naming every way the fit of checkpoint ``path`` differs."""
    diffs = []
    old_cfg, new_cfg = recorded.get("config", {}), current.get("config", {})
    for k in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(k) != new_cfg.get(k):
            diffs.append(
                f"`{k}` {_describe(old_cfg.get(k))} in the checkpoint, {_describe(new_cfg.get(k))} now"
            )
    if recorded.get("genes") != current.get("genes"):
        old, new = list(recorded.get("genes") or []), list(current.get("genes") or [])
        only_old = [g for g in old if g not in set(new)]
        only_new = [g for g in new if g not in set(old)]
        what = (f"{len(old)} genes in the checkpoint, {len(new)} now"
                + (f"; only in the checkpoint: {_describe(only_old)}" if only_old else "")
                + (f"; only now: {_describe(only_new)}" if only_new else "")
                + ("; the same genes in another order" if not only_old and not only_new else ""))
        diffs.append(f"the genes differ ({what})")
    old_d, new_d = recorded.get("data", {}), current.get("data", {})
    for k, label in (("spots_per_section", "spots per section"), ("n_targets", "targets per spot"),
                     ("inputs", "inputs")):
        if old_d.get(k) != new_d.get(k):
            diffs.append(f"the training data differ ({label}: {_describe(old_d.get(k))} in the checkpoint, "
                         f"{_describe(new_d.get(k))} now)")
    if not diffs and old_d.get("sample_sha256") != new_d.get("sample_sha256"):
        diffs.append("the training data differ (same shapes, other expression, positions or images)")
    if not diffs and recorded.get("steps_per_epoch") != current.get("steps_per_epoch"):
        diffs.append(f"the batches per epoch differ ({recorded.get('steps_per_epoch')} in the checkpoint, "
                     f"{current.get('steps_per_epoch')} now: another number of processes drops other "
                     f"batches smaller than it)")
    if diffs:
        raise CheckpointError(
            f"`resume=True`: the checkpoint {path} is of another fit: " + "; ".join(diffs) + ". A checkpoint "
            f"continues only the fit that wrote it (the learning-rate schedule spans its epochs and "
            f"batches). Resume with the same settings and data, or start afresh. {_AFRESH}"
        )


def load(path: Path) -> dict[str, Any]:
    """Read checkpoint ``path`` (tensors and plain containers only; nothing in it can run code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"Refusing to load the checkpoint {path}: it holds objects other than tensors and plain "
            f"containers, which could run code when loaded (a stranker checkpoint never does). Delete it "
            f"if you did not write it. {_AFRESH} ({str(err).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(
            f"The checkpoint {path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0]}). "
            f"{_AFRESH}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "identity" not in state:
        raise CheckpointError(
            f"{path} is not a checkpoint of this version of stranker (no format {FORMAT} record of its fit). "
            f"{_AFRESH}"
        )
    return state


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` whole: a unique temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({**state, "format": FORMAT}, tmp)
        sync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sync(path: str | Path) -> None:
    """Flush file ``path`` to the disk (before it is renamed into place: whole after a power cut too)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def plain_scheduler_state(state: dict[str, Any]) -> dict[str, Any]:
    """Return the scheduler's state without functions (older torch keeps its annealing function in it)."""
    return {k: v for k, v in state.items() if not callable(v)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, ValueError):
        return True
    return True


@contextmanager
def lock(folder: str | Path) -> Iterator[None]:
    """Hold ``folder``'s lock file for the duration: a second fit writing checkpoints there is refused.

    A lock left by a process of this machine that no longer runs is taken over. A folder this
    creates is removed again when it is still empty at the end (a failed fit leaves nothing).
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                other = json.loads(path.read_text())
            except (OSError, ValueError):
                other = {}
            if attempt == 0 and other.get("host") == me["host"] and not _alive(int(other.get("pid", -1))):
                path.unlink(missing_ok=True)  # its process ended without removing it
                continue
            who = (f"process {other.get('pid', '?')} on {other.get('host', '?')}, "
                   f"started {other.get('started', '?')}")
            raise CheckpointError(
                f"Another fit ({who}) is writing checkpoints to {folder}: two fits cannot share a "
                f"`checkpoint_dir`. Use another `checkpoint_dir`, or wait for it to end; if no such fit "
                f"runs any more, delete {path}."
            ) from None
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()
