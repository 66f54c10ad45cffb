"""Speed: fit and predict throughput, peak memory, and pipeline efficiency against the bare backbone.

Efficiency = our throughput / the bare backbone's throughput at the same batch and patch size,
measured in the same run: fit against forward + backward + AdamW step of the backbone alone, predict
against its forward alone. 1.0 would mean that data handling, augmentation, the gene branch, the losses,
the EMA teacher and retrieval cost nothing.

Each measurement runs in its own subprocess, so that its peak memory is its own (peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU). Two levels are measured:

- ``core``: the training loop (``stranker.train.train``) and the teacher's inference + retrieval on
  in-memory uint8 patches. Imports only torch, timm and numpy, so it also runs on a bare GPU box.
- ``full`` (needs the scverse stack): ``sr.tl.fit`` / ``sr.Model.predict`` on a synthetic
  SpatialData, patch reading from the image included.

On a shared, noisy machine a part's throughput drifts between runs, so the parts are interleaved:
each of ``--rounds`` rounds runs the bare backbone and ours back to back (A B A B ...), each round's
efficiency is ours / bare of that round, and the report gives the median over rounds with its range.

    python benchmarks/speed.py                 # this machine's device, writes results/speed.json
    python benchmarks/speed.py --rounds 5      # more rounds: a tighter median on a busy machine
    python benchmarks/speed.py --smoke --out /tmp/s
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # the core runs from a checkout, without installing


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_mb(dev) -> float:
    import torch

    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _config(a):
    from stranker.model import make_config

    return make_config("stranker", backbone=a.backbone, batch_size=a.batch, image_size=a.image_size,
                       epochs=a.epochs, pretrained=False)  # speed does not depend on the weights


def _images(n, size, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size, 3), dtype=torch.uint8, generator=g)


def bare_train(a, dev):
    """Backbone forward + backward + AdamW on a linear head, as our loop runs it
    (AMP, channels_last on GPU).
    """
    import torch

    from stranker.model.backbones import create_backbone
    from stranker.train.loop import to_input

    net, _ = create_backbone(a.backbone, pretrained=False)
    net = net.to(dev)
    head = torch.nn.LazyLinear(a.genes).to(dev)
    if dev.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    x8 = _images(a.batch, a.image_size)
    y = torch.randn(a.batch, a.genes, device=dev)
    with torch.no_grad():
        head(net(to_input(x8, dev)[:, 0]).flatten(1))
    opt = torch.optim.AdamW(list(net.parameters()) + list(head.parameters()), lr=1e-4)
    amp = dev.type == "cuda"

    def step():
        x = to_input(x8, dev)[:, 0]
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.mse_loss(head(net(x).flatten(1)).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _rate(step, a.batch, a.iters, dev)


def bare_forward(a, dev):
    import torch

    from stranker.model.backbones import create_backbone
    from stranker.train.loop import to_input

    net = create_backbone(a.backbone, pretrained=False)[0].to(dev).eval()
    x8 = _images(a.predict_batch, a.image_size)
    amp = dev.type == "cuda"

    @torch.no_grad()
    def step():
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            net(to_input(x8, dev)[:, 0])

    return _rate(step, a.predict_batch, a.iters, dev)


def _rate(step, per_step, iters, dev):
    for _ in range(2):
        step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(dev)
    return {"spots_per_s": per_step * iters / (time.perf_counter() - t0)}


def core_fit(a, dev):
    """``stranker.train.train`` on in-memory patches of 4 sections; throughput of the epochs after the
    first.
    """
    import torch

    from stranker.model import Aligner
    from stranker.train.loop import TrainData, train

    cfg = _config(a)
    n = a.spots
    data = TrainData(images=_images(n, a.image_size), expr=torch.randn(n, a.genes), pos=torch.rand(n, 2),
                     section=torch.arange(n) * 4 // n)
    torch.manual_seed(0)
    aligner = Aligner(cfg, a.genes)
    hist = train(aligner, data, device=dev, seed=0, progress=False)
    secs = [h["seconds"] for h in hist[1:]] or [hist[0]["seconds"]]
    return {"spots_per_s": n / float(np.median(secs)), "epochs_timed": len(secs)}


def core_predict(a, dev, tta):
    """Teacher inference in batches + top-k retrieval against a bank of ``spots`` references, then the
    projection onto the bank's main axes (``predict_rank``; the axes are found once per model, outside
    the timed steps, as ``Model`` caches them).
    """
    import torch

    from stranker.model import Aligner, retrieve
    from stranker.model.lowrank import expression_axes, project
    from stranker.train.loop import to_input

    cfg = _config(a)
    aligner = Aligner(cfg, a.genes).to(dev).eval()
    x8 = _images(a.predict_batch, a.image_size)
    keys = torch.randn(a.spots, cfg.embed_dim, device=dev)
    g = torch.Generator().manual_seed(1)  # a bank with structure, so that 'auto' keeps some axes
    values = torch.randn(a.spots, 8, generator=g) @ torch.randn(8, a.genes, generator=g)
    values = values + 0.5 * torch.randn(a.spots, a.genes, generator=g)
    axes = None
    if cfg.predict_rank:
        axes = tuple(torch.from_numpy(x).to(dev) for x in expression_axes(values.numpy(), cfg.predict_rank))
    values = values.to(dev)
    amp = dev.type == "cuda"

    @torch.no_grad()
    def step():
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            e, p = aligner.teacher.forward_tta(to_input(x8, dev), tta)
        pred = retrieve(e.float(), keys, values, cfg.top_k)
        if axes is not None:
            project(pred, *axes)

    return _rate(step, a.predict_batch, a.iters, dev)


def full_fit_predict(a, dev):
    """``sr.tl.fit`` on 3 synthetic sections and ``Model.predict`` on a 4th, patch reading included."""
    import stranker as sr

    sr.settings.progress = False
    sr.settings.verbosity = 0
    n = a.spots // 3
    secs = sr.datasets.synthetic(4, n, n_genes=a.genes, patch_px=a.image_size, seed=0)
    t0 = time.perf_counter()
    model = sr.tl.fit(secs[:3], genes="hvg", n_top_genes=a.genes, backbone=a.backbone, batch_size=a.batch,
                      epochs=a.epochs, patch_px=a.image_size, image_size=a.image_size, device=str(dev),
                      pretrained=False)
    fit_s = time.perf_counter() - t0
    hist = model.meta["history"]
    epoch_s = float(np.median([h["seconds"] for h in hist[1:]] or [hist[0]["seconds"]]))
    n_train = model.meta["n_spots"]
    # every epoch run, the sharp finish's included (``epochs`` + ``sharp_epochs`` at the default)
    out = {"fit_spots_per_s": n_train / epoch_s, "fit_end_to_end_s": fit_s, "fit_epochs": len(hist),
           "fit_end_to_end_spots_per_s": n_train * len(hist) / fit_s}
    test = secs[3]
    n_test = test.tables["table"].n_obs
    for tta in (False, True):
        model.config.tta = tta
        model.predict(test)  # warm
        t0 = time.perf_counter()
        model.predict(test)
        out[f"predict_spots_per_s{'_tta' if tta else ''}"] = n_test / (time.perf_counter() - t0)
    return out


PARTS = {  # in the order of a round: each bare measurement right before the ones compared with it
    "bare_train": bare_train, "core_fit": core_fit, "full": full_fit_predict, "bare_forward": bare_forward,
    "core_predict": lambda a, d: core_predict(a, d, False),
    "core_predict_tta": lambda a, d: core_predict(a, d, True),
}
# efficiency: (ours part, its key, bare part), each a ratio within one round
RATIOS = {
    "fit_core": ("core_fit", "spots_per_s", "bare_train"),
    "predict_core": ("core_predict", "spots_per_s", "bare_forward"),
    "predict_core_tta_per_view": ("core_predict_tta", "spots_per_s", "bare_forward"),  # x 8 views
    "fit_full": ("full", "fit_spots_per_s", "bare_train"),
    "predict_full": ("full", "predict_spots_per_s", "bare_forward"),
}


def summarise_rounds(rounds: list[dict]) -> tuple[dict, dict, dict]:
    """Per part: the median of each figure over rounds (peak memory: the largest), with the rounds kept;
    efficiency: the median over rounds of each round's ratio, and its [min, max] over rounds."""
    res = {}
    for part in rounds[0]:
        runs = [r[part] for r in rounds]
        if "skipped" in runs[0]:
            res[part] = runs[0]
            continue
        med = {k: (max(x[k] for x in runs) if k in ("peak_mb", "baseline_mb") else
                   float(np.median([x[k] for x in runs])))
               for k, v in runs[0].items() if isinstance(v, int | float)}
        res[part] = {**runs[0], **med, "rounds": runs}
    eff, spread = {}, {}
    for name, (ours, key, bare) in RATIOS.items():
        if "skipped" in rounds[0][ours]:
            continue
        views = 8 if name.endswith("per_view") else 1
        per = [r[ours][key] / r[bare]["spots_per_s"] * views for r in rounds]
        eff[name], spread[name] = float(np.median(per)), [float(min(per)), float(max(per))]
    return res, eff, spread


