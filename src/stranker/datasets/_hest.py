"""HEST-1k samples (MahmoodLab/hest on the Hugging Face Hub), downloaded or read from a folder on disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .._errors import InputError
from .._settings import logger, settings
from ..io._hest import HEST_REPO, read_hest

HEST_URL = f"https://huggingface.co/datasets/{HEST_REPO}"


def _patterns(sid: str, patches: bool) -> list[str]:
    """Files of one sample that stranker reads (not the large transcripts or cell segmentations)."""
    pats = [f"st/{sid}.h5ad", f"metadata/{sid}.json", f"wsis/{sid}.tif", f"tissue_seg/{sid}_contours.geojson"]
    return pats + [f"patches/{sid}.h5"] if patches else pats


def _missing(folder: Path, sid: str) -> list[str]:
    need = (f"st/{sid}.h5ad", f"metadata/{sid}.json", f"wsis/{sid}.tif")
    return [p for p in need if not (folder / p).exists()]


def downloads_allowed() -> bool:
    """Whether stranker may download: ``sr.settings.allow_download`` and no ``HF_HUB_OFFLINE``."""
    if not settings.allow_download:
        return False
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("1", "true", "yes", "on")


def hest(
    ids: str | list[str],
    root: str | Path | None = None,
    *,
    token: str | None = None,
    patches: bool = True,
    image: str = "auto",
) -> Any:
    """HEST-1k samples as SpatialData, downloaded from the Hugging Face Hub when they are not on disk.

    HEST-1k (Jaume et al., NeurIPS 2024; cite it; CC BY-NC-SA 4.0) is the gated dataset
    ``MahmoodLab/hest``: accept its terms on the Hub and log in (``hf auth login``) or pass
    ``token=``. Only the files stranker reads are fetched (``st``, ``metadata``, ``wsis``,
    ``tissue_seg`` contours and, with ``patches=True``, ``patches``), with
    ``huggingface_hub.snapshot_download``. A sample whose ``st``, ``metadata`` and ``wsis`` files are
    already in the folder is read without the network; with downloads off (``HF_HUB_OFFLINE=1``),
    only such samples can be read.

    Parameters
    ----------
    ids
        Sample id (e.g. ``'TENX95'``) or a list; ids are listed in HEST's metadata table
        (``HEST_v1_1_0.csv`` in the dataset).
    root
        Folder in HEST's layout; default ``sr.settings.data_dir / 'hest'``.
    token
        Hugging Face token for the gated repository; default the logged-in one.
    patches
        Also fetch and read ``patches/{id}.h5`` (HEST's 224 px patches around every spot).
    image
        See :func:`stranker.io.read_hest`.

    Returns
    -------
    A SpatialData per sample as :func:`stranker.io.read_hest` builds it; a list for a list of ids.
    """
    single = isinstance(ids, str)
    id_list = [ids] if single else list(ids)
    if not id_list:
        raise InputError("Name at least one HEST sample id, e.g. `sr.datasets.hest(['TENX95'])`.")
    folder = Path(root).expanduser() if root is not None else settings.data_dir / "hest"
    todo = [sid for sid in id_list if _missing(folder, sid)]
    if todo:
        if not downloads_allowed():
            missing = {sid: _missing(folder, sid) for sid in todo}
            raise InputError(
                f"HEST sample(s) {todo} are not in {folder} (missing {missing}) and downloads are off "
                "(HF_HUB_OFFLINE is set, or `sr.settings.allow_download` is False). Either put the files "
                f"there in HEST's layout, or allow downloads: HEST-1k is the gated repository {HEST_URL} "
                f"(accept its terms there, then `{_login()}` or pass `token=`)."
            )
        _download(todo, folder, token=token, patches=patches)
    out = [read_hest(folder, sid, image=image, patches=patches) for sid in id_list]
    return out[0] if single else out


def _download(ids: list[str], folder: Path, *, token: str | None, patches: bool) -> None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - installed with timm
        raise InputError(
            f"Downloading HEST needs huggingface_hub ({e}): `pip install huggingface_hub`."
        ) from e
    patterns = [p for sid in ids for p in _patterns(sid, patches)]
    logger.info(f"Downloading HEST sample(s) {ids} from {HEST_URL} into {folder}.")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        # files land whole or not at all (the hub client writes *.incomplete, then renames)
        snapshot_download(repo_id=HEST_REPO, repo_type="dataset", local_dir=folder, allow_patterns=patterns,
                          token=token)
    except Exception as err:  # gated (401/403), network, disk
        raise InputError(
            f"Could not download HEST sample(s) {ids} from the gated repository {HEST_URL} "
            f"({type(err).__name__}: {err}). Accept the dataset's terms on that page, log in with "
            f"`{_login()}` (or pass `token=`), and retry; or put the files in {folder} in HEST's "
            "layout."
        ) from err
    still = {sid: _missing(folder, sid) for sid in ids if _missing(folder, sid)}
    if still:
        raise InputError(
            f"The download from {HEST_URL} did not bring {still}: check the ids against HEST's metadata "
            "table (HEST_v1_1_0.csv)."
        )


def _login() -> str:
    """Return the login command of the installed huggingface_hub (``hf auth login`` from 0.34 on)."""
    from ..model.backbones import hub_commands

    return hub_commands()[0]
