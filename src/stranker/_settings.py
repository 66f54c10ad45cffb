"""Global settings: device, seed, verbosity, progress bars, data directory."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger("stranker")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s stranker: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class _Settings:
    """Settings of stranker, reachable as ``sr.settings``.

    Attributes
    ----------
    device
        ``'auto'`` (CUDA when present, else CPU), ``'cpu'``, ``'cuda'`` or ``'cuda:N'``.
    seed
        Default random seed of functions that take ``seed=None``.
    verbosity
        0 errors only, 1 warnings, 2 info (default), 3 debug.
    progress
        Show tqdm progress bars for long steps.
    num_workers
        Worker processes that read training patches when they are streamed from disk (0: read
        in the main process). They are started with ``spawn``, so a script that trains with
        workers must keep its code under ``if __name__ == "__main__":``.
    max_patch_memory
        Bytes of training patches that :func:`stranker.tl.fit` holds in memory; beyond it
        (``stream=None``) patches are streamed from the (lazy, e.g. zarr-backed) images batch by batch.
    max_dense_layer
        Bytes beyond which the layer of predictions is written sparse (CSR holding the modelled
        genes only) instead of dense with NaN for the genes the model does not predict, e.g. Visium
        HD tables of hundreds of thousands of bins by all genes. Default 2 GiB.
    data_dir
        Cache folder of downloaded datasets: ``$STRANKER_DATA_DIR`` when set, else the user cache.
    allow_download
        Download missing pretrained backbone weights from the Hugging Face hub into its cache
        (default ``True``; ``$STRANKER_ALLOW_DOWNLOAD=0`` sets ``False``). ``HF_HUB_OFFLINE=1`` forbids
        downloads whatever this says. Without the weights, a fit or embedding that asked for them
        raises an error naming the repository and how to get them; it never falls back to random weights.
    """

    def __init__(self) -> None:
        self.device = "auto"
        self.seed = 0
        self.progress = True
        self.num_workers = 0
        self.max_patch_memory = 4 * 1024**3
        self.max_dense_layer = 2 * 1024**3
        self._verbosity = 2
        self._data_dir: Path | None = None
        self.allow_download = os.environ.get("STRANKER_ALLOW_DOWNLOAD", "1").strip().lower() not in (
            "0", "false", "no", "off"
        )

    @property
    def verbosity(self) -> int:
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: int) -> None:
        if value not in (0, 1, 2, 3):
            raise ValueError(f"`verbosity` must be 0, 1, 2 or 3, got {value!r}.")
        self._verbosity = value
        logger.setLevel({0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}[value])

    @property
    def data_dir(self) -> Path:
        if self._data_dir is not None:
            return self._data_dir
        env = os.environ.get("STRANKER_DATA_DIR")
        if env:
            return Path(env).expanduser()
        import pooch

        return Path(pooch.os_cache("stranker"))

    @data_dir.setter
    def data_dir(self, value: str | os.PathLike | None) -> None:
        self._data_dir = None if value is None else Path(value).expanduser()

    def show_progress(self) -> bool:
        """Whether progress bars are shown (``progress`` and verbosity >= 2)."""
        return bool(self.progress) and self._verbosity >= 2

    def __repr__(self) -> str:
        return (
            f"stranker settings: device={self.device!r}, seed={self.seed}, verbosity={self.verbosity}, "
            f"progress={self.progress}, num_workers={self.num_workers}, "
            f"max_patch_memory={self.max_patch_memory}, max_dense_layer={self.max_dense_layer}, "
            f"data_dir='{self.data_dir}', allow_download={self.allow_download}"
        )


settings = _Settings()


def resolve_seed(seed: int | None) -> int:
    """``seed`` as an int, or ``sr.settings.seed`` when it is ``None``."""
    return settings.seed if seed is None else int(seed)
