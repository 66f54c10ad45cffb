"""Where a batch of spots is run through a network: one source of spot inputs, one batched loop.

Every path that turns spots into network outputs goes through here: ``sr.tl.predict`` /
:meth:`stranker.Model.predict` / :meth:`~stranker.Model.embed` (:meth:`Model.infer`), test-time
adaptation, ``sr.pp.embed_patches``, ``sr.tl.embed_slides`` and the in-sample results of a fit; the
training patches held in memory are read through it too.

- :class:`SpotInputs`: what a spot is fed as, from one of four sources: precomputed features,
  patches already in memory, patches streamed from a section's image (its spots, or the tiles laid
  over an image-only slide: a tiled section is a section whose spots are tiles);
- :func:`run_batches`: the batched inference loop (no gradients, bf16 autocast on CUDA, outputs
  filled batch by batch, so working memory is one batch whatever the number of spots).

Streamed patches are read by ``num_workers`` reader threads (:data:`READ_WORKERS` by default) a few
batches ahead of the network (:func:`prefetched`): reading, decoding (JPEG, zlib) and resizing
release the GIL, so they overlap with the forward pass of the batch before. The batches, and so the
outputs, are the same as read one after the other, in the same order; at most ``2 * num_workers``
batches are held ahead, so memory stays flat.
"""

from __future__ import annotations

import contextlib
import functools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ._errors import InputError
from ._settings import settings

# reader threads of streamed patches by default. On a shared 2-core CPU (benchmarks/slides.py, ResNet-18,
# 5 515 tiles of a JPEG slide) predict ran at 33-49 tiles/s with 0, 61-97 with 1, 2 or 4 threads; each thread
# adds ~60 MB of peak memory (one batch being read). Two also keep a GPU fed when one read stalls.
READ_WORKERS = 2

T = TypeVar("T")
R = TypeVar("R")


def check_workers(num_workers: int | None) -> int:
    """Return the number of reader threads: ``num_workers``, or :data:`READ_WORKERS` for ``None``."""
    if num_workers is None:
        return READ_WORKERS
    if isinstance(num_workers, bool) or not isinstance(num_workers, int | np.integer) or num_workers < 0:
        raise InputError(
            f"`num_workers` must be a whole number >= 0 (0: read in the calling thread), got {num_workers!r}."
        )
    return int(num_workers)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """Return glibc's ``malloc_trim``, or ``None`` where the C library has none (macOS, musl, Windows)."""
    import ctypes

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_memory() -> None:
    """Give the memory freed by the batch just run back to the system (glibc; nothing elsewhere).

    A batch allocates and frees hundreds of MB (patches, their resizing, the network's activations).
    glibc serves buffers below its mmap threshold, which it raises up to 32 MB as large buffers are
    freed, from its heaps and keeps the freed pages resident; scattered among buffers still alive
    (cached windows, outputs) they are reused only in part, so the peak resident memory of a slide's
    predict rose with its number of batches (and scattered from run to run). With the pages
    trimmed after each batch (well under a millisecond) it stays at one batch's working memory, as
    with a fixed mmap threshold (``MALLOC_MMAP_THRESHOLD_``).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def prefetched(fn: Callable[[T], R], items: Iterable[T], num_workers: int) -> Iterator[R]:
    """Yield ``fn(item)`` for each item, in order, computed by ``num_workers`` threads ahead of the caller.

    At most ``2 * num_workers`` results are computed ahead of the one yielded (a bounded queue): the
    threads read the next batches while the caller runs the network on this one. An exception raised
    by ``fn`` is raised here, at its item. ``num_workers=0`` computes each item when it is asked for.
    When the caller stops early, the items not started are dropped and the running ones awaited.
    """
    if num_workers <= 0:
        yield from map(fn, items)
        return
    from concurrent.futures import ThreadPoolExecutor

    it = iter(items)
    ahead = 2 * num_workers
    pool = ThreadPoolExecutor(num_workers, thread_name_prefix="stranker-read")
    pending: deque[Any] = deque()
    try:
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                break
        while pending:
            result = pending.popleft().result()
            for item in it:  # keep the queue full: one item in for the one out
                pending.append(pool.submit(fn, item))
                break
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class SpotInputs:
    """The inputs of the spots of one section, read by row.

    Attributes
    ----------
    n
        Number of spots.
    read
        ``rows -> array``: uint8 patches ``(b, n_scales, px, px, 3)`` or float32 features ``(b, d)``.
    kind
        ``'features'``, ``'patches'`` (in memory) or ``'stream'`` (read from the image on demand).
    name
        The section's name, for progress bars.
    """

    n: int
    read: Callable[[np.ndarray], np.ndarray]
    kind: str
    name: str = "section"

    @classmethod
    def held(cls, array: np.ndarray, *, kind: str = "patches", name: str = "section") -> SpotInputs:
        """Return inputs already in memory: patches (uint8) or features (cast to float32)."""
        if kind == "features":
            array = np.asarray(array, dtype=np.float32)
        return cls(n=len(array), read=lambda rows: array[rows], kind=kind, name=name)

    @classmethod
    def streamed(cls, reader: Any, centers: np.ndarray | None = None) -> SpotInputs:
        """Return patches read from the image by a :class:`~stranker.section.patches.PatchReader`.

        The section's spots (or tiles), or the level-0 ``centers`` given instead.
        """
        if centers is None:
            return cls(n=reader.spots.n_spots, read=reader.read, kind="stream", name=reader.spots.name)
        centers = np.asarray(centers, dtype=np.float64)
        return cls(n=len(centers), read=lambda rows: reader.read(centers=centers[rows]), kind="stream",
                   name=reader.spots.name)

    def __len__(self) -> int:
        return self.n

    def batches(
        self, batch_size: int, rows: np.ndarray | None = None, *, num_workers: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(positions, inputs)`` of consecutive batches of ``rows`` (default: every spot).

        ``num_workers`` threads read streamed patches ahead of the caller (:func:`prefetched`); inputs
        held in memory are read in the calling thread. The batches are the same either way.
        """
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
        rows = np.arange(self.n) if rows is None else np.asarray(rows)

        def one(start: int) -> tuple[np.ndarray, np.ndarray]:
            pos = np.arange(start, min(start + batch_size, len(rows)))
            return pos, np.asarray(self.read(rows[pos]))

        starts = range(0, len(rows), batch_size)
        workers = num_workers if self.kind == "stream" and len(starts) > 1 else 0
        yield from prefetched(one, starts, workers)

    def all(self, batch_size: int = 512, *, num_workers: int = 0) -> np.ndarray:
        """Return every spot's input in one array, read ``batch_size`` spots at a time."""
        parts = [x for _, x in self.batches(batch_size, num_workers=num_workers)]
        if parts:
            return np.concatenate(parts)
        return np.asarray(self.read(np.zeros(0, dtype=np.int64)))

    def in_memory(self, batch_size: int = 512, *, num_workers: int = 0) -> SpotInputs:
        """Return the same inputs held in memory (read once), for a caller that reads them twice."""
        if self.kind != "stream":
            return self
        return SpotInputs.held(self.all(batch_size, num_workers=num_workers), name=self.name)