def run_part(a, part):
    """One measurement (in its own subprocess, except in the smoke run) with its peak memory."""
    import torch

    from stranker.train.loop import resolve_device

    torch.manual_seed(0)
    dev = resolve_device(a.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(dev)
    base = _peak_mb(dev)
    res = PARTS[part](a, dev)
    res.update(peak_mb=_peak_mb(dev), baseline_mb=base, device=str(dev))
    return res


def spawn(part, argv):
    cmd = [sys.executable, __file__, "--part", part, *argv]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if p.returncode != 0:
        if part == "full" and "No module named" in p.stderr:
            return {"skipped": p.stderr.strip().splitlines()[-1]}
        raise RuntimeError(f"{part} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def machine(device):
    import torch

    cuda = torch.cuda.is_available() and device != "cpu"
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name(0) if cuda else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=112,
                    help="pixels the backbone sees (default config: 112)")
    ap.add_argument("--batch", type=int, default=32, help="training batch (default config: 32)")
    ap.add_argument("--predict-batch", type=int, default=128, help="inference batch (Model.infer's default)")
    ap.add_argument("--spots", type=int, default=768, help="training spots (and retrieval bank size)")
    ap.add_argument("--genes", type=int, default=785)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every part (A B A B ...)")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds-long run with a tiny backbone, in one process (CI)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.smoke:
        a.backbone, a.image_size, a.batch, a.predict_batch, a.spots, a.genes, a.epochs, a.iters, a.rounds = (
            "test_resnet", 32, 16, 32, 96, 20, 2, 2, 2)
    if a.part:
        return print(json.dumps(run_part(a, a.part)))
    sub = ["--device", a.device, "--backbone", a.backbone, "--image-size", str(a.image_size),
           "--batch", str(a.batch), "--predict-batch", str(a.predict_batch),
           "--spots", str(a.spots), "--genes", str(a.genes),
           "--epochs", str(a.epochs), "--iters", str(a.iters)]
    rounds = []
    for i in range(a.rounds):
        res = {}
        for part in PARTS:
            res[part] = run_part(a, part) if a.smoke else spawn(part, sub)
            print(f"round {i + 1}", part,
                  json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in res[part].items()}),
                  flush=True)
        rounds.append(res)
    res, eff, spread = summarise_rounds(rounds)
    settings = {k: getattr(a, k) for k in ("backbone", "image_size", "batch", "predict_batch", "spots",
                                           "genes", "epochs", "iters", "rounds")}
    report = {"machine": machine(a.device), "device": res["bare_train"]["device"], "settings": settings,
              "results": res, "efficiency": eff, "efficiency_range": spread}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "speed.json" if report["device"] == "cpu" else "speed_gpu.json"
    (out / name).write_text(json.dumps(report, indent=1))
    print(table(report))
    return report


