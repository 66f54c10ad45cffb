"""Slides from files: end-to-end throughput and peak memory of ``sr.io.read_slide`` + ``sr.tl.predict``.

A JPEG-compressed pyramidal TIFF with H&E-like tissue (pink stroma, purple nuclei, white glass) is
written once per size into a cache folder (``--cache``; a folder of the system's temp dir by default,
reused by later runs), tile by tile, never held in memory. The model is the default configuration
(ResNet-18 at 112 px, 224 px patches at 0.5 µm/px) with random weights (``pretrained=False``), built as
the tests build one without training, with the run record of a Visium-trained model: 55 µm tiles at
0.5 µm/px, so that the slide is tiled and read as a real one (224 px crops of level 0, resized to 112 px).
TTA is off by default (``--tta`` turns it on): it multiplies the network's work by 8 and would hide the
reading, which is what is measured here.

Parts, each run in its own subprocess so that its peak memory (``ru_maxrss``) is its own:

- ``bare``: the bare backbone's forward on tiles already in memory (same batch, same input size);
- ``read_w{n}``: reading alone, the patches of the first ``--read-tiles`` tiles with ``n`` reader threads;
- ``predict_w{n}``: ``sr.io.read_slide`` + ``sr.tl.predict(num_workers=n)`` on the whole slide.

Each of ``--rounds`` rounds runs every part once on every slide size, interleaved (A B A B ...);
the report gives each figure's median over rounds with its range, the efficiency of predict
(tiles/s over the bare forward's, within a round), the peak memory of every run, and whether every
``num_workers`` gave the same predictions.

    python benchmarks/slides.py                           # 5 000- and 20 000-tile slides, 3 rounds
    python benchmarks/slides.py --workers 0 1 2 4 --rounds 5
    python benchmarks/slides.py --smoke --out /tmp/s      # seconds, tiny slides, one process (CI)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # runs from a checkout, without installing

FORMAT = 1  # version of the slides written: a change of the writer writes them anew
COVER = 0.74  # share of the grid's tiles that lie on the tissue (the rounded square below, minus holes)


# --------------------------------------------------------------------------------------------
# the slide
# --------------------------------------------------------------------------------------------
def _textures(k: int, px: int, seed: int) -> list[np.ndarray]:
    """``k`` tiles of H&E-like tissue: eosin-pink stroma with texture, haematoxylin-purple nuclei."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:px, :px]
    out = []
    for _ in range(k):
        base = np.array([228.0, 160.0, 200.0]) + rng.normal(0, 6, 3)
        img = np.broadcast_to(base, (px, px, 3)).copy()
        # fibres: low-frequency waves of lighter and darker stroma
        f = rng.uniform(0.02, 0.08, 2)
        img += (12 * np.sin(f[0] * xx + f[1] * yy + rng.uniform(0, 6.3)))[..., None]
        # nuclei: dark purple discs of radius 3-7 px, ~180 per 256 x 256 px (a fifth of the area)
        n = int(180 * (px / 256) ** 2)
        cy, cx, r = rng.uniform(0, px, n), rng.uniform(0, px, n), rng.uniform(3, 7, n)
        nuc = np.zeros((px, px), dtype=bool)
        for y, x, rr in zip(cy.astype(int), cx.astype(int), r, strict=True):
            y0, y1, x0, x1 = max(y - 8, 0), min(y + 9, px), max(x - 8, 0), min(x + 9, px)
            nuc[y0:y1, x0:x1] |= (yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2 < rr**2
        img[nuc] = np.array([95.0, 55.0, 140.0]) + rng.normal(0, 10, (int(nuc.sum()), 3))
        img += rng.normal(0, 8, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def _inside(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Tissue mask at ``y`` (column) and ``x`` (row) in slide fractions (0-1): a rounded square with holes."""
    body = ((y - 0.5) / 0.47) ** 4 + ((x - 0.5) / 0.47) ** 4 < 1
    holes = [(0.3, 0.35, 0.05), (0.62, 0.7, 0.07), (0.75, 0.3, 0.04)]
    for cy, cx, r in holes:
        body &= (y - cy) ** 2 + (x - cx) ** 2 > r**2
    return body


def write_slide(
    path: Path, side: int, mpp: float, *, tile: int = 256, quality: int = 90, seed: int = 0
) -> None:
    """A JPEG-compressed pyramidal TIFF (levels 4x apart, as an SVS), written tile by tile."""
    import tifffile

    tex = _textures(16, tile, seed)
    glass = np.array([242, 240, 244], dtype=np.int16)
    rng = np.random.default_rng(seed + 1)
    noise = [rng.integers(-4, 5, (tile, tile, 3), dtype=np.int16) for _ in range(4)]
    sides = [side]
    while sides[-1] // 4 >= 1024:
        sides.append(sides[-1] // 4)

    def tiles(s: int):
        ar = np.arange(tile)
        for i, y in enumerate(range(0, s, tile)):
            for j, x in enumerate(range(0, s, tile)):
                m = _inside(((ar + y) / s)[:, None], ((ar + x) / s)[None, :])[..., None]
                t = tex[(i * 7 + j * 13) % len(tex)].astype(np.int16)
                yield np.where(m, t, glass + noise[(i + j) % len(noise)]).astype(np.uint8)

    tmp = path.with_suffix(".partial")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for lv, s in enumerate(sides):
            kw = dict(subifds=len(sides) - 1) if lv == 0 else dict(subfiletype=1)
            f = side / s
            tw.write(tiles(s), shape=(s, s, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression="jpeg", compressionargs={"level": quality},
                     resolution=(1e4 / (mpp * f),) * 2, resolutionunit="CENTIMETER", **kw)
    tmp.replace(path)


def slide_for(n_tiles: int, a: argparse.Namespace) -> tuple[Path, int]:
    """The cached slide of about ``n_tiles`` tissue tiles (written when missing) and its side."""
    tile_px = a.tile_um / a.mpp
    side = int(np.ceil(np.sqrt(n_tiles / COVER) * tile_px / 256)) * 256
    folder = Path(a.cache)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"slide_v{FORMAT}_{side}px_{a.mpp:g}mpp_q{a.quality}.tif"
    if not path.exists():
        t0 = time.perf_counter()
        write_slide(path, side, a.mpp, quality=a.quality)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MB) in {time.perf_counter() - t0:.0f} s",
              flush=True)
    return path, side


# --------------------------------------------------------------------------------------------
# the model and the parts
# --------------------------------------------------------------------------------------------
def make_model(a: argparse.Namespace):
    """The default configuration with random weights and a Visium-like run record (no training)."""
    import torch

    import stranker as sr
    from stranker.model import Aligner, make_config

    kw = {} if a.image_size is None else {"image_size": a.image_size}
    cfg = make_config(backbone=a.backbone, pretrained=False, tta=a.tta, **kw)
    torch.manual_seed(0)
    al = Aligner(cfg, a.genes)
    g = np.random.default_rng(0)
    bank_n = 2000
    values = g.normal(size=(bank_n, 8)) @ g.normal(size=(8, a.genes)) + 0.5 * g.normal(size=(bank_n, a.genes))
    bank = {"keys": g.normal(size=(bank_n, cfg.embed_dim)).astype(np.float32),
            "values": values.astype(np.float32)}
    meta = {"target_mean": np.zeros(a.genes, np.float32), "target_std": np.ones(a.genes, np.float32),
            "patch_px": float(cfg.patch_px), "microns_per_pixel": a.mpp, "spot_diameter_um": a.tile_um,
            "spot_diameter_px": a.tile_um / a.mpp}
    return sr.Model(cfg, [f"G{i}" for i in range(a.genes)], aligner=al, meta=meta, bank=bank)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_mb() -> float:
    """Resident memory now (after the garbage collector)."""
    import gc

    gc.collect()
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def bare(a, slide, dev):
    """The backbone alone, forward on a batch of uint8 tiles in memory (as speed.py's bare_forward)."""
    import torch

    from stranker.model.backbones import create_backbone
    from stranker.train.loop import to_input

    model = make_model(a)
    size = model.config.image_size
    net = create_backbone(a.backbone, pretrained=False)[0].to(dev).eval()
    g = torch.Generator().manual_seed(0)
    x8 = torch.randint(0, 256, (a.batch, 1, size, size, 3), dtype=torch.uint8, generator=g)
    amp = dev.type == "cuda"

    @torch.no_grad()
    def step():
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            net(to_input(x8, dev)[:, 0])

    for _ in range(2):
        step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(a.iters):
        step()
    _sync(dev)
    return {"tiles_per_s": a.batch * a.iters / (time.perf_counter() - t0)}


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def read(a, slide, dev, workers):
    """Reading alone: the patches of the first ``--read-tiles`` tiles, in batches, ``workers`` threads."""
    import stranker as sr
    from stranker.section import as_sections
    from stranker.tl._predict import spots_or_tiles

    sr.settings.progress = False
    model = make_model(a)
    sp = as_sections(sr.io.read_slide(slide), need_table=False)[0]
    tiles, _, _ = spots_or_tiles(sp, model, None, log=lambda *_: None)
    inputs = model._inputs(tiles)
    rows = np.arange(min(a.read_tiles, len(inputs)))
    t0 = time.perf_counter()
    n = sum(len(x) for _, x in inputs.batches(a.batch, rows, num_workers=workers))
    return {"tiles": n, "tiles_per_s": n / (time.perf_counter() - t0)}


def predict(a, slide, dev, workers):
    """``sr.io.read_slide`` + ``sr.tl.predict(num_workers=workers)`` on the whole slide."""
    import stranker as sr

    sr.settings.progress = False
    sr.settings.verbosity = 0
    model = make_model(a)
    t0 = time.perf_counter()
    sdata = sr.io.read_slide(slide)
    before = _rss_mb()
    sr.tl.predict(model, sdata, device=str(dev), num_workers=workers)
    seconds = time.perf_counter() - t0
    t = sdata.tables["stranker_table"]
    pred = np.ascontiguousarray(t.layers["stranker"])
    emb = np.ascontiguousarray(t.obsm["X_stranker"])
    return {
        "tiles": int(t.n_obs), "seconds": seconds, "tiles_per_s": t.n_obs / seconds,
        "before_mb": before,  # after imports, model and read_slide
        "outputs_mb": (pred.nbytes + emb.nbytes + t.obsm["spatial"].nbytes) / 2**20,
        "outputs_sha1": hashlib.sha1(pred.tobytes() + emb.tobytes()).hexdigest(),
    }


def parts(workers: list[int]) -> list[str]:
    """The parts of one round on one slide, in order: each bare measurement right before the others."""
    return ["bare"] + [f"read_w{w}" for w in workers] + [f"predict_w{w}" for w in workers]


def run_part(a, part: str, slide: Path) -> dict:
    import torch

    from stranker.train.loop import resolve_device

    dev = resolve_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    base = _peak_mb()
    if part == "bare":
        res = bare(a, slide, dev)
    else:
        kind, w = part.rsplit("_w", 1)
        res = (read if kind == "read" else predict)(a, slide, dev, int(w))
    res.update(peak_mb=_peak_mb(), baseline_mb=base, device=str(dev))
    if dev.type == "cuda":
        res["gpu_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return res


def spawn(part: str, slide: Path, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--part", part, "--slide", str(slide), *argv]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if p.returncode != 0:
        raise RuntimeError(f"{part} on {slide.name} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------
def summarise(rounds: list[dict], workers: list[int]) -> dict:
    """Per slide and part: medians over rounds with [min, max]; predict's efficiency against bare."""
    out = {}
    for size in rounds[0]:
        res = {}
        for part in rounds[0][size]:
            runs = [r[size][part] for r in rounds]
            med = {}
            for k, v in runs[0].items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    xs = [float(x[k]) for x in runs]
                    med[k] = float(np.median(xs))
                    med[f"{k}_range"] = [min(xs), max(xs)]
            res[part] = {**runs[0], **med, "rounds": runs}
        for w in workers:
            per = [r[size][f"predict_w{w}"]["tiles_per_s"] / r[size]["bare"]["tiles_per_s"] for r in rounds]
            res[f"predict_w{w}"]["efficiency"] = float(np.median(per))
            res[f"predict_w{w}"]["efficiency_range"] = [float(min(per)), float(max(per))]
        shas = {r[size][f"predict_w{w}"]["outputs_sha1"] for r in rounds for w in workers}
        res["same_outputs"] = len(shas) == 1
        out[size] = res
    return out


def machine(device: str) -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cuda = torch.cuda.is_available() and device != "cpu"
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if cuda else None}


def table(rep: dict) -> str:
    """Markdown: per slide and part, tiles/s (median, range), efficiency, peak RSS (largest of the rounds)."""
    s = rep["settings"]
    m = rep["machine"]
    dev = m["gpu"] or f"CPU ({m['cpu_count']} cores)"
    lines = [f"{dev}, {s['backbone']} at {rep['image_size']} px, batch {s['batch']}, TTA {s['tta']}, "
             f"median of {s['rounds']} interleaved rounds (range)", "",
             "| slide | tiles | part | tiles/s | efficiency | peak RSS MB | before predict MB |",
             "|---|---|---|---|---|---|---|"]
    for size, res in rep["results"].items():
        n = int(res[f"predict_w{s['workers'][0]}"]["tiles"])
        for part, r in res.items():
            if not isinstance(r, dict):
                continue
            lo, hi = r["tiles_per_s_range"]
            eff = (f"{r['efficiency']:.2f} ({r['efficiency_range'][0]:.2f}–{r['efficiency_range'][1]:.2f})"
                   if "efficiency" in r else "")
            before = f"{r['before_mb']:.0f}" if "before_mb" in r else ""
            lines.append(f"| {size} px | {n} | {part} | {r['tiles_per_s']:.1f} ({lo:.1f}–{hi:.1f}) | {eff} | "
                         f"{max(x['peak_mb'] for x in r['rounds']):.0f} | {before} |")
        lines.append(f"| {size} px | {n} | same predictions for every num_workers | {res['same_outputs']} |"
                     " | | |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiles", type=int, nargs="+", default=[5_000, 20_000],
                    help="tissue tiles of each slide (its size follows)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="num_workers to compare")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every part (A B A B ...)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=None, help="network input (default: the config's, 112)")
    ap.add_argument("--tta", action="store_true", help="8-view test-time augmentation (the config's default)")
    ap.add_argument("--genes", type=int, default=785)
    ap.add_argument("--batch", type=int, default=128, help="tiles per forward pass (Model.infer's default)")
    ap.add_argument("--iters", type=int, default=10, help="timed batches of the bare forward")
    ap.add_argument("--read-tiles", type=int, default=4096, help="tiles read by the read-only parts")
    ap.add_argument("--mpp", type=float, default=0.5, help="µm per pixel of the slide (and of the model)")
    ap.add_argument("--tile-um", type=float, default=55.0,
                    help="the model's spot (tile) size: Visium's 55 µm")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality of the slide")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "stranker-bench-slides"),
                    help="folder of the slides written (kept for later runs)")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds-long run: tiny slides and network, one process")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--slide", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.smoke:
        a.tiles, a.rounds, a.backbone, a.image_size, a.genes, a.batch, a.iters, a.read_tiles = (
            [40, 90], 1, "test_resnet", 32, 20, 16, 2, 64)
        if "--cache" not in (argv if argv is not None else sys.argv):
            a.cache = str(Path(a.out) / "slides")
    if a.part:
        return print(json.dumps(run_part(a, a.part, Path(a.slide))))
    sub = ["--device", a.device, "--threads", str(a.threads), "--backbone", a.backbone,
           "--genes", str(a.genes), "--batch", str(a.batch), "--iters", str(a.iters),
           "--read-tiles", str(a.read_tiles), "--mpp", str(a.mpp), "--tile-um", str(a.tile_um)]
    sub += (["--image-size", str(a.image_size)] if a.image_size else []) + (["--tta"] if a.tta else [])
    slides = {str(side): path for path, side in (slide_for(n, a) for n in a.tiles)}
    rounds = []
    for i in range(a.rounds):
        res = {}
        for size, path in slides.items():
            res[size] = {}
            for part in parts(a.workers):
                r = run_part(a, part, path) if a.smoke else spawn(part, path, sub)
                res[size][part] = r
                shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()
                         if k not in ("outputs_sha1",)}
                print(f"round {i + 1} {size} px {part}", json.dumps(shown), flush=True)
        rounds.append(res)
    settings = {k: getattr(a, k) for k in ("tiles", "workers", "rounds", "threads", "backbone", "tta",
                                           "genes", "batch", "iters", "read_tiles", "mpp", "tile_um",
                                           "quality")}
    files = {size: {"path": str(p), "file_mb": p.stat().st_size / 2**20} for size, p in slides.items()}
    report = {"machine": machine(a.device), "settings": settings,
              "image_size": make_model(a).config.image_size, "slides": files,
              "results": summarise(rounds, a.workers)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "slides.json").write_text(json.dumps(report, indent=1))
    print(table(report))
    return report


if __name__ == "__main__":
    main()