def device_of(device: Any = None) -> Any:
    """Return the torch device to run on: ``device``, else ``sr.settings.device``."""
    from .train.loop import resolve_device

    return resolve_device(device or settings.device)


def tensor_batches(
    inputs: SpotInputs, device: Any, batch_size: int, rows: np.ndarray | None = None, *,
    num_workers: int = 0,
) -> Iterator[Any]:
    """Yield network-ready tensors of consecutive batches: patches as float ``(b, s, 3, h, w)`` in [0, 1].

    ``num_workers``: reader threads of streamed patches (see :meth:`SpotInputs.batches`).
    """
    import torch

    from .train.loop import to_input

    for _, x in inputs.batches(batch_size, rows, num_workers=num_workers):
        yield to_input(torch.from_numpy(np.ascontiguousarray(x)), device)


def run_batches(
    step: Callable[[Any], Sequence[Any]],
    inputs: SpotInputs,
    *,
    device: Any,
    dims: Sequence[int] | None = None,
    batch_size: int = 128,
    desc: str = "predict",
    num_workers: int | None = None,
) -> list[np.ndarray]:
    """Run ``step`` on every batch of ``inputs`` and gather its outputs.

    Parameters
    ----------
    step
        ``tensor batch -> (out_1, ..., out_k)``: tensors of shape ``(b, dims[i])``.
    inputs
        The spots' inputs.
    device
        The torch device the batches go to (bf16 autocast there when it is CUDA).
    dims
        Width of each output; ``None``: told by the first batch (``(0, 0)`` arrays for no spots).
    batch_size
        Spots per forward pass.
    desc
        Progress bar label (followed by the section's name); shown for four batches or more.
    num_workers
        Threads that read streamed patches ahead of the network (0: each batch is read when the one
        before has run); ``None``: :data:`READ_WORKERS`. The outputs are the same.

    Returns
    -------
    One float32 array ``(n, dims[i])`` per output, in the order of the spots.
    """
    import torch
    from tqdm.auto import tqdm

    workers = check_workers(num_workers)
    n = len(inputs)
    outs = None if dims is None else [np.empty((n, d), dtype=np.float32) for d in dims]
    amp = device.type == "cuda"
    bar = tqdm(total=n, desc=f"{desc} {inputs.name}", unit="spot",
               disable=not settings.show_progress() or n < 4 * batch_size)
    start = 0
    with bar:
        for x in tensor_batches(inputs, device, batch_size, num_workers=workers):
            # bf16 on CUDA; elsewhere no autocast at all (a device type autocast does not know would fail)
            amp_ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
            with torch.no_grad(), amp_ctx:
                res = step(x)
            b = len(x)
            if outs is None:
                outs = [np.empty((n, r.reshape(b, -1).shape[1]), dtype=np.float32) for r in res]
            for out, r in zip(outs, res, strict=True):
                out[start : start + b] = r.float().reshape(b, -1).cpu().numpy()
            start += b
            bar.update(b)
            release_memory()
    return outs if outs is not None else [np.zeros((0, 0), dtype=np.float32)]
