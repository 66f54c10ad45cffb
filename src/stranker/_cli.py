"""Command line: ``stranker demo``, ``stranker fit`` and ``stranker predict``."""

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


def _predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    import spatialdata as sd

    import stranker as sr
    from stranker._atomic import check_writable
    from stranker.write import store
    from stranker.write.keys import check_name

    src = Path(args.zarr)
    if not src.exists():
        raise FileNotFoundError(f"{src} not found: pass a SpatialData .zarr store.")
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
    r = sub.add_parser("predict", help="predict expression on a SpatialData zarr store with a saved model",
                       description="Predict expression and image embeddings with a model saved by "
                                   "`stranker fit` (or sr.Model.save). In place, stranker adds its own keys "
                                   "and elements to the store (each written beside it, then renamed in) and "
                                   "leaves every other file of it as it was; --out writes a new store whole "
                                   "or not at all.")
    r.add_argument("model", help="model folder written by `stranker fit --out`")
    r.add_argument("zarr", help="SpatialData .zarr store (a section with spots, or a whole slide)")
    r.add_argument("--out", default=None,
                   help="write the result to this new store instead of in place (never the input, nor a "
                        "folder that holds it)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace a store that an earlier `stranker predict --out` wrote at --out (never "
                        "anything else)")
    r.add_argument("--key-added", default="stranker", help="prefix of the written keys (default stranker)")
    r.add_argument("--bin-size", type=int, default=None, help="Visium HD: bin size in µm (2, 8 or 16)")
    r.add_argument("--device", default=None, help="'auto', 'cpu', 'cuda' or 'cuda:N' (default auto)")
    r.set_defaults(func=_predict)
    return p


_PATHS = ("zarr", "out", "model", "checkpoint_dir", "weights")  # arguments that name files or folders


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
