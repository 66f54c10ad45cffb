"""A saved model's folder, written whole and read without running code.

``model.json`` holds the configuration, genes, run record and the stranker version that wrote it;
``model.pt`` the weights, the reference bank and a checksum of ``model.json``. Weights with NaN or
infinite values are neither saved nor loaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._atomic import move_into_place
from .._errors import InputError
from .._settings import logger

_FILE = "model.pt"
_META = "model.json"


def write_model(
    path: str | Path,
    config: dict[str, Any],
    genes: list[str],
    meta: dict[str, Any],
    state_dict: Mapping[str, Any],
    bank: Mapping[str, Any],
    feature_dim: int | None,
    *,
    overwrite: bool = False,
) -> None:
    """Write a model folder whole: both files go into a temporary folder beside ``path``, renamed to it.

    ``path`` holds the old model or the new one, never a mix; a failed write leaves no new folder.
    Weights (or a reference bank) holding NaN or infinite values are refused before anything is written.
    """
    import hashlib
    import shutil
    import tempfile

    import torch

    from .. import __version__
    from ..train.checkpoint import sync

    bad = non_finite(state_dict, bank)
    if bad:
        raise InputError(
            f"Refusing to save the model: its weights hold NaN or infinite values ({_listed(bad)}), so it "
            f"would predict NaN. It diverged in training or was changed after; fit it again (a lower `lr`)."
        )
    path = Path(path).expanduser().resolve()  # a link to a model folder: the folder it points to is replaced
    check_target(path, overwrite)
    info = {"config": config, "genes": genes, "meta": meta, "stranker_version": __version__}
    text = json.dumps(info).encode()
    made = [p for p in path.parents if not p.exists()]  # folders this creates, deepest first
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.saving-"))
    try:
        (tmp / _META).write_bytes(text)
        torch.save(
            {"state_dict": dict(state_dict),
             "bank": {k: torch.as_tensor(v) for k, v in bank.items()},
             "feature_dim": feature_dim,
             "meta_sha256": hashlib.sha256(text).hexdigest()},
            tmp / _FILE,
        )
        for f in (_META, _FILE):
            sync(tmp / f)
        move_into_place(tmp, path, lambda p: check_target(p, overwrite))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made:  # a failed save leaves no new folder behind
            if p.exists() and not any(p.iterdir()):
                p.rmdir()
        raise


def read_model(path: str | Path, device: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a model folder: ``model.json`` as a dict and ``model.pt``'s tensors (``weights_only``).

    Refuses files that hold anything but tensors and plain containers, a ``model.json`` whose
    checksum differs from the one stored with the weights, weights with NaN or infinite values, and
    a folder that lacks what predicting needs (the configuration, genes, target scaling, weights,
    reference bank), naming the stranker version that wrote it.
    """
    import hashlib
    import pickle

    import torch

    path = Path(path).expanduser()
    if not (path / _FILE).exists() or not (path / _META).exists():
        raise FileNotFoundError(f"{path} does not hold a saved stranker model ({_FILE} and {_META}).")
    text = (path / _META).read_bytes()
    try:
        blob = torch.load(path / _FILE, map_location=device or "cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"Refusing to load {path / _FILE}: it holds objects other than tensors and plain containers, "
            f"which could run code when loaded; a model saved by stranker never does."
        ) from None
    except (RuntimeError, EOFError) as err:
        raise ValueError(
            f"{path / _FILE} cannot be read ({type(err).__name__}: {str(err).splitlines()[0]}): it is "
            f"truncated or not a stranker model. Save the model again."
        ) from None
    stored = blob.get("meta_sha256") if isinstance(blob, dict) else None
    if stored is None:
        logger.warning(f"{path} was saved without a checksum (by an older stranker): {_META} cannot be "
                       f"checked against the weights. Save it again to add one.")
    elif stored != hashlib.sha256(text).hexdigest():
        raise ValueError(
            f"{path / _META} does not match the weights in {path / _FILE} (its checksum differs): it was "
            f"edited or replaced after saving, so its genes, patch size or scaling may not be those the "
            f"weights were trained with. Restore the saved file, or fit and save the model again."
        )
    info = json.loads(text)
    check_complete(path, info, blob)
    bad = non_finite(blob["state_dict"], blob["bank"])
    if bad:
        raise InputError(
            f"Refusing to load {path}: its weights hold NaN or infinite values ({_listed(bad)}), so it "
            f"would predict NaN. The model diverged in training or the file was changed; fit and save it "
            f"again."
        )
    return info, blob


def written_by(info: Any) -> str:
    """Say which stranker wrote a ``model.json`` (its ``stranker_version``; older ones did not record it)."""
    version = info.get("stranker_version") if isinstance(info, dict) else None
    return f"stranker {version}" if version else "a stranker older than 0.1.0 (it records no version)"


def check_complete(path: Path, info: Any, blob: Any) -> None:
    """Refuse a model folder that lacks what a model is loaded and predicts from, naming its writer."""
    missing = []
    if not isinstance(info, dict):
        missing.append("model.json: an object")
        info = {}
    missing += [f"model.json: {k!r}" for k in ("config", "genes", "meta") if k not in info]
    meta = info.get("meta") if isinstance(info.get("meta"), dict) else {}
    n_genes = len(info.get("genes") or [])
    for k in ("target_mean", "target_std"):  # predictions are put back on the target scale with these
        value = meta.get(k)
        if "meta" in info and (value is None or len(value) != n_genes):
            missing.append(f"model.json: meta[{k!r}] (one value per gene)")
    if not isinstance(blob, dict):
        blob = {}
    missing += [f"model.pt: {k!r}" for k in ("state_dict", "bank") if not isinstance(blob.get(k), dict)]
    if missing:
        raise InputError(
            f"{path} was written by {written_by(info)} and lacks what this stranker loads a model from: "
            f"{', '.join(missing)}. Fit and save the model again with this version (its training data and "
            f"configuration are in that folder's model.json)."
        )


def non_finite(state_dict: Mapping[str, Any], bank: Mapping[str, Any] | None = None) -> list[str]:
    """Names of the weights (and reference-bank ``keys`` / ``values``) holding NaN or infinite values."""
    import numpy as np
    import torch

    items = list(state_dict.items()) + [(f"bank[{k!r}]", (bank or {})[k]) for k in ("keys", "values")
                                         if k in (bank or {})]
    bad = []
    for name, value in items:
        t = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


def _listed(names: list[str]) -> str:
    return f"{len(names)} tensor(s): " + ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")


def check_target(path: str | Path, overwrite: bool) -> None:
    """Raise :class:`FileExistsError` unless a model may be saved into folder ``path``.

    It may when ``path`` is absent or an empty folder, or, with ``overwrite``, a folder that holds a
    saved model and nothing else (a folder with other files is never replaced).
    """
    path = Path(path).expanduser()
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder; choose another path for the model.")
    names = sorted(p.name for p in path.iterdir())
    other = [n for n in names if n not in (_FILE, _META)]
    if other:
        listed = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        raise FileExistsError(
            f"{path} holds files that are not a saved stranker model ({listed}); a model is saved into a new "
            f"or empty folder, or over a saved model with `overwrite=True`. Choose another path."
        )
    if names and not overwrite:
        raise FileExistsError(
            f"{path} holds a saved model ({', '.join(names)}); pass `overwrite=True` "
            f"(`stranker fit --overwrite`) to replace it."
        )
