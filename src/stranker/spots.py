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

A faster reader (decoding workers) or a model ensemble plugs in here, once, for every caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._settings import settings


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
        self, batch_size: int, rows: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(positions, inputs)`` of consecutive batches of ``rows`` (default: every spot)."""
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
        rows = np.arange(self.n) if rows is None else np.asarray(rows)
        for start in range(0, len(rows), batch_size):
            pos = np.arange(start, min(start + batch_size, len(rows)))
            yield pos, np.asarray(self.read(rows[pos]))

    def all(self, batch_size: int = 512) -> np.ndarray:
        """Return every spot's input in one array, read ``batch_size`` spots at a time."""
        parts = [x for _, x in self.batches(batch_size)]
        if parts:
            return np.concatenate(parts)
        return np.asarray(self.read(np.zeros(0, dtype=np.int64)))

    def in_memory(self, batch_size: int = 512) -> SpotInputs:
        """Return the same inputs held in memory (read once), for a caller that reads them twice."""
        if self.kind != "stream":
            return self
        return SpotInputs.held(self.all(batch_size), name=self.name)


def device_of(device: Any = None) -> Any:
    """Return the torch device to run on: ``device``, else ``sr.settings.device``."""
    from .train.loop import resolve_device

    return resolve_device(device or settings.device)


def tensor_batches(
    inputs: SpotInputs, device: Any, batch_size: int, rows: np.ndarray | None = None
) -> Iterator[Any]:
    """Yield network-ready tensors of consecutive batches: patches as float ``(b, s, 3, h, w)`` in [0, 1]."""
    import torch

    from .train.loop import to_input

    for _, x in inputs.batches(batch_size, rows):
        yield to_input(torch.from_numpy(np.ascontiguousarray(x)), device)


def run_batches(
    step: Callable[[Any], Sequence[Any]],
    inputs: SpotInputs,
    *,
    device: Any,
    dims: Sequence[int] | None = None,
    batch_size: int = 128,
    desc: str = "predict",
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

    Returns
    -------
    One float32 array ``(n, dims[i])`` per output, in the order of the spots.
    """
    import torch
    from tqdm.auto import tqdm

    n = len(inputs)
    outs = None if dims is None else [np.empty((n, d), dtype=np.float32) for d in dims]
    amp = device.type == "cuda"
    bar = tqdm(total=n, desc=f"{desc} {inputs.name}", unit="spot",
               disable=not settings.show_progress() or n < 4 * batch_size)
    start = 0
    with bar:
        for x in tensor_batches(inputs, device, batch_size):
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
    return outs if outs is not None else [np.zeros((0, 0), dtype=np.float32)]
