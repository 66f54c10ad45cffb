"""Distributed data-parallel training pieces (plain ``torch.distributed``; torch only).

Launch with ``torchrun --nproc_per_node N ...`` (or ``stranker fit --nproc N``): every process
runs the same script; :func:`setup` joins the process group that ``torchrun`` describes in the
environment. The training loop then

- gives each process a contiguous share of every batch (a batch still holds the spots of one
  section; every process draws the same batch plan and the same augmentation from the same seed),
- wraps the losses in :class:`~torch.nn.parallel.DistributedDataParallel` (gradients averaged),
- concatenates embeddings over processes with gradient (:func:`gather_rows`), so InfoNCE, the
  ranking term and the spot-context transformer see the whole batch,
- synchronises batch-norm statistics (the batch of one process is not the batch),
- updates the EMA teacher from identical weights, so it stays identical on every process,
- saves checkpoints from rank 0 only; a checkpoint resumes on any number of processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    """Return the number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """Return this process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def launch_ranks() -> tuple[int, int, int]:
    """Return ``torchrun``'s ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` (1, 0, 0 where unset or not whole)."""

    def env(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            return default

    return max(env("WORLD_SIZE", 1), 1), env("RANK", 0), env("LOCAL_RANK", 0)


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    return launch_ranks()[0] > 1


def setup(device: torch.device | None = None) -> torch.device | None:
    """Join the process group described by ``torchrun``'s environment (once) and pick this process's GPU.

    Returns the device to train on: ``cuda:LOCAL_RANK`` when ``device`` is CUDA, else ``device``.
    Does nothing outside ``torchrun`` (or with one process).
    """
    if not launched():
        return device
    cuda = device is not None and device.type == "cuda"
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device


def shard(idx, n_parts: int, part: int):
    """Contiguous share ``part`` of ``n_parts`` of the rows ``idx`` and its ``(start, stop, total)``."""
    total = len(idx)
    start = part * total // n_parts
    stop = (part + 1) * total // n_parts
    return idx[start:stop], (start, stop, total)


class _GatherRows(torch.autograd.Function):
    """Concatenation of every process's ``(n_r, ...)`` rows (sizes may differ), with gradient.

    Backward: each process's loss is computed on the whole gathered batch; the gradient of a
    process's rows is the sum over processes of the gradients they computed for those rows (a
    sum-all-reduce, then this process's slice). With DDP averaging the parameter gradients, this
    gives the gradient of the whole-batch loss.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ws = dist.get_world_size()
        n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        sizes = [torch.zeros_like(n) for _ in range(ws)]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        m = max(sizes)
        padded = x.new_zeros((m, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(ws)]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes, with gradient (the gradient of a sum seen by all is the sum of their gradients)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` from every process, in rank order, with gradient (identity when not distributed)."""
    if world_size() == 1:
        return x
    if not x.requires_grad:
        with torch.no_grad():
            return _GatherRows.apply(x)
    return _GatherRows.apply(x)


class _SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are taken over the whole batch of every process.

    Used on CPU (``torch.nn.SyncBatchNorm`` runs on GPUs only): one differentiable sum-all-reduce of
    the per-channel count, sum and sum of squares. Outside training or distribution it is plain
    batch norm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not (self.training and world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
        stats = torch.cat([count, xf.sum(dims), (xf * xf).sum(dims)])
        stats = _AllReduceSum.apply(stats)
        c = x.shape[1]
        n, s, ss = stats[0], stats[1 : 1 + c], stats[1 + c :]
        mean = s / n
        var = (ss / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


_SYNC_TYPES: dict[type, type] = {}


def sync_batchnorm(module: nn.Module, device: torch.device) -> Callable[[], None]:
    """Make the batch norms of ``module`` synchronised across processes; returns a function that undoes it.

    The parameters and buffers stay the same tensors (and the state-dict keys the same), so an
    optimiser built before or after, and checkpoints, are unaffected.
    """
    swapped: list[tuple[nn.Module, type]] = []
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    plain = nn.modules.batchnorm._BatchNorm.forward
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.modules.batchnorm._BatchNorm) or isinstance(
                child, _SyncBatchNorm | nn.SyncBatchNorm
            ):
                continue
            if device.type == "cuda":
                from timm.layers import convert_sync_batchnorm  # knows timm's norm+activation layers too

                setattr(parent, name, convert_sync_batchnorm(child))  # same parameter and buffer tensors
                replaced.append((parent, name, child))
            elif type(child).forward is plain:  # a norm with its own forward (e.g. norm+act) stays local
                cls = type(child)
                if cls not in _SYNC_TYPES:
                    _SYNC_TYPES[cls] = type("Sync" + cls.__name__, (_SyncBatchNorm, cls), {})
                swapped.append((child, cls))
                child.__class__ = _SYNC_TYPES[cls]

    def undo() -> None:
        for parent, name, child in replaced:
            setattr(parent, name, child)
        for child, cls in swapped:
            child.__class__ = cls

    return undo


class LossModule(nn.Module):
    """The aligner's losses as a module ``forward``, so that DDP can wrap them."""

    def __init__(self, aligner: nn.Module) -> None:
        super().__init__()
        self.aligner = aligner

    def forward(self, strong, weak, expr, pos, local_weight: float, **unlabeled):  # noqa: D102
        return self.aligner.training_losses(
            strong, weak, expr, pos, gather=gather_rows, local_weight=local_weight, **unlabeled
        )


def wrap(aligner: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the aligner's trainable parameters (the EMA teacher is frozen, so not synchronised)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # buffers need no broadcast: batch-norm statistics are synchronised (identical on every process)
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = (
        {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(LossModule(aligner), device_ids=ids, static_graph=True, **no_sync)


def all_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean over processes of each value."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world_size()).tolist()


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if world_size() > 1:
        dist.barrier()
