"""Training throughput (spots/s) of the one training loop on 1, 2, ... processes (DDP under torchrun).

    python benchmarks/train_scaling.py [--nproc 1 2] [--backbone test_resnet] [--image-size 64]
                                       [--spots 768] [--batch-size 64] [--epochs 3] [--device cpu]

Synthetic data (random patches and expression, 4 sections); throughput is taken over the epochs
after the first (warm-up), from the loop's own per-epoch timing. On CPU each process gets
``--threads`` threads (default 1, so N processes use N cores; gloo); with ``--device cuda`` each
process gets one GPU (nccl).
The global batch is the same for every process count, so every run does the same optimisation.
Writes ``results/train_scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from stranker.model import Aligner, make_config
    from stranker.train import TrainData, distributed, resolve_device, train

    dev = distributed.setup(resolve_device(args.device))
    g = torch.Generator().manual_seed(0)
    n, n_sec, n_genes = args.spots, 4, 200
    data = TrainData(
        images=torch.randint(0, 256, (n, 1, args.image_size, args.image_size, 3), generator=g,
                             dtype=torch.uint8),
        expr=torch.randn(n, n_genes, generator=g), pos=torch.rand(n, 2, generator=g),
        section=torch.from_numpy(np.repeat(np.arange(n_sec), n // n_sec + 1)[:n]),
    )
    cfg = make_config("stranker", backbone=args.backbone, pretrained=False, image_size=args.image_size,
                      epochs=args.epochs, batch_size=args.batch_size)
    torch.manual_seed(0)
    al = Aligner(cfg, n_genes)
    hist = train(al, data, device=dev, seed=0, progress=False)
    if distributed.rank() == 0:
        secs = [h["seconds"] for h in hist[1:]] or [hist[0]["seconds"]]
        Path(args.out).write_text(json.dumps({
            "processes": distributed.world_size(), "threads_per_process": torch.get_num_threads(),
            "epoch_seconds": [h["seconds"] for h in hist], "spots_per_s": n / float(np.median(secs)),
            "final_total_loss": hist[-1]["total"], "device": str(dev),
        }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--backbone", default="test_resnet")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--spots", type=int, default=768)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process on CPU")
    p.add_argument("--out", default=str(HERE / "results" / "train_scaling.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    cores = os.cpu_count() or 1
    rows = []
    for k in args.nproc:
        with tempfile.TemporaryDirectory() as tmp:
            part = Path(tmp) / "r.json"
            threads = args.threads
            env = dict(os.environ, OMP_NUM_THREADS=str(threads),
                       PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"),
                                                   os.environ.get("PYTHONPATH", "")]))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={k}",
                   __file__, "--worker", "--backbone", args.backbone, "--image-size", str(args.image_size),
                   "--spots", str(args.spots), "--batch-size", str(args.batch_size),
                   "--epochs", str(args.epochs), "--device", args.device, "--out", str(part)]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env)
            row = json.loads(part.read_text())
            row["wall_seconds"] = time.perf_counter() - t0
            rows.append(row)
            print(f"{k} process(es): {row['spots_per_s']:.1f} spots/s "
                  f"(epochs {', '.join(f'{s:.1f}' for s in row['epoch_seconds'])} s)", flush=True)
    base = rows[0]["spots_per_s"]
    for r in rows:
        r["speedup"] = r["spots_per_s"] / base
        r["loss_diff_vs_first"] = abs(r["final_total_loss"] - rows[0]["final_total_loss"])
    import torch

    out = {
        "settings": {k: getattr(args, k) for k in ("backbone", "image_size", "spots", "batch_size", "epochs",
                                                   "device", "threads")},
        "machine": {"cpu_count": cores, "platform": platform.platform(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "runs": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
