"""The one training loop: batches per section, augmentation on the device, AMP, EMA, checkpoints.

Inputs are held in memory (one tensor) or streamed: read batch by batch (each the spots of one
section) through a reader function, in DataLoader worker processes. One process, or several
under ``torchrun`` (see :mod:`stranker.train.distributed`); the batch plan and the random draws
are the same either way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model.aligner import Aligner
from ..model.augment import augment
from ..model.config import SHARP_LR, finish_epochs
from . import checkpoint, distributed


class TrainingDiverged(FloatingPointError, ValueError):
    """The training loss became NaN or infinite (or the weights did): no model is returned."""


@dataclass
class TrainData:
    """The training spots (CPU tensors).

    ``images`` is uint8 ``(n, s, h, w, 3)`` patches or float features ``(n, d)``, or ``None`` when
    patches are streamed: then ``read(rows)`` returns the uint8 patches of ``rows`` (positions in
    ``0..n-1``, all of one section) as a numpy array.
    """

    images: torch.Tensor | None
    expr: torch.Tensor  # (n, g) standardised target
    pos: torch.Tensor  # (n, 2) positions in [0, 1] within each section
    section: torch.Tensor  # (n,) int section index
    read: Callable[[np.ndarray], np.ndarray] | None = None
    unlabeled: torch.Tensor | None = None  # uint8 (m, s, h, w, 3) patches without expression

    @property
    def pixels(self) -> bool:
        """Whether the inputs are image patches (not precomputed features)."""
        return self.read is not None or self.images.dtype == torch.uint8

    @property
    def streamed(self) -> bool:
        """Whether the patches are read batch by batch through ``read``."""
        return self.read is not None


class BatchPatches(torch.utils.data.Dataset):
    """Item ``rows`` (positions of spots of one section): their uint8 patches, read through ``read``."""

    def __init__(self, read: Callable[[np.ndarray], np.ndarray]) -> None:
        self.read = read

    def __getitem__(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.read(rows)))


class PlanSampler(torch.utils.data.Sampler):
    """Yields the row arrays of the current epoch's plan (set before each epoch)."""

    def __init__(self) -> None:
        self.plan: list[np.ndarray] = []

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)


