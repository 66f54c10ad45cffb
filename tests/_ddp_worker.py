"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU); also its helpers."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

SIZES = (13, 11, 9)  # batches of 7+6, 6+5, 5+4 spots (batch_size 8): uneven shares on two processes


def tiny_data():
    from stranker.train import TrainData

    g = torch.Generator().manual_seed(0)
    n = sum(SIZES)
    images = torch.randint(0, 256, (n, 1, 16, 16, 3), generator=g, dtype=torch.uint8)
    expr = torch.randn(n, 6, generator=g)
    pos = torch.rand(n, 2, generator=g)
    section = torch.from_numpy(np.repeat(np.arange(len(SIZES)), SIZES))
    unlabeled = torch.randint(0, 256, (10, 1, 16, 16, 3), generator=g, dtype=torch.uint8)
    return TrainData(images=images, expr=expr, pos=pos, section=section, unlabeled=unlabeled)


def tiny_aligner(init_seed: int = 0, **kw):
    from stranker.model import Aligner, make_config

    opts = dict(backbone="test_resnet", pretrained=False, image_size=16, epochs=2, batch_size=8, embed_dim=16,
                gene_hidden=16, w_corr=0.5, w_clip=0.5, w_rank=0.5, w_distill=0.5, w_consistency=0.5,
                spot_context=True, context_layers=1, position_bins=8, sharp_epochs=1)
    opts.update(kw)
    cfg = make_config("stranker", **opts)
    torch.manual_seed(init_seed)
    return Aligner(cfg, 6)


def _flat(module) -> torch.Tensor:
    return torch.cat([t.detach().float().flatten() for t in [*module.parameters(), *module.buffers()]])


def main(out: Path) -> None:
    import torch.distributed as dist

    import stranker.train.loop as loop
    from stranker.train import distributed, train

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    distributed.setup(cpu)
    ws, rk = distributed.world_size(), distributed.rank()
    data = tiny_data()
    report: dict = {"world_size": ws}

    # 1. one step's gradients: the 2-process share-and-gather equals one process on the whole batch
    ref = tiny_aligner()
    ref.train()
    ref.teacher.eval()
    ddp_al = copy.deepcopy(ref)
    rows = np.arange(7)
    x = loop.to_input(data.images[rows], cpu)
    ref.training_losses(x, x, data.expr[rows], data.pos[rows])["total"].backward()
    undo = distributed.sync_batchnorm(ddp_al.student, cpu)
    wrapped = distributed.wrap(ddp_al, cpu)
    li, _ = distributed.shard(rows, ws, rk)
    xl = loop.to_input(data.images[li], cpu)
    wrapped(xl, xl, data.expr[li], data.pos[li], len(li) * ws / len(rows))["total"].backward()
    undo()
    diffs = [float((p.grad - q.grad).abs().max() / (q.grad.abs().max() + 1e-12))
             for (n, p), (_, q) in zip(ddp_al.named_parameters(), ref.named_parameters(), strict=True)
             if q.grad is not None]
    report["n_grads"] = len(diffs)
    report["grad_rel_diff"] = max(diffs)
    report["grad_missing"] = sum(p.grad is None
                                 for p, q in zip(ddp_al.parameters(), ref.parameters(), strict=True)
                                 if q.grad is not None)

    # 2. a whole fit: history, and identical students and EMA teachers on every process
    al = tiny_aligner()
    report["history"] = train(al, data, device=cpu, seed=0, checkpoint_dir=out / "full", progress=False)
    mine = torch.stack([_flat(al.teacher), _flat(al.student)[: len(_flat(al.teacher))]])
    others = [torch.empty_like(mine) for _ in range(ws)]
    dist.all_gather(others, mine)
    report["teacher_max_diff"] = max(float((o[0] - mine[0]).abs().max()) for o in others)
    report["student_max_diff"] = max(float((o[1] - mine[1]).abs().max()) for o in others)

    # 3. the same fit interrupted in its 2nd epoch (the checkpoint of epoch 1 stays)
    real, calls = loop.batches, {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # 1 call to count steps, epoch 1, then epoch 2 is interrupted
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    loop.batches = interrupting
    try:
        train(tiny_aligner(), data, device=cpu, seed=0, checkpoint_dir=out / "cut", progress=False)
    except KeyboardInterrupt:
        report["interrupted"] = True
    loop.batches = real
    if rk == 0:
        (out / "report.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
