"""sr.tl.predict_slides: a folder of slides to a folder of predictions, resumable, shared among processes.

Each slide (a whole-slide image file or a SpatialData .zarr store) is predicted on its own by
:func:`stranker.tl.predict` and written to ``out/<slide>.zarr`` (or ``.h5ad``), built beside its target
and renamed into place, so an output is whole or absent. Each output records the checksum of the model
(:func:`model_sha256`) and the settings that made it: a rerun skips the slides whose output is whole and
matches, and redoes the rest. Under ``torchrun`` every process takes its share of the slides (largest
first, to the least loaded process: :func:`assign_slides`); the processes share nothing but ``out``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._constants import Keys
from .._errors import InputError
from .._settings import logger, settings

RECORD = "stranker_slide"  # root attrs of a .zarr output, uns of a .h5ad output: what made it
FORMATS = ("zarr", "h5ad")
_LISTS = {".txt"}  # a text file listing inputs, one per line
_WAIT_DAYS = 7  # how long a process that finished waits for the others (torchrun), at most


def _slide_suffixes() -> set[str]:
    from ..io._slide import _TIFF, _VENDOR

    return _VENDOR | _TIFF


class SlideFailures(RuntimeError):
    """Raised by :func:`predict_slides` at the end of a run in which some slides failed.

    The message lists each failed slide (its path and the reason); ``summary`` is the run's table (one
    row per slide, as :func:`predict_slides` returns it) and ``failed`` its rows that failed. The other
    slides were written: a rerun predicts only what is missing.
    """

    def __init__(self, message: str, summary: Any) -> None:
        super().__init__(message)
        self.summary = summary
        self.failed = summary[summary["status"] == "failed"]


@dataclass(frozen=True)
class SlideInput:
    """One slide of a cohort: its name (its file stem), path and ``kind`` (``'slide'`` or ``'zarr'``)."""

    name: str
    path: Path
    kind: str

    @property
    def attrs(self) -> dict[str, str]:
        """What a SpatialData would carry: the slide id (its name), for :func:`stranker.tl.embed_slides`."""
        return {Keys.SLIDE_ID: self.name}

    def read(self, mpp: float | None = None) -> Any:
        """Open the slide lazily: :func:`stranker.io.read_slide` (with ``mpp``) or ``sd.read_zarr``."""
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path} not found.")
        if self.kind == "zarr":
            import spatialdata as sd

            return sd.read_zarr(self.path)
        from ..io import read_slide

        return read_slide(self.path, mpp=mpp)


def is_store(path: str | Path) -> bool:
    """Whether ``path`` is a zarr store (a folder with zarr metadata, or a folder named ``*.zarr``)."""
    p = Path(path)
    return p.is_dir() and (p.suffix.lower() == ".zarr" or (p / "zarr.json").is_file()
                           or (p / ".zgroup").is_file())


def _name(path: Path) -> str:
    low = path.name.lower()
    for suffix in (".ome.tiff", ".ome.tif", ".ome.btf"):
        if low.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem if path.suffix else path.name


def _entry(path: Path) -> SlideInput:
    kind = "zarr" if is_store(path) or path.suffix.lower() == ".zarr" else "slide"
    return SlideInput(_name(path), path, kind)


def _folder(path: Path) -> list[SlideInput]:
    """Return the slide files and stores of a folder, by name; outputs of :func:`predict_slides` left out."""
    suffixes = _slide_suffixes()
    found = [_entry(p) for p in sorted(path.iterdir()) if not p.name.startswith(".")
             and ((is_store(p) and not _is_output(p)) or (p.is_file() and p.suffix.lower() in suffixes))]
    if not found:
        raise InputError(
            f"{path} holds no slide files ({', '.join(sorted(suffixes))}) and no .zarr stores: pass the "
            "folder that holds the slides, the slide files themselves, or a text file listing them."
        )
    return found


def _is_output(store: Path) -> bool:
    """Whether a store is an output of :func:`predict_slides` (predictions, no image: not a slide)."""
    from ..write.store import root_attributes

    try:
        return RECORD in root_attributes(store)
    except (OSError, ValueError, AttributeError):
        return False


def _listed(path: Path) -> list[SlideInput]:
    found = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(os.path.expanduser(line))
        p = p if p.is_absolute() else path.parent / p  # relative to the list's folder
        if p.suffix.lower() in _LISTS:
            raise InputError(f"{path} lists {p}, another list: list slide files, stores or folders only.")
        found += _folder(p) if p.is_dir() and not is_store(p) else [_entry(p)]  # missing: fails when read
    if not found:
        raise InputError(f"{path} lists no slides: one path per line (blank lines and '#' comments skipped).")
    return found


def slide_inputs(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[SlideInput]:
    """Expand paths into the slides of a cohort, refusing names that would write to the same output.

    Parameters
    ----------
    paths
        Slide files (SVS, NDPI, MRXS, SCN, TIFF, OME-TIFF, ...), SpatialData ``.zarr`` stores, folders
        (their slide files and stores, not their subfolders) and text files (``.txt``) listing any of
        these, one per line (relative paths are relative to the list's folder). A path given here must
        exist; one listed in a text file that does not is reported when it is read.

    Returns
    -------
    The slides, in the order given (a folder's in name order), each named after its file stem.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    found: list[SlideInput] = []
    for raw in paths:
        p = Path(os.path.expanduser(raw))
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: pass slide files, .zarr stores, folders of them or a "
                                    "text file listing them.")
        if is_store(p):
            found.append(_entry(p))
        elif p.is_dir():
            found += _folder(p)
        elif p.suffix.lower() in _LISTS:
            found += _listed(p)
        else:
            found.append(_entry(p))
    if not found:
        raise InputError("Got no slides: pass slide files, .zarr stores, folders of them or a text file.")
    real = [os.path.realpath(s.path) for s in found]
    twice = sorted({str(s.path) for s, r in zip(found, real, strict=True) if real.count(r) > 1})
    if twice:
        raise InputError(f"These slides are given more than once: {twice[:10]}. Pass each slide once.")
    names = [s.name for s in found]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        listed = "; ".join(f"{n}: " + ", ".join(str(s.path) for s in found if s.name == n)
                           for n in clash[:10])
        raise InputError(
            f"Slides must have distinct names (each is written to <out>/<name>), but these share one: "
            f"{listed}. Rename the files, or predict them into different folders."
        )
    return found


def assign_slides(sizes: list[float], n_procs: int) -> list[int]:
    """Assign slides to processes so that they finish together: largest first, to the least loaded one.

    Greedy longest-processing-time scheduling on ``sizes`` (bytes on disk, which grow with the tiles of
    tissue); ties go to the lower index, so every process computes the same assignment.

    Returns
    -------
    The process of each slide.
    """
    order = sorted(range(len(sizes)), key=lambda i: (-float(sizes[i]), i))
    load = [0.0] * max(int(n_procs), 1)
    owner = [0] * len(sizes)
    for i in order:
        r = min(range(len(load)), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += max(float(sizes[i]), 1.0)
    return owner


def _size(path: Path) -> int:
    """Bytes of a slide on disk: a file (with the folder of the same stem MRXS keeps beside it) or a store."""
    try:
        if path.is_file():
            extra = path.with_suffix("")
            return path.stat().st_size + (_tree_size(extra) if extra.is_dir() else 0)
        return _tree_size(path) if path.is_dir() else 0
    except OSError:
        return 0


def _tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def model_sha256(model: Any) -> str:
    """Return the checksum of what a fitted model predicts from: weights, bank, genes, configuration, record.

    The same for a model in memory and for that model saved and loaded again (the configuration's
    ``pretrained`` and ``weights``, which only say where the first weights came from, are left out);
    any change to a weight gives another checksum.
    """
    import hashlib
    import json

    import numpy as np
    import torch

    h = hashlib.sha256(b"stranker-model-1\n")
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("pretrained", "weights")}
    h.update(json.dumps({"genes": list(model.genes), "config": config, "meta": model.meta.to_dict()},
                        sort_keys=True, default=str).encode())
    for name, t in sorted(model.aligner.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"\n{name}|{t.dtype}|{t.numel()}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    for name in sorted(model.bank):
        a = np.ascontiguousarray(np.asarray(model.bank[name]))
        h.update(f"\nbank/{name}|{a.dtype}|{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def mpp_of(mpp: float | Mapping[str, float] | None, name: str) -> float | None:
    if isinstance(mpp, Mapping):
        mpp = mpp.get(name)
    if mpp is None:
        return None
    from ..section._record import check_mpp

    return check_mpp(mpp, f"`mpp=` of slide {name!r}",
                     "Pass the scan's µm per pixel, e.g. 0.5 for 20x, 0.25 for 40x.")


_MPP_HINT = (" For a cohort: `sr.tl.predict_slides(..., mpp=...)` or `stranker predict ... --mpp X` (one "
             "value for every slide; a dict {slide name: µm/px} in Python sets it per slide).")


def read_input(item: SlideInput, mpp: float | None) -> Any:
    """Read one slide (lazily), saying in a refusal for want of a resolution how to give it for a cohort."""
    try:
        return item.read(mpp)
    except InputError as err:
        if mpp is None and "mpp=" in str(err):
            raise InputError(f"{err}{_MPP_HINT}") from err
        raise


# ------------------------------------------------------------------------------------------- outputs
def _abs(path: Path) -> str:
    from ..write.store import absolute

    return str(absolute(path))


def h5ad_record(path: Path, key: str = RECORD) -> Any:
    """Return ``uns[key]`` of an .h5ad file without reading the rest (``None`` when absent)."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        node = f.get(f"uns/{key}")
        return None if node is None else read_elem(node)


def existing_output(target: Path) -> tuple[str, Any]:
    """Say what is at an output path: ``('absent', None)``, ``('ours', record)`` or ``('foreign', reason)``.

    Ours is an output stranker wrote at this path (its record names it) and whole: for a store, every
    element it lists is there; its record is ``None`` when another stranker command wrote it. Anything
    else (a file or folder of the user's, a copy from elsewhere, an unreadable file) is foreign: never
    replaced.
    """
    from ..write.store import root_attributes, stranker_store

    if not target.exists() and not target.is_symlink():
        return "absent", None
    if target.suffix == ".zarr":
        if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
            return "absent", None  # an empty folder: nothing to lose
        mark = stranker_store(target)
        if mark is None:
            return "foreign", ("stranker did not write it (no record of a stranker output at this path in "
                               "its root attributes)")
        missing = [e for e in mark.get("elements") or [] if not (target / e).is_dir()]
        try:
            rec = root_attributes(target).get(RECORD)
        except (OSError, ValueError):
            rec = None
        if missing:
            return "ours", {"partial": missing}
        return "ours", rec if isinstance(rec, dict) else None
    if target.is_dir() or target.is_symlink():
        return "foreign", "it is a folder or a link, not a file stranker wrote"
    try:
        rec = h5ad_record(target)
    except Exception as err:  # not HDF5, truncated: not what stranker leaves (its files are renamed in whole)
        return "foreign", (f"it cannot be read as an .h5ad file ({type(err).__name__}), so it is not one "
                           "stranker wrote")
    if not isinstance(rec, dict) or rec.get("path") != _abs(target):
        return "foreign", "stranker did not write it (no record of a stranker output at this path in its uns)"
    return "ours", rec


_MATCH = ("slide", "source", "model_sha256", "key_added", "mpp", "tile_px", "bin_size", "adapt")


def _matches(rec: Any, want: dict) -> bool:
    if not isinstance(rec, dict) or "partial" in rec:
        return False
    return all(_plain(rec.get(k)) == _plain(want.get(k)) for k in _MATCH)


def _plain(v: Any) -> Any:
    import numpy as np

    if isinstance(v, np.ndarray) and v.size == 1:
        v = v.reshape(-1)[0]
    if isinstance(v, np.generic):
        v = v.item()
    return v


def _outputs(sdata: Any, before: dict, key_added: str) -> tuple[dict, dict]:
    """Return what predict added or wrote into: new tables and shapes, predicted tables and their regions."""
    from ..section.spatialdata import table_region
    from ..write.store import element_state

    now = element_state(sdata)
    tables, regions = {}, {}
    for (kind, name), (el, fields, _) in now.items():
        old = before.get((kind, name))
        if kind == "tables":
            new = (old is None or old[0] is not el
                   or old[1]["uns"].get(key_added) is not fields["uns"].get(key_added))
            if new and key_added in el.uns:
                tables[name] = el
        elif kind == "shapes" and (old is None or old[0] is not el):
            regions[name] = ("shapes", el)
    for t in tables.values():
        for r in table_region(t)[0]:
            for kind in ("shapes", "labels", "points"):
                if r in getattr(sdata, kind):
                    regions[r] = (kind, getattr(sdata, kind)[r])
    return tables, regions


def _stored(record: dict) -> dict:
    """Return the record as written: unset settings left out (h5ad holds no ``None``; absent reads as it)."""
    return {k: v for k, v in record.items() if v is not None}


def _write_zarr(tables: dict, regions: dict, target: Path, record: dict, source: Path) -> None:
    from spatialdata import SpatialData

    from ..write.store import write_new_store

    parts: dict[str, dict] = {"shapes": {}, "labels": {}, "points": {}}
    for name, (kind, el) in regions.items():
        parts[kind][name] = el
    out = SpatialData(tables=tables, **parts)
    out.attrs = {RECORD: _stored(record)}
    write_new_store(out, target, source=source)


def _write_h5ad(table: Any, target: Path, record: dict) -> None:
    import anndata as ad

    from .._atomic import write_file

    adata = ad.AnnData(X=table.X, obs=table.obs, var=table.var, uns=dict(table.uns), obsm=dict(table.obsm),
                       layers=dict(table.layers), varm=dict(table.varm), obsp=dict(table.obsp),
                       varp=dict(table.varp))
    adata.uns[RECORD] = _stored(record)
    write_file(target, lambda tmp: adata.write_h5ad(tmp))


# ------------------------------------------------------------------------------------------ the run
def _rank_device(device: str | None, world: int) -> str | None:
    """Return this process's device: under torchrun, CUDA without an index is ``cuda:LOCAL_RANK``."""
    if world <= 1:
        return device
    from ..train.loop import resolve_device

    dev = resolve_device(device or settings.device)
    if dev.type == "cuda" and dev.index is None:  # more processes than GPUs: they take turns on them
        import torch

        from ..train.distributed import launch_ranks

        dev = torch.device("cuda", launch_ranks()[2] % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    return str(dev)


def _gather(rows: list[dict], world: int) -> list[dict]:
    """Every process's rows, once all have finished (gloo over torchrun's rendezvous; a no-op alone)."""
    if world <= 1:
        return rows
    from datetime import timedelta

    import torch.distributed as dist

    made = not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", timeout=timedelta(days=_WAIT_DAYS))
    try:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, rows)
    finally:
        if made:
            dist.destroy_process_group()
    return [r for p in parts for r in p]


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def predict_slides(
    model: Any,
    paths: Any,
    out: str | os.PathLike,
    *,
    format: str = "zarr",  # noqa: A002  (the command line's --format)
    mpp: float | Mapping[str, float] | None = None,
    key_added: str = Keys.PREFIX,
    device: str | None = None,
    overwrite: bool = False,
    tile_px: float | None = None,
    bin_size: int | None = None,
    adapt: bool = False,
) -> Any:
    """Predict every slide of a cohort into a folder, one output per slide, resumable.

    Each slide is opened lazily (slide files with :func:`stranker.io.read_slide`, stores with
    ``spatialdata.read_zarr``), predicted with :func:`stranker.tl.predict` (an image-only slide is tiled
    over its tissue) and written to ``out/<slide>.zarr`` or ``out/<slide>.h5ad``. Each output is built
    beside its path and renamed into place: it is whole or absent, also when the run is killed.

    A rerun skips the slides whose output is whole and was made by this model (the same
    ``model_sha256``, a checksum of its weights, genes and configuration) from the same file with the
    same settings, and predicts the others again: those without an output, those whose output another
    model or other settings made, and those a killed run left half-written (its temporary folder is
    removed). Nothing that stranker did not write is ever
    replaced or deleted: a slide whose output path holds a file or folder of yours fails, and that
    path is left as it is. A slide that cannot be read or predicted (corrupt, truncated, no resolution)
    is reported in one line (its path and the reason) and skipped; the run carries on.

    Under ``torchrun`` (``stranker predict --nproc N``) each process predicts its share of the slides:
    largest first to the least loaded process (greedy longest-processing-time on their size on disk),
    the same assignment in every process, each on its own GPU (``cuda:LOCAL_RANK``) when CUDA is used. The
    processes share nothing but ``out``; they wait for each other at the end to report all failures.

    Parameters
    ----------
    model
        A fitted :class:`stranker.Model`, or the folder it was saved to.
    paths
        Slide files (SVS, NDPI, MRXS, SCN via OpenSlide; TIFF, OME-TIFF via tifffile), SpatialData
        ``.zarr`` stores, folders of them, or a text file (``.txt``) listing them one per line; mixed.
        Each slide is named after its file stem (``a.ome.tiff``: ``a``); two slides of the same name are
        refused, listed, before any work.
    out
        Folder of the outputs (created when absent).
    format
        ``'zarr'``: a SpatialData store per slide holding what was predicted (for an image-only slide the
        tiles, circles ``'{key_added}_tiles'``, and their table ``'{key_added}_table'``; for a store with
        spots, its table and the spots it annotates), not the image, which stays in the input.
        ``'h5ad'``: the predicted table alone, as AnnData.
    mpp
        Microns per pixel of the slides' full resolution, overriding what each records: one number for
        all, or a dict by slide name. A slide file that records no resolution is refused without it.
    key_added
        Prefix of the written keys (as for :func:`stranker.tl.predict`).
    device
        Torch device; default ``sr.settings.device``.
    overwrite
        Predict again the slides whose output this model already made (still only outputs stranker
        wrote are replaced).
    tile_px, bin_size, adapt
        As for :func:`stranker.tl.predict`.

    Returns
    -------
    A :class:`pandas.DataFrame` indexed by slide name with ``source`` (the input), ``output``, ``status``
    (``'written'``, ``'skipped'``: already there, or ``'failed'``), ``reason`` (why it failed, or why
    an earlier output was replaced), ``n_obs`` (spots or tiles predicted) and ``rank`` (the process
    that handled it). Every output records in its root attributes (``.zarr``) or ``uns`` (``.h5ad``),
    under ``'stranker_slide'``: the slide, its ``source`` path, ``model_sha256``, ``key_added``, the
    settings above, ``n_obs`` and its own ``path``; the predicted table holds what
    :func:`stranker.tl.predict` writes, with the reliability columns, intervals and shift record of a
    model that has them.

    Raises
    ------
    SlideFailures
        A :class:`RuntimeError`, after every other slide was written, when some slides failed; its
        message lists them (path: reason) and its ``summary`` is the table above.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from .. import __version__
    from .._atomic import check_writable, remove_stale
    from ..write.keys import check_name
    from ..write.store import check_replaceable, element_state
    from ._predict import as_model, predict

    if format not in FORMATS:
        raise InputError(f"`format` must be 'zarr' or 'h5ad', got {format!r}.")
    check_name(key_added, "`key_added`")
    items = slide_inputs(paths)
    mpps = {s.name: mpp_of(mpp, s.name) for s in items}  # refused before any work
    if isinstance(mpp, Mapping):
        unknown = sorted(set(mpp) - set(mpps))
        if unknown:
            raise InputError(f"`mpp` names slides that are not among the inputs: {unknown[:10]}; the slides "
                             f"are named after their file stems, e.g. {list(mpps)[:3]}.")
    out = Path(os.path.expanduser(out))
    if out.exists() and not out.is_dir():
        raise InputError(f"`out` {out} is a file: pass a folder to write one output per slide into.")
    for s in items:
        target = Path(os.path.realpath(out / f"{s.name}.{format}"))
        real = Path(os.path.realpath(s.path))
        if target == real or Path(os.path.realpath(out)).is_relative_to(real):
            raise InputError(f"The output of {s.path} would be written over or inside it "
                             f"({out / f'{s.name}.{format}'}): choose another `out` folder.")
    check_writable(out, f"`out` {out}")
    model = as_model(model)
    sha = model_sha256(model)
    from ..train.distributed import launch_ranks

    world, rank, local_rank = launch_ranks()
    owner = assign_slides([_size(s.path) for s in items], world) if world > 1 else [0] * len(items)
    mine = [s for s, r in zip(items, owner, strict=True) if r == rank]
    device = _rank_device(device, world)
    out.mkdir(parents=True, exist_ok=True)
    if world > 1:
        logger.info(f"Process {rank} of {world}: {len(mine)} of {len(items)} slides, on "
                    f"{device or settings.device}.")

    rows = []
    desc = "predict slides" if world == 1 else f"predict slides [{rank}/{world}]"
    for item in tqdm(mine, desc=desc, unit="slide", disable=not settings.show_progress(),
                     position=local_rank if world > 1 else None):
        target = out / f"{item.name}.{format}"
        row = {"slide": item.name, "source": str(item.path), "output": str(target), "status": "failed",
               "reason": "", "n_obs": None, "rank": rank}
        record = {"by": "sr.tl.predict_slides", "version": __version__, "slide": item.name,
                  "source": _abs(item.path), "model_sha256": sha, "key_added": key_added, "format": format,
                  "mpp": mpps[item.name], "tile_px": tile_px, "bin_size": bin_size, "adapt": bool(adapt),
                  "path": _abs(target)}
        t0 = time.perf_counter()
        try:
            for tag in ("writing", "replaced"):
                remove_stale(target, tag)
            state, found = existing_output(target)
            if state == "foreign":
                raise FileExistsError(f"{target} exists and {found}: it is left as it is. Move it away, or "
                                      "predict into another folder.")
            if state == "ours":
                if target.suffix == ".zarr":
                    check_replaceable(target)  # ours, but holding something of the user's: not replaced
                if _matches(found, record) and not overwrite:
                    row.update(status="skipped", n_obs=found.get("n_obs"),
                               reason="already predicted by this model")
                    logger.info(f"{item.name}: {target} already holds this model's predictions; skipped.")
                    rows.append(row)
                    continue
                row["reason"] = _why_redone(found, record)
            sdata = read_input(item, mpps[item.name])
            before = element_state(sdata)
            predict(model, sdata, key_added=key_added, device=device, tile_px=tile_px, bin_size=bin_size,
                    adapt=adapt, microns_per_pixel=mpps[item.name] if item.kind == "zarr" else None)
            tables, regions = _outputs(sdata, before, key_added)
            if len(tables) != 1:
                raise RuntimeError(f"predict wrote {len(tables)} tables of {item.path}; one was expected.")
            table = next(iter(tables.values()))
            record["n_obs"] = int(table.n_obs)
            if format == "zarr":
                _write_zarr(tables, regions, target, record, item.path)
            else:
                _write_h5ad(table, target, record)
            del sdata, tables, regions, table
            row.update(status="written", n_obs=record["n_obs"])
            logger.info(f"{item.name}: {record['n_obs']} spots or tiles predicted, written to {target} "
                        f"({time.perf_counter() - t0:.1f} s).")
        except Exception as err:  # one slide's failure is reported, the run carries on
            row["reason"] = _one_line(err)
            if (isinstance(err, InputError) and mpps[item.name] is None and _MPP_HINT not in str(err)
                    and ("mpp=" in str(err) or "microns_per_pixel=" in str(err))):
                row["reason"] += _MPP_HINT  # a store that records no scale: say how to give it here
            logger.error(f"{item.path}: {row['reason']}")
        rows.append(row)

    rows = _gather(rows, world)
    order = {s.name: i for i, s in enumerate(items)}
    summary = pd.DataFrame(sorted(rows, key=lambda r: order[r["slide"]]),
                           columns=["slide", "source", "output", "status", "reason", "n_obs", "rank"])
    summary = summary.set_index("slide")
    counts = summary["status"].value_counts()
    logger.info(f"{counts.get('written', 0)} slide(s) written, {counts.get('skipped', 0)} already there, "
                f"{counts.get('failed', 0)} failed, in {out}.")
    failed = summary[summary["status"] == "failed"]
    if len(failed):
        lines = "\n".join(f"  {r.source}: {r.reason}" for r in failed.itertuples())
        raise SlideFailures(
            f"{len(failed)} of {len(summary)} slide(s) failed; the others are in {out} (a rerun predicts "
            f"only what is missing):\n{lines}", summary)
    return summary


def _why_redone(found: Any, want: dict) -> str:
    if not isinstance(found, dict):
        return "replaced an output of another stranker command"
    if "partial" in found:
        return f"replaced a partial output (missing {found['partial'][:3]})"
    differs = [k for k in _MATCH if _plain(found.get(k)) != _plain(want.get(k))]
    if not differs:
        return "replaced (overwrite)"
    what = "another model" if "model_sha256" in differs else f"other settings ({', '.join(differs)})"
    logger.warning(f"{want['path']} was predicted by {what}: predicting it again, replacing it.")
    return f"replaced an output of {what}"