def table(rep):
    """Markdown table: medians over rounds; efficiency with its range over rounds in brackets."""
    r, e = rep["results"], rep["efficiency"]
    rng = rep.get("efficiency_range", {})
    dev = rep["machine"]["gpu"] or f"CPU ({rep['machine']['cpu_count']} cores)"
    rows = [
        ("bare backbone fwd+bwd", r["bare_train"]["spots_per_s"], "", r["bare_train"]["peak_mb"]),
        ("fit, core loop", r["core_fit"]["spots_per_s"], "fit_core", r["core_fit"]["peak_mb"]),
        ("bare backbone forward", r["bare_forward"]["spots_per_s"], "", r["bare_forward"]["peak_mb"]),
        ("predict, core (no TTA)", r["core_predict"]["spots_per_s"], "predict_core",
         r["core_predict"]["peak_mb"]),
        ("predict, core (8-view TTA)", r["core_predict_tta"]["spots_per_s"], "predict_core_tta_per_view",
         r["core_predict_tta"]["peak_mb"]),
    ]
    if "fit_full" in e:
        f = r["full"]
        rows += [
            ("sr.tl.fit (epochs after the first)", f["fit_spots_per_s"], "fit_full", f["peak_mb"]),
            ("sr.tl.fit end to end", f["fit_end_to_end_spots_per_s"], "", f["peak_mb"]),
            ("Model.predict (no TTA)", f["predict_spots_per_s"], "predict_full", f["peak_mb"]),
            ("Model.predict (8-view TTA)", f["predict_spots_per_s_tta"], "", f["peak_mb"]),
        ]
    s = rep["settings"]
    lines = [f"{dev}, {s['backbone']} at {s['image_size']} px, batch {s['batch']} "
             f"(predict {s['predict_batch']})"
             f", median of {s.get('rounds', 1)} interleaved rounds",
             "", "| what | spots/s | efficiency (range over rounds) | peak memory MiB |", "|---|---|---|---|"]
    for name, v, k, mem in rows:
        cell = "" if k == "" else f"{e[k]:.2f}" + (f" ({rng[k][0]:.2f}–{rng[k][1]:.2f})" if k in rng else "")
        lines.append(f"| {name} | {v:.1f} | {cell} | {mem:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