def patch_loader(data: TrainData, device: torch.device, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """Return a DataLoader over streamed patches whose batches follow ``loader.sampler.plan``.

    Workers are started once (persistent) with the ``spawn`` method: zarr and dask keep threads
    whose locks a forked process could inherit held.
    """
    return torch.utils.data.DataLoader(
        BatchPatches(data.read), sampler=PlanSampler(), batch_size=None, num_workers=num_workers,
        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        multiprocessing_context="spawn" if num_workers > 0 else None,
    )


def batch_inputs(
    data: TrainData, plan: list[np.ndarray], images: torch.Tensor | None = None,
    loader: torch.utils.data.DataLoader | None = None,
) -> Iterator[torch.Tensor]:
    """CPU inputs of each planned batch, in order: indexed from memory, or read through ``loader``."""
    if loader is None:
        src = data.images if images is None else images
        for idx in plan:
            yield src[torch.from_numpy(idx)]
        return
    loader.sampler.plan = plan
    yield from loader


def chunks(data: TrainData, size: int = 256) -> Iterator[torch.Tensor]:
    """Yield the inputs of every training spot, ``size`` at a time (section by section when streamed)."""
    if not data.streamed:
        for i in range(0, len(data.images), size):
            yield data.images[i : i + size]
        return
    sec = data.section.numpy()
    for s in np.unique(sec):
        rows = np.flatnonzero(sec == s)
        for i in range(0, len(rows), size):
            yield torch.from_numpy(data.read(rows[i : i + size]))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``'auto'`` -> CUDA when present, else CPU; checks that a requested device parses and exists."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"`device={device!r}` is not a torch device: use 'auto', 'cpu', 'cuda', 'cuda:N' "
                         "or 'mps'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "`device='cuda'` was requested but no CUDA device is available; use device='cpu' or 'auto'."
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"`device={device!r}`: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("`device='mps'` was requested but MPS is not available; use 'cpu' or 'auto'.")
    return dev


def to_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 ``(b, s, h, w, 3)`` -> float ``(b, s, 3, h, w)`` in [0, 1] on ``device``.

    Features pass through.
    """
    x = images.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.permute(0, 1, 4, 2, 3).float().div_(255.0)
    return x


def batches(section: np.ndarray, batch_size: int, gen: torch.Generator) -> list[np.ndarray]:
    """Shuffled batches, each from one section (spots of a section are read together), in shuffled order."""
    out = []
    for s in np.unique(section):
        idx = np.flatnonzero(section == s)
        idx = idx[torch.randperm(len(idx), generator=gen).numpy()]
        n_b = max(1, math.ceil(len(idx) / batch_size))
        out.extend(b for b in np.array_split(idx, n_b) if len(b) > 1)
    order = torch.randperm(len(out), generator=gen).numpy()
    return [out[i] for i in order]


@torch.no_grad()
def set_input_statistics(
    aligner: Aligner, data: TrainData, device: torch.device, batch_size: int = 256
) -> None:
    """Standardisation of stain statistics (or precomputed features) from the training spots."""
    br = aligner.student
    if br.backbone is None:
        f = data.images.float()
        br.feat_mean.copy_(f.mean(0))
        br.feat_std.copy_(f.std(0).clamp_min(1e-6))
    elif br.use_stain:
        stats = torch.cat([br.stain(to_input(x, device)).cpu() for x in chunks(data, batch_size)])
        br.stain_mean.copy_(stats.mean(0))
        br.stain_std.copy_(stats.std(0).clamp_min(1e-3))
    aligner.teacher.load_state_dict(br.state_dict())


def augment_options(cfg: Any, part: Any, sharp: bool = False) -> dict[str, Any]:
    """Keyword arguments of :func:`~stranker.model.augment.augment` that ``cfg`` sets.

    ``sharp``: the sharp finish (no resolution jitter).
    """
    return dict(part=part, hed=cfg.hed_jitter, resolution=1.0 if sharp else cfg.resolution_jitter,
                crop=cfg.crop_jitter, resolution_keep=cfg.resolution_keep)


def unlabeled_views(
    data: TrainData, cfg: Any, gen: torch.Generator, n: int, device: torch.device, ws: int = 1, rk: int = 0,
    sharp: bool = False,
) -> dict[str, Any]:
    """Return a strong and a weak view of ``n`` random unlabelled patches (this process's share), or nothing.

    Drawn only when ``cfg.w_consistency > 0`` and ``data.unlabeled`` holds patches, so other fits draw
    exactly as before.
    """
    if not (cfg.w_consistency > 0 and data.unlabeled is not None and len(data.unlabeled)):
        return {}
    rows = torch.randint(0, len(data.unlabeled), (n,), generator=gen)
    mine, part = distributed.shard(np.arange(n), ws, rk) if ws > 1 else (np.arange(n), None)
    x = to_input(data.unlabeled[rows[torch.from_numpy(mine)]], device)
    aug = augment_options(cfg, part, sharp)
    weak = augment(x, gen, strong=False, **aug)
    strong = augment(x, gen, strong=True, **aug)
    return {"unlabeled": (strong, weak), "unlabeled_weight": len(mine) * ws / n}


def _plan(sec: np.ndarray, batch_size: int, gen: torch.Generator, ws: int) -> list[np.ndarray]:
    """Return the epoch's batches (one section each).

    Under ``ws`` processes, those with at least ``ws`` spots.
    """
    plan = batches(sec, batch_size, gen)
    return plan if ws == 1 else [b for b in plan if len(b) >= ws]


def optimiser(
    aligner: Aligner, cfg: Any, steps_per_epoch: int, sharp: bool = False
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, Any]:
    """Parameters, AdamW and one-cycle schedule of the main training or of the sharp finish.

    The finish trains the student image branch alone (the gene branch, and so the retrieval bank,
    stay as the main training left them) at ``SHARP_LR`` times ``lr``.
    """
    if sharp:
        params = [p for p in aligner.student.parameters() if p.requires_grad]
        lr, epochs = cfg.lr * SHARP_LR, finish_epochs(cfg)
    else:
        params = [p for n, p in aligner.named_parameters()
                  if not n.startswith("teacher.") and p.requires_grad]
        lr, epochs = cfg.lr, cfg.epochs
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    total = max(epochs * steps_per_epoch, 1)
    sched = torch.optim.lr_scheduler.OneCycleLR(  # torch divides by zero when pct_start * total_steps == 1
        opt, max_lr=lr, total_steps=total, pct_start=0.2 if total != 5 else 0.25
    )
    return params, opt, sched


def kept_rng(device: torch.device | None = None) -> contextlib.AbstractContextManager:
    """Return a context after which torch's global random state is the caller's again.

    Restores the CPU generator and, when ``device`` is a CUDA device, its generator (the one the
    fit draws from; other GPUs are not touched, so no context is created on them).
    """
    devices = []
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        index = torch.device(device).index
        devices = [torch.cuda.current_device() if index is None else index]
    return torch.random.fork_rng(devices=devices, device_type="cuda")


def train(
    aligner: Aligner,
    data: TrainData,
    *,
    device: torch.device,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    progress: bool = True,
    identity: dict[str, Any] | None = None,
    num_workers: int = 0,
) -> list[dict[str, float]]:
    """Train ``aligner`` in place; returns the per-epoch history of every loss term.

    With ``checkpoint_dir`` the whole state (weights, teacher, optimiser, schedule, random
    generators, history) is saved every ``checkpoint_every`` epochs (see
    :mod:`stranker.train.checkpoint`; one fit at a time per folder); ``resume=True`` continues from
    the last checkpoint and reaches the same result as an uninterrupted run. The checkpoint records
    the training configuration, a fingerprint of ``data`` and ``identity`` (plain values, e.g. the
    genes); resuming from one whose record differs raises, naming what differs. Streamed inputs
    (``data.read``) are read by ``num_workers`` DataLoader workers (0: in this process). torch's
    global random state is seeded for the fit and restored to the caller's on return.

    A training that would take no optimisation step (no batch of two spots or more of one section,
    e.g. ``batch_size=1``) is refused before any work (``ValueError``); a loss or weights that become
    NaN or infinite stop it with :class:`TrainingDiverged` (a ``ValueError`` and a
    ``FloatingPointError``): no model that did not train, or diverged, is returned.

    Under ``torchrun`` (process group initialised, see :mod:`stranker.train.distributed`) every
    process runs this with the same arguments: each trains on its share of every batch, the
    losses see the whole batch, rank 0 writes the checkpoints, and a checkpoint resumes on any
    number of processes. The history holds whole-batch values, the same on every process.
    """
    checkpoint.check_arguments(checkpoint_dir, checkpoint_every, resume)
    writes = checkpoint_dir is not None and distributed.rank() == 0
    with kept_rng(device), checkpoint.lock(checkpoint_dir) if writes else contextlib.nullcontext():
        return _train(aligner, data, device, seed, checkpoint_dir, checkpoint_every, resume, progress,
                      identity, num_workers)


def _train(
    aligner: Aligner, data: TrainData, device: torch.device, seed: int, checkpoint_dir: str | Path | None,
    checkpoint_every: int, resume: bool, progress: bool, identity: dict[str, Any] | None, num_workers: int,
) -> list[dict[str, float]]:
    cfg = aligner.cfg
    ws, rk = distributed.world_size(), distributed.rank()
    sec = data.section.numpy()
    steps_per_epoch = len(_plan(sec, cfg.batch_size, torch.Generator().manual_seed(0), ws))
    if steps_per_epoch == 0:  # refused before any work: a model without one step is its random heads
        raise ValueError(_no_step(sec, cfg.batch_size, ws))
    ckpt, fit_id, state = None, None, None
    if checkpoint_dir is not None:
        ckpt = Path(checkpoint_dir) / checkpoint.CHECKPOINT
        fit_id = {"config": checkpoint.training_config(cfg), "data": checkpoint.data_fingerprint(data),
                  "steps_per_epoch": steps_per_epoch, **(identity or {})}
    if resume and ckpt.exists():  # read and checked before any work
        state = checkpoint.load(ckpt)
        checkpoint.check_same_fit(ckpt, state["identity"], fit_id)
    elif resume and rk == 0:
        log = logging.getLogger("stranker")
        log.info(f"`resume=True`: no checkpoint in {checkpoint_dir}; training afresh.")

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    aligner.to(device)
    if device.type == "cuda" or ws > 1:  # DDP's gradient buckets follow the layout of the weights
        aligner.student.to(memory_format=torch.channels_last)
        aligner.teacher.to(memory_format=torch.channels_last)
    set_input_statistics(aligner, data, device)
    total_epochs = cfg.epochs + finish_epochs(cfg)
    # a checkpoint taken after the first epoch of the sharp finish holds the finish's optimiser
    params, opt, sched = optimiser(aligner, cfg, steps_per_epoch, sharp=state is not None
                                   and state["epoch"] > cfg.epochs)
    history: list[dict[str, float]] = []
    start_epoch, step = 0, 0
    if state is not None:
        aligner.load_state_dict(state["aligner"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        history, start_epoch, step = state["history"], state["epoch"], state["step"]

    use_amp = device.type == "cuda"
    pos_all = data.pos.to(device)
    expr_all = data.expr.to(device)
    images = None
    if not data.streamed:
        pin = device.type == "cuda" and data.images.device.type == "cpu"
        images = data.images.pin_memory() if pin else data.images
    loader = patch_loader(data, device, num_workers) if data.streamed else None
    undo_sync = distributed.sync_batchnorm(aligner.student, device) if ws > 1 else None
    ddp = distributed.wrap(aligner, device) if ws > 1 else None

    from tqdm.auto import tqdm

    show = progress and rk == 0
    bar = tqdm(
        range(start_epoch, total_epochs), desc="fit", disable=not show, initial=start_epoch,
        total=total_epochs,
    )
    try:
        for epoch in bar:
            sharp = epoch >= cfg.epochs  # the sharp finish: see Config.sharp_epochs
            if epoch == cfg.epochs:  # it starts from the teacher, which is kept as the coarse branch
                aligner.coarse.load_state_dict(aligner.teacher.state_dict())
                aligner.student.load_state_dict(aligner.teacher.state_dict())
                params, opt, sched = optimiser(aligner, cfg, steps_per_epoch, sharp=True)
            aligner.train()
            aligner.teacher.eval()
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            n_seen = 0
            plan = _plan(sec, cfg.batch_size, gen, ws)
            shares = [distributed.shard(b, ws, rk) for b in plan] if ws > 1 else [(b, None) for b in plan]
            inputs = batch_inputs(data, [li for li, _ in shares], images, loader)
            for idx, (li, part), x_cpu in zip(plan, shares, inputs, strict=True):
                it = torch.from_numpy(li)
                x = to_input(x_cpu, device)
                if data.pixels:
                    aug = augment_options(cfg, part, sharp)
                    weak = augment(x, gen, strong=False, **aug)
                    strong = augment(x, gen, strong=cfg.student_view == "strong", **aug)
                else:
                    weak = strong = x
                e, p = expr_all[it.to(device)], pos_all[it.to(device)]
                unl = unlabeled_views(data, cfg, gen, len(idx), device, ws, rk, sharp)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                    if ddp is None:
                        terms = aligner.training_losses(strong, weak, e, p, **unl)
                    else:
                        terms = ddp(strong, weak, e, p, len(li) * ws / len(idx), **unl)
                aligner.zero_grad(set_to_none=True)  # the finish leaves the gene branch's gradients unused
                terms["total"].backward()
                torch.nn.utils.clip_grad_norm_(params, 5.0)
                opt.step()
                sched.step()
                # the teacher's decay ramps up again at the start of the finish
                aligner.update_teacher(step - cfg.epochs * steps_per_epoch if sharp else step)
                step += 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(idx)
                if ws == 1 and not math.isfinite(sums["total"]):  # at the first such batch (one process)
                    raise TrainingDiverged(_diverged(float(terms["total"].detach()), epoch, cfg.lr))
                n_seen += len(idx)
            if ws > 1:  # per-spot terms were scaled per process: their mean over processes is the batch's
                sums = dict(zip(sums, distributed.all_mean(list(sums.values()), device), strict=True))
            rec = {k: v / max(n_seen, 1) for k, v in sums.items()}
            rec.update(epoch=epoch + 1, seconds=time.perf_counter() - t0, lr=float(sched.get_last_lr()[0]))
            history.append(rec)
            bar.set_postfix({k: f"{v:.3f}" for k, v in rec.items() if k not in ("epoch", "seconds", "lr")})
            if not np.isfinite(rec.get("total", 0.0)):  # every process sees the same mean
                raise TrainingDiverged(_diverged(rec["total"], epoch, cfg.lr))
            if ckpt is not None and ((epoch + 1) % checkpoint_every == 0 or epoch + 1 == total_epochs):
                if rk == 0:
                    checkpoint.save(ckpt, {
                        "aligner": aligner.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": checkpoint.plain_scheduler_state(sched.state_dict()),
                        "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                        "history": history, "epoch": epoch + 1, "step": step, "identity": fit_id,
                    })
                distributed.barrier()
    finally:
        if undo_sync is not None:
            undo_sync()
        del loader  # stops its worker processes
    state = aligner.state_dict()
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise TrainingDiverged(
            f"Training ended with NaN or infinite weights in {len(bad)} tensor(s) ({', '.join(bad[:3])}) "
            f"although the loss stayed finite: it diverged. Lower `lr` (lr={cfg.lr:g}); no model is returned."
        )
    aligner.eval()
    return history


def _diverged(loss: float, epoch: int, lr: float) -> str:
    return (f"Training diverged: the loss became {loss} in epoch {epoch + 1} (lr={lr:g}). Lower `lr` "
            f"(e.g. lr={lr / 10:g}); no model is returned.")


def _no_step(sec: np.ndarray, batch_size: int, ws: int) -> str:
    """Say why training would take no optimisation step: no batch (one section each) holds enough spots."""
    sizes = sorted(np.unique(sec, return_counts=True)[1].tolist(), reverse=True)
    least = max(2, ws)
    shown = ", ".join(map(str, sizes[:5])) + (f" (+{len(sizes) - 5} more)" if len(sizes) > 5 else "")
    under = f" under {ws} processes," if ws > 1 else ""
    return (
        f"Training would take no optimisation step: a batch holds the spots of one section, and{under} one "
        f"with fewer than {least} spots is left out; with batch_size={batch_size} and sections of {shown} "
        f"spot(s), no batch is left, and the model would keep its random heads. Pass a `batch_size` of at "
        f"least {least} and sections of at least {least} spots."
    )

