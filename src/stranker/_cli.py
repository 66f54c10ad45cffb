"""Command line: ``stranker demo``, ``stranker fit``, ``stranker predict`` and ``stranker embed``."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    import stranker as sr

    t0 = time.perf_counter()
    print(f"stranker {sr.__version__} demo: synthetic tissue, fit on 3 sections, predict the 4th")
    secs = sr.datasets.synthetic(n_sections=4, n_spots=args.n_spots, seed=args.seed)
    train, test = secs[:3], secs[3]
    genes = sr.pp.select_genes(train, flavor="hvg", n_top=args.n_genes)
    print(f"  {len(secs)} sections x {args.n_spots} spots, {len(genes)} genes chosen on the training set")
    model = sr.tl.fit(train, genes=genes, epochs=args.epochs, seed=args.seed, patch_px=64, image_size=64,
                      backbone=args.backbone, pretrained=args.pretrained)
    sr.tl.predict(model, test)
    m = sr.tl.evaluate(test)
    from stranker._expression import lognorm

    idx = test.tables["table"].var_names.get_indexer(genes)
    y = lognorm(test.tables["table"].X, cols=idx)
    base = np.concatenate([lognorm(t.tables["table"].X, cols=idx) for t in train]).mean(0)
    base_mse = float(np.mean((y - base) ** 2))
    print(f"  held-out section: mean PCC over {len(genes)} genes (ACG) {m['pcc_all']:.3f}, "
          f"over the 50 most expressed (HEG) {m['pcc_heg']:.3f}, MSE {m['mse']:.3f} "
          f"(predicting the training mean: MSE {base_mse:.3f})")
    from pathlib import Path

    out = Path(args.out) if args.out else Path.cwd()
    out.mkdir(parents=True, exist_ok=True)
    if args.out:
        model.save(out / "model", overwrite=True)
        print(f"  model saved to {out / 'model'}")
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window
    shown = [genes[i] for i in np.argsort(-y.std(0), kind="stable")[:2]]
    png = out / "stranker_demo_gene_map.png"
    demo_figure(test, shown, png)
    print(f"  gene map of the two most variable genes ({', '.join(shown)}), measured beside predicted: {png}")
    print(f"  done in {time.perf_counter() - t0:.0f} s on {model.meta.device}")
    return 0


def demo_figure(test, genes: list[str], png) -> None:
    """Draw the demo's gene map of the held-out synthetic section into a small PNG."""
    import stranker as sr

    table = test.tables["table"]
    table.uns.setdefault("microns_per_pixel", table.uns["synthetic"]["microns_per_pixel"])  # the scale bar
    fig = sr.pl.gene_map(test, genes, show=False, max_px=300, panel_size=3.0)
    fig.suptitle(f"Held-out section S{table.uns['synthetic']['section']} (not seen in training): "
                 "measured | predicted from the H&E", fontsize="medium")
    _compact_png(fig, png)


def launch_command(argv: list[str], nproc: int) -> list[str]:
    """Return the ``torchrun`` command that runs ``stranker`` with ``argv`` on ``nproc`` local processes."""
    rest, skip = [], False
    for a in argv:  # drop --nproc N / --nproc=N: the launched processes must not launch again
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "stranker._cli", *rest]


