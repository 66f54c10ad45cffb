"""A saved model's folder, written whole and read without running code.

``model.json`` holds the configuration, genes and run record; ``model.pt`` the weights, the reference
bank and a checksum of ``model.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._atomic import move_into_place
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
    """
    import hashlib
    import shutil
    import tempfile

    import torch

    from ..train.checkpoint import sync

    path = Path(path).resolve()  # a link to a model folder: the folder it points to is replaced
    check_target(path, overwrite)
    text = json.dumps({"config": config, "genes": genes, "meta": meta}).encode()
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

    Refuses files that hold anything but tensors and plain containers, and a ``model.json`` whose
    checksum differs from the one stored with the weights.
    """
    import hashlib
    import pickle

    import torch

    path = Path(path)
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
    return json.loads(text), blob


def check_target(path: str | Path, overwrite: bool) -> None:
    """Raise :class:`FileExistsError` unless a model may be saved into folder ``path``.

    It may when ``path`` is absent or an empty folder, or, with ``overwrite``, a folder that holds a
    saved model and nothing else (a folder with other files is never replaced).
    """
    path = Path(path)
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