def _compact_png(fig, path, colors: int = 64, dpi: int = 100) -> None:
    """Write a figure as a small palette PNG (the H&E texture would make a full-colour one large)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    img = Image.open(buf).convert("RGB")
    pal = img.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    pal.save(path, optimize=True)


def _rank(text: str) -> int | str:
    """Parse ``--predict-rank``: 'auto' or a whole number >= 0."""
    return "auto" if text == "auto" else _at_least(0)(text)


_rank.__name__ = "'auto' or integer"


def _at_least(low: int):
    """Return an argparse type: an integer of at least ``low``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def _fit(args: argparse.Namespace) -> int:
    import os

    from stranker._atomic import check_writable
    from stranker.tl._persist import check_target

    check_target(args.out, args.overwrite)  # before the fit, not after it
    check_writable(os.path.dirname(os.path.abspath(args.out)), f"--out {args.out}")
    if args.checkpoint_dir is not None:
        check_writable(args.checkpoint_dir, f"--checkpoint-dir {args.checkpoint_dir}")
    stores = [os.path.realpath(p) for p in args.zarr]
    twice = sorted({p for p in args.zarr if stores.count(os.path.realpath(p)) > 1})
    if twice:
        raise ValueError(f"{twice} given more than once: pass each section's store once.")
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        import subprocess

        cmd = launch_command(args.argv, args.nproc)
        print("launching: " + " ".join(cmd), flush=True)
        return subprocess.run(cmd).returncode

    import spatialdata as sd

    import stranker as sr
    from stranker.train import distributed

    if args.num_workers is not None:
        sr.settings.num_workers = args.num_workers

    data = [sd.read_zarr(p) for p in args.zarr]
    genes = args.genes
    if genes and len(genes) == 1 and genes[0] not in ("hvg", "heg") and genes[0].endswith(".txt"):
        genes = [g.strip() for g in open(os.path.expanduser(genes[0])) if g.strip()]
    elif genes and len(genes) == 1 and genes[0] in ("hvg", "heg"):
        genes = genes[0]
    options = {k: v for k, v in (("image_size", args.image_size), ("sharp_epochs", args.sharp_epochs),
                                 ("predict_rank", args.predict_rank)) if v is not None}
    model = sr.tl.fit(
        data if len(data) > 1 else data[0], genes=genes, method=args.method, backbone=args.backbone,
        weights=args.weights, pretrained=args.pretrained, freeze=_freeze(args.freeze),
        epochs=args.epochs, batch_size=args.batch_size, device=args.device, seed=args.seed,
        n_top_genes=args.n_top_genes, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
        layer=args.layer, stream={"auto": None, "yes": True, "no": False}[args.stream], **options,
    )
    if distributed.rank() == 0:
        model.save(args.out, overwrite=args.overwrite)
        print(f"model saved to {args.out}: {model}")
    return 0


def _freeze(value: str | None) -> bool | str | None:
    """``--freeze`` yes/no/last:N (or absent: the backbone's default)."""
    return {"yes": True, "no": False, None: None}.get(value, value)


def _is_cohort(args: argparse.Namespace) -> bool:
    """Whether ``stranker predict`` writes a folder of outputs: several inputs, a slide, a folder, a list."""
    from stranker.tl._cohort import is_store

    one = args.inputs[0]
    return len(args.inputs) > 1 or args.format is not None or not (is_store(one) or one.endswith(".zarr"))


def _predict(args: argparse.Namespace) -> int:
    if _is_cohort(args):
        return _predict_cohort(args)
    from pathlib import Path

    import spatialdata as sd

    import stranker as sr
    from stranker._atomic import check_writable
    from stranker.write import store
    from stranker.write.keys import check_name

    src = Path(args.inputs[0])
    if not src.exists():
        raise FileNotFoundError(f"{src} not found: pass a SpatialData .zarr store.")
    if args.nproc > 1 or _world() > 1:
        raise sr.InputError("--nproc (torchrun) shares the slides of a cohort among processes: one store is "
                            "predicted by one process. Leave --nproc out, or pass several inputs and --out "
                            "DIR.")
    if args.mpp is not None:
        raise sr.InputError("--mpp is for slide files and cohorts; for one store pass it with several inputs "
                            "and --out DIR, or record the resolution in the store.")
    check_name(args.key_added, "--key-added")  # refused before any work, not when writing
    out = Path(args.out) if args.out else None
    if out is not None:
        store.check_destination(src, out, args.overwrite)
        check_writable(out.parent, f"--out {out}")
    else:
        store.check_store_writable(src)
    model = sr.Model.load(args.model)
    sdata = sd.read_zarr(src)
    # a lower bound of what is written (refused only when it surely does not fit): the predictions on
    # the smallest table, and half the input store for a copy of it
    needed = min((t.n_obs * len(model.genes) * 4 for t in sdata.tables.values()), default=0)
    needed += store.store_size(src) // 2 if out is not None else 0
    store.check_space(out.parent if out is not None else src, needed)
    before = store.element_state(sdata)
    sr.tl.predict(model, sdata, key_added=args.key_added, device=args.device, bin_size=args.bin_size)
    if out is not None:
        store.write_new_store(sdata, out, source=src)
    else:
        store.write_in_place(sdata, src, before)
    print(f"predictions of {len(model.genes)} genes written to {out or src} (key '{args.key_added}')")
    return 0


def _world() -> int:
    from stranker.train.distributed import launch_ranks

    return launch_ranks()[0]


def _predict_cohort(args: argparse.Namespace) -> int:
    """``stranker predict MODEL IN [IN ...] --out DIR``: one output per slide (sr.tl.predict_slides)."""
    import stranker as sr
    from stranker.tl._cohort import SlideFailures, slide_inputs

    if args.out is None:
        raise sr.InputError(
            "Several inputs, slide files, folders and lists of slides are predicted into a folder, one "
            "output per slide: pass --out DIR (DIR/<slide>.zarr, or DIR/<slide>.h5ad with --format h5ad).")
    if args.nproc > 1 and _world() == 1:
        import subprocess

        slide_inputs(args.inputs)  # bad inputs are said here, not once per process
        cmd = launch_command(args.argv, args.nproc)
        print("launching: " + " ".join(cmd), flush=True)
        return subprocess.run(cmd).returncode
    from stranker.train.distributed import launch_ranks

    rank = launch_ranks()[1]
    try:
        summary = sr.tl.predict_slides(
            args.model, args.inputs, out=args.out, format=args.format or "zarr", mpp=args.mpp,
            key_added=args.key_added, device=args.device, overwrite=args.overwrite, bin_size=args.bin_size)
    except SlideFailures as err:
        if rank == 0:
            print(f"stranker: error: {err}", file=sys.stderr)
        return 1
    if rank == 0:
        n = summary["status"].value_counts()
        print(f"{n.get('written', 0)} slide(s) predicted, {n.get('skipped', 0)} already there, in {args.out}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    """``stranker embed MODEL IN [IN ...] --out cohort.h5ad``: one row per slide (sr.tl.embed_slides)."""
    from pathlib import Path

    import stranker as sr
    from stranker._atomic import check_writable, write_file
    from stranker.tl._cohort import model_sha256
    from stranker.write.keys import check_name

    out = Path(args.out)
    if out.suffix != ".h5ad":
        raise sr.InputError(f"--out {out}: the cohort is written as AnnData; name it <something>.h5ad.")
    check_name(args.key_added, "--key-added")
    _check_embed_target(out, args.overwrite)
    check_writable(out.parent, f"--out {out}")
    obs = None
    if args.obs is not None:
        import pandas as pd

        obs = pd.read_csv(args.obs, index_col=0, sep=None, engine="python")
    model = sr.Model.load(args.model)
    cohort = sr.tl.embed_slides(model, args.inputs, obs=obs, keep_tiles=args.tiles, device=args.device,
                                key_added=args.key_added, mpp=args.mpp)
    cohort.uns[_EMBED_MARK] = {"by": "stranker embed", "path": str(out.resolve()), "version": sr.__version__,
                               "model_sha256": model_sha256(model)}
    _check_embed_target(out, args.overwrite)  # again: it may have changed while embedding
    write_file(out, lambda tmp: cohort.write_h5ad(tmp))
    print(f"{cohort.n_obs} slide(s) embedded ({cohort.n_vars} dimensions"
          f"{', with their tiles' if args.tiles else ''}) written to {out}")
    return 0


_EMBED_MARK = "stranker_embed"


def _check_embed_target(out, overwrite: bool) -> None:
    """Refuse an existing ``--out`` unless ``--overwrite`` and ``stranker embed`` wrote it there."""
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace a cohort `stranker embed` wrote "
                              "there.")
    from stranker.tl._cohort import h5ad_record

    try:
        path = (h5ad_record(out, _EMBED_MARK) or {}).get("path")
    except Exception:  # not an h5ad file, or not readable: not one stranker wrote
        path = None
    if out.is_dir() or path != str(out.resolve()):
        raise FileExistsError(f"{out} exists and `stranker embed` did not write it there: it is never "
                              "replaced, with --overwrite or not. Choose a new path for --out.")


def parser() -> argparse.ArgumentParser:
    """Build the ``stranker`` argument parser with its subcommands."""
    import stranker

    p = argparse.ArgumentParser(prog="stranker",
                                description="Ranking-aligned image-gene models on H&E slides.")
    p.add_argument("--version", action="version", version=f"stranker {stranker.__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="fit on the embedded synthetic dataset and score a held-out section",
                       description="Fit on three synthetic sections, predict the fourth, print the scores "
                                   "and draw measured beside predicted expression (minutes on a laptop CPU).")
    d.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
    d.add_argument("--n-spots", type=int, default=200, help="spots per synthetic section (default 200)")
    d.add_argument("--n-genes", type=int, default=100, help="genes modelled (default 100)")
    d.add_argument("--backbone", default="resnet18",
                   help="timm image backbone (default resnet18; 'test_resnet' is tiny, for a quick try)")
    d.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                   help="pretrained backbone weights (default: random, the demo runs offline)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--out", default=None,
                   help="folder for the model and the gene-map PNG (default: the PNG only, here)")
    d.set_defaults(func=_demo)
    f = sub.add_parser("fit", help="fit on SpatialData zarr stores and save the model",
                       description="Fit an image-gene model on SpatialData .zarr stores (image, spots, table "
                                   "of raw counts) and save it to a folder that `stranker predict` and "
                                   "sr.Model.load read. For a quick try: --backbone test_resnet --epochs 1.")
    f.add_argument("zarr", nargs="+", help="SpatialData .zarr stores (one per section)")
    f.add_argument("--out", required=True, help="folder to save the model in")
    f.add_argument("--genes", nargs="*", default=None,
                   help="gene names, a .txt file of names, 'hvg' or 'heg' (default: var['stranker_selected'] "
                        "when set, else 'hvg')")
    f.add_argument("--n-top-genes", type=int, default=1000,
                   help="genes chosen by 'hvg' / 'heg' (default 1000)")
    f.add_argument("--method", default="stranker",
                   choices=["stranker", "stnet", "bleep", "mclstexp", "rankbygene"],
                   help="training recipe (default stranker)")
    f.add_argument("--backbone", default=None,
                   help="timm name, hf-hub:ORG/NAME or a named foundation model: uni, uni2-h, h-optimus-0, "
                        "h-optimus-1, virchow2, gigapath, phikon, resnet50, densenet121 (default resnet18; "
                        "'test_resnet' is tiny, for a quick try with --no-pretrained)")
    f.add_argument("--weights", default=None, help="local state dict of the backbone")
    f.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="pretrained weights: --weights, the Hugging Face cache or a download; an error "
                        "if none (--no-pretrained: random initialisation)")
    f.add_argument("--freeze", default=None,
                   help="yes (train the heads only), no (fine-tune), last:N (its last N blocks); default: "
                        "frozen for named foundation models")
    f.add_argument("--image-size", type=int, default=None,
                   help="pixels per side fed to the backbone (default: the method's, 112 for stranker)")
    f.add_argument("--epochs", type=int, default=None, help="training epochs (default: the method's)")
    f.add_argument("--sharp-epochs", type=_at_least(0), default=None,
                   help="then epochs of a copy on sharp patches, which reads slides as sharp as the training "
                        "ones (default: the method's, 4 for stranker; 0: off)")
    f.add_argument("--predict-rank", type=_rank, default=None,
                   help="predictions projected onto this many principal axes of the training expression; "
                        "auto: those above its noise (default: the method's, auto for stranker; 0: off)")
    f.add_argument("--batch-size", type=int, default=None,
                   help="spots per batch (default: the method's)")
    f.add_argument("--device", default=None, help="'auto', 'cpu', 'cuda' or 'cuda:N' (default auto)")
    f.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    f.add_argument("--layer", default=None, help="layer of raw counts (default X)")
    f.add_argument("--checkpoint-dir", default=None,
                   help="folder to save the training state in after every epoch")
    f.add_argument("--resume", action="store_true", help="continue from the last state in --checkpoint-dir")
    f.add_argument("--overwrite", action="store_true", help="replace a model already saved in --out")
    f.add_argument("--stream", default="auto", choices=["auto", "yes", "no"],
                   help="stream training patches from disk (auto: when beyond sr.settings.max_patch_memory)")
    f.add_argument("--num-workers", type=_at_least(0), default=None,
                   help="processes that read streamed patches")
    f.add_argument("--nproc", type=_at_least(1), default=1,
                   help="training processes on this machine (re-runs itself under torchrun, DDP; one GPU "
                        "each when CUDA is used, else gloo on CPU). For several machines run torchrun "
                        "yourself: torchrun --nnodes N --nproc_per_node G --rdzv-backend c10d "
                        "--rdzv-endpoint HOST:PORT -m stranker._cli fit ...")
    f.set_defaults(func=_fit)
    r = sub.add_parser(
        "predict", help="predict expression with a saved model: a store, or a cohort",
        description="Predict expression and image embeddings with a model saved by `stranker fit` (or "
                    "sr.Model.save). One SpatialData .zarr store: in place, stranker adds its own keys and "
                    "elements to the store (each written beside it, then renamed in) and leaves every other "
                    "file of it as it was; --out writes a new store whole or not at all. Several inputs, "
                    "slide files (SVS, NDPI, MRXS, TIFF, OME-TIFF), folders of them or a .txt list of paths: "
                    "each slide is tiled over its tissue and written to --out DIR/<slide>.zarr (or .h5ad), "
                    "whole or not at all; a rerun skips the slides this model already predicted, and a slide "
                    "that fails is reported and skipped (exit status 1, listing them, at the end).")
    r.add_argument("model", help="model folder written by `stranker fit --out`")
    r.add_argument("inputs", nargs="+", metavar="IN",
                   help="a SpatialData .zarr store; or several inputs: slide files, stores, folders of them, "
                        "text files listing them (one path per line)")
    r.add_argument("--out", default=None,
                   help="one store: write the result to this new store instead of in place (never the input, "
                        "nor a folder that holds it); a cohort: the folder of the outputs (one per slide)")
    r.add_argument("--format", default=None, choices=["zarr", "h5ad"],
                   help="a cohort's outputs: zarr (SpatialData: tiles and their predicted table; default) or "
                        "h5ad (the predicted table)")
    r.add_argument("--mpp", type=float, default=None,
                   help="a cohort: µm per pixel of the slides' full resolution, for slide files that do not "
                        "record it (it overrides what each records)")
    r.add_argument("--overwrite", action="store_true",
                   help="one store: replace a store that an earlier `stranker predict --out` wrote at --out "
                        "(never anything else); a cohort: predict again the slides this model already "
                        "predicted (outputs of another model are predicted again anyway; only outputs "
                        "stranker wrote are replaced)")
    r.add_argument("--key-added", default="stranker", help="prefix of the written keys (default stranker)")
    r.add_argument("--bin-size", type=int, default=None, help="Visium HD: bin size in µm (2, 8 or 16)")
    r.add_argument("--device", default=None,
                   help="'auto', 'cpu', 'cuda' or 'cuda:N' (default auto; with --nproc: cuda:LOCAL_RANK "
                        "each)")
    r.add_argument("--nproc", type=_at_least(1), default=1,
                   help="a cohort: processes on this machine sharing the slides (re-runs itself under "
                        "torchrun; largest slides first to the least loaded process; one GPU each when CUDA "
                        "is used)")
    r.set_defaults(func=_predict)
    e = sub.add_parser("embed", help="embed a cohort of slides with a saved model: one row per slide",
                       description="Tile each slide over its tissue, embed the tiles with the model's "
                                   "image branch and pool them (mean): an AnnData with one row per slide "
                                   "(index: the slide's file stem), written whole to --out "
                                   "(sr.tl.embed_slides). For sr.tl.survival, sr.tl.classify.")
    e.add_argument("model", help="model folder written by `stranker fit --out`")
    e.add_argument("inputs", nargs="+", metavar="IN",
                   help="slide files (SVS, NDPI, MRXS, TIFF, OME-TIFF), SpatialData .zarr stores, folders of "
                        "them, text files listing them")
    e.add_argument("--out", required=True, help="the cohort's .h5ad file")
    e.add_argument("--tiles", action="store_true",
                   help="also keep each slide's tile embeddings and centres (uns['<key>_tiles'])")
    e.add_argument("--obs", default=None,
                   help="CSV/TSV of slide metadata, first column the slide name (file stem), joined into obs")
    e.add_argument("--mpp", type=float, default=None,
                   help="µm per pixel of the slides' full resolution, for files that do not record it")
    e.add_argument("--overwrite", action="store_true",
                   help="replace a cohort that `stranker embed` wrote at --out (never anything else)")
    e.add_argument("--key-added", default="stranker", help="prefix of the written keys (default stranker)")
    e.add_argument("--device", default=None, help="'auto', 'cpu', 'cuda' or 'cuda:N' (default auto)")
    e.set_defaults(func=_embed)
    return p


# arguments that name files or folders
_PATHS = ("zarr", "inputs", "out", "model", "checkpoint_dir", "weights", "obs")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stranker`` command.

    Paths may start with ``~`` (also where the shell leaves it, as in ``--out=~/m``). SIGTERM and SIGHUP
    stop it as Ctrl-C does, so that what it was writing is removed (files are whole or absent).
    """
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    for name in _PATHS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(args, name, [os.path.expanduser(v) for v in value])
    try:
        with _signals_interrupt():
            return args.func(args)
    except (ValueError, OSError) as err:  # InputError is a ValueError; a full disk, a missing file: OSError
        print(f"stranker: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stranker: interrupted (files it was writing were removed).", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _signals_interrupt():
    """Make SIGTERM and SIGHUP raise KeyboardInterrupt in the block (main thread, default handlers only)."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
                old[sig] = signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
