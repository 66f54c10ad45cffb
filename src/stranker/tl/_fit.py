"""sr.tl.fit: train the ranking-aligned image-gene model on one or more sections."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._constants import Keys
from .._key_added import check_key_added
from .._predictions import prediction_layer
from .._settings import logger, settings
from .._spots import InputError, Spots, as_spots
from .._undo import unchanged_on_failure
from .._write import write_results
from ..pp._genes import choose, lognorm, resolve_genes, section_counts
from ..pp._patches import PatchReader, check_inside, patch_size_px


def section_positions(centers: np.ndarray) -> np.ndarray:
    """Spot centres scaled into [0, 1] within their section (aspect kept)."""
    if len(centers) == 0:
        return np.zeros((0, 2), dtype=np.float32)
    lo = centers.min(0)
    span = float((centers.max(0) - lo).max()) or 1.0
    return ((centers - lo) / span).astype(np.float32)


def targets(secs: list[Spots], genes: list[str], layer: str | None, target_sum: float) -> list[np.ndarray]:
    """Log-normalised expression (``target_sum`` per spot over all genes, log1p) of ``genes``."""
    out = []
    for sp in secs:
        full = lognorm(section_counts(sp, layer), target_sum)
        out.append(full[:, sp.table.var_names.get_indexer(genes)])
    return out


def choose_genes(secs: list[Spots], genes: Any, layer: str | None, n_top_genes: int) -> list[str]:
    """Genes to model: an explicit list, ``var[Keys.SELECTED]`` when every table has it, else HVGs."""
    if genes is None:
        flags = [sp.table.var.get(Keys.SELECTED) for sp in secs]
        if all(f is not None for f in flags):
            chosen = [
                list(sp.table.var_names[np.asarray(f, dtype=bool)]) for sp, f in zip(secs, flags, strict=True)
            ]
            genes = [g for g in chosen[0] if all(g in set(c) for c in chosen[1:])]
            logger.info(f"Modelling the {len(genes)} genes marked in `var[{Keys.SELECTED!r}]`.")
        else:
            genes = "hvg"
    if isinstance(genes, str):
        if genes not in ("hvg", "heg"):
            raise InputError(f"`genes` must be a list of gene names, 'hvg', 'heg' or None, got {genes!r}.")
        return choose(secs, genes, n_top=n_top_genes, layer=layer)
    return resolve_genes(secs, list(genes), "raise")


@unchanged_on_failure()
def fit(
    data: Any,
    *,
    genes: Sequence[str] | str | None = None,
    layer: str | None = None,
    target_sum: float = 1e4,
    method: str = "stranker",
    backbone: str | None = None,
    weights: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    seed: int | None = None,
    image_features: str | None = None,
    n_top_genes: int = 1000,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    stream: bool | None = None,
    key_added: str = Keys.PREFIX,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    library_id: str | None = None,
    bin_size: int | None = None,
    aggregate: bool = True,
    **options: Any,
):
    """Train the ranking-aligned image-gene model and write its in-sample results.

    Parameters
    ----------
    data
        One section or a list (SpatialData with image, circle spots and table, or AnnData in
        squidpy layout). Raw counts in ``X`` or ``layers[layer]``.
    genes
        Genes to model: a list; ``'hvg'`` / ``'heg'`` (``n_top_genes`` chosen on these sections);
        ``None`` uses ``var['stranker_selected']`` from :func:`stranker.pp.select_genes` when every
        table has it, else ``'hvg'``.
    layer
        Layer of raw counts; ``None`` uses ``X``.
    target_sum
        The target is ``log1p(counts / total * target_sum)`` over all genes of the table (scanpy's).
    method
        ``'stranker'`` (default), or a published recipe: ``'bleep'``, ``'mclstexp'``, ``'rankbygene'``.
    backbone
        timm model name (default ``'resnet18'``).
    weights
        Local checkpoint of the backbone. Without it, timm's cached pretrained weights are used when
        present, else random initialisation (recorded in ``uns``).
    epochs, batch_size
        Training length and spots per batch (each batch holds spots of one section).
    device
        ``'auto'``, ``'cpu'``, ``'cuda'``; default ``sr.settings.device``.
    seed
        Random seed; the same seed on the same device gives the same model.
    image_features
        Train on precomputed per-spot features ``obsm[image_features]`` instead of pixels.
    n_top_genes
        Genes chosen when ``genes`` is ``'hvg'`` / ``'heg'``.
    checkpoint_dir, checkpoint_every, resume
        Save the full training state every ``checkpoint_every`` epochs; ``resume=True`` continues
        an interrupted fit from the last checkpoint to the same result (on any number of processes).
        A checkpoint of other data, genes or settings is refused, naming what differs
        (``resume=False`` starts afresh); one fit at a time may use a ``checkpoint_dir``.
    stream
        ``False`` reads every training patch into memory first; ``True`` streams them from the
        (lazy) images, batch by batch, in ``sr.settings.num_workers`` DataLoader workers;
        ``None`` (default) streams when the patches would exceed ``sr.settings.max_patch_memory``
        bytes. Both give the same model for the same seed.
    key_added
        Prefix of the written keys.
    image_key, shapes_key, table_key, library_id
        Which elements to use when an object has several.
    bin_size
        Visium HD: the bin size in µm (2, 8, 16) whose table and squares to use; the same as
        ``table_key='square_{bin_size:03d}um'``.
    aggregate
        Visium HD: sum the bins into square pseudo-spots as wide as the patch the model reads
        (:func:`stranker.io.aggregate_bins`; the table ``'square_{width:03d}um'`` and its squares are
        added, or reused when present), so that the target is the expression of the tissue the patch
        shows. ``False`` trains on every bin against the patch centred on it.
    **options
        Any field of :class:`stranker.model.Config` (``scales``, ``patch_px``, ``w_rank``, ``predict``, ...).

    Returns
    -------
    The fitted :class:`stranker.Model`. In each training table, after the whole fit succeeded:

    - ``obsm['X_{key_added}']``: teacher image embedding of every spot;
    - ``layers[key_added]``: predicted expression (target scale) for the modelled genes; other
      genes hold NaN;
    - ``uns[key_added]``: parameters, genes, per-epoch history of every loss term, timing, device,
      ``in_sample=True`` (these spots were seen in training).

    Under ``torchrun`` (``stranker fit --nproc N``) every process calls ``fit`` with the same
    arguments and trains on its share of each batch (see :mod:`stranker.train.distributed`); all
    return the same model, and only rank 0 computes and writes the in-sample results.
    """
    import torch

    from ..model import Aligner, make_config
    from ..train import TrainData, checkpoint, distributed, resolve_device, train
    from ..train.loop import kept_rng
    from ._model import Model

    t_start = time.perf_counter()
    seed = settings.seed if seed is None else int(seed)
    cfg = make_config(method, backbone=backbone, weights=weights, epochs=epochs, batch_size=batch_size,
                      image_features=image_features, **options)
    checkpoint.check_arguments(checkpoint_dir, checkpoint_every, resume)  # before reading any data
    dev = distributed.setup(resolve_device(device or settings.device))
    secs = as_spots(data, image_key=image_key, shapes_key=shapes_key, table_key=table_key,
                    library_id=library_id, bin_size=bin_size, need_image=image_features is None)
    check_key_added(secs, key_added)
    seen: dict[tuple[int, bytes], str] = {}
    for sp in secs:  # one section passed twice would count its spots twice
        key = (id(sp.table), np.asarray(sp.rows).tobytes())
        if key in seen:
            raise InputError(
                f"Sections {seen[key]!r} and {sp.name!r} are the same spots of the same table: "
                "pass each training section once."
            )
        seen[key] = sp.name
    added: list[tuple[Any, str, str]] = []
    if aggregate and image_features is None:
        secs, added = bins_to_patches(secs, cfg)
    try:
        for sp in secs:
            if sp.n_spots < 2:
                raise InputError(
                    f"Section {sp.name!r} has {sp.n_spots} spot(s); training needs spots with expression."
                )
        gene_list = choose_genes(secs, genes, layer, n_top_genes)
        y_secs = targets(secs, gene_list, layer, target_sum)
        y = np.concatenate(y_secs)
        mean, std = y.mean(0), y.std(0)
        std[std < 1e-6] = 1.0

        # inputs: patches (uint8, in memory) or precomputed features
        feature_dim = None
        mpps = [sp.microns_per_pixel for sp in secs]
        if image_features is not None:
            for sp in secs:
                if image_features not in sp.table.obsm:
                    raise InputError(
                        f"`obsm[{image_features!r}]` not found in the table of section {sp.name!r}."
                    )
            x = np.concatenate(
                [np.asarray(sp.table.obsm[image_features], dtype=np.float32)[sp.rows] for sp in secs]
            )
            if not np.isfinite(x).all():
                raise InputError(f"`obsm[{image_features!r}]` has NaN or infinite values.")
            feature_dim = x.shape[1]
            images = torch.from_numpy(x)
            patch_um = None
        else:
            for sp in secs:
                check_inside(sp)
            sizes = [patch_size_px(sp, None if cfg.patch_um else cfg.patch_px, cfg.patch_um) for sp in secs]
            patch_um = (
                (cfg.patch_um or (cfg.patch_px * mpps[0])) if all(m is not None for m in mpps) else None
            )
            if patch_um is not None and cfg.patch_um is None:
                sizes = [patch_um / m for m in mpps]  # same tissue width on every section
            readers = [
                PatchReader(sp, s, cfg.scales, cfg.image_size) for sp, s in zip(secs, sizes, strict=True)
            ]
            n_bytes = len(y) * len(cfg.scales) * cfg.image_size**2 * 3
            if stream is None:
                stream = n_bytes > settings.max_patch_memory
                if stream:
                    logger.info(f"Streaming the training patches ({n_bytes / 2**30:.1f} GiB > "
                                f"sr.settings.max_patch_memory) with {settings.num_workers} worker(s).")
            images = None if stream else torch.from_numpy(np.concatenate([r.read_all() for r in readers]))
        pos = np.concatenate([section_positions(sp.centers) for sp in secs])
        section = np.repeat(np.arange(len(secs)), [sp.n_spots for sp in secs])
        tdata = TrainData(
            images=images, expr=torch.from_numpy((y - mean) / std).float(), pos=torch.from_numpy(pos),
            section=torch.from_numpy(section),
            read=SectionPatches(readers, section) if images is None else None,
        )
        with kept_rng(dev):  # the caller's global random state is theirs again after the fit
            torch.manual_seed(seed)
            aligner = Aligner(cfg, len(gene_list), feature_dim=feature_dim)
        t_train = time.perf_counter()
        history = train(aligner, tdata, device=dev, seed=seed, checkpoint_dir=checkpoint_dir,
                        checkpoint_every=checkpoint_every, resume=resume, progress=settings.show_progress(),
                        identity={"genes": list(gene_list)}, num_workers=settings.num_workers)
        train_s = time.perf_counter() - t_train

        # reference bank: gene-branch embeddings of the training spots (each section read in context)
        with torch.no_grad():
            keys = []
            for s in range(len(secs)):
                m = torch.from_numpy(section == s)
                keys.append(aligner.gene(tdata.expr[m].to(dev), tdata.pos[m].to(dev)).float().cpu())
            bank = {"keys": torch.cat(keys).numpy(), "values": y.astype(np.float32)}
        meta = {
            "genes_source": genes if isinstance(genes, str) or genes is None else "list",
            "target": f"log1p(counts / total * {target_sum:g}) over all genes of the table",
            "target_sum": target_sum, "layer": layer, "target_mean": mean.astype(np.float32),
            "target_std": std.astype(np.float32), "history": history, "sections": [sp.name for sp in secs],
            "n_spots": int(len(y)), "patch_um": patch_um,
            "spot_diameter_px": float(np.median([sp.diameter for sp in secs])),
            "spot_diameter_um": float(np.median([sp.diameter * sp.microns_per_pixel for sp in secs]))
            if all(m is not None for m in mpps) else None, "patch_px": float(cfg.patch_px),
            "weights_source": aligner.weights_source, "device": str(dev), "seed": seed,
            "feature_dim": feature_dim,
            "torch": torch.__version__, "train_seconds": train_s, "streamed": tdata.streamed,
            "world_size": distributed.world_size(),
        }
        model = Model(aligner, cfg, gene_list, meta, bank)

        if distributed.rank() != 0:  # the other processes of a distributed fit hold the same model
            return model
        # in-sample outputs, computed for every section before anything is written
        results = []
        for s, sp in enumerate(secs):
            feats = images[torch.from_numpy(section == s)].numpy() if image_features is not None else None
            results.append(model.infer(sp, device=str(dev), features=feats))
        meta["fit_seconds"] = time.perf_counter() - t_start
        for sp, (emb, pred) in zip(secs, results, strict=True):
            write_outputs(sp, model, emb, pred, key_added, in_sample=True)
        return model
    except BaseException:
        for sdata, tkey, skey in added:  # a failed fit leaves the data as it was
            del sdata.tables[tkey], sdata.shapes[skey]
        raise


def bins_to_patches(secs: list[Spots], cfg: Any) -> tuple[list[Spots], list[tuple[Any, str, str]]]:
    """Visium HD sections -> their bins summed into pseudo-spots as wide as the patch the model reads.

    Returns the sections (others unchanged) and the (SpatialData, table, shapes) keys that were added.
    """
    import re

    from ..io._bins import aggregate

    out, added = [], []
    for sp in secs:
        m = re.fullmatch(r"square_(\d+)um", str(sp.keys.get("table_key") or ""))
        mpp = secs[0].microns_per_pixel
        if (m is None or sp.keys.get("kind") != "spatialdata" or mpp is None or sp.microns_per_pixel is None
                or not {"array_row", "array_col"} <= set(sp.table.obs)):
            out.append(sp)
            continue
        bin_um = int(m.group(1))
        k = int(round((cfg.patch_um or cfg.patch_px * mpp) / bin_um))
        if k < 2:  # the bins are about as wide as the patch already
            out.append(sp)
            continue
        sdata, key = sp.source, f"square_{k * bin_um:03d}um"
        if key in sdata.tables:
            logger.info(f"Training on {key!r}, the {bin_um} µm bins already summed to the patch width.")
        else:
            key, skey = aggregate(sdata, sp, bin_um, k * bin_um)
            added.append((sdata, key, skey))
        out.append(as_spots(sdata, table_key=key, image_key=sp.keys.get("image_key"), need_image=True)[0])
    return out, added


class SectionPatches:
    """Patches of training rows (positions over all sections, one section per call) through its reader."""

    def __init__(self, readers: list[PatchReader], section: np.ndarray) -> None:
        self.readers = readers
        self.section = section
        self.offsets = np.concatenate([[0], np.cumsum(np.bincount(section, minlength=len(readers)))])

    def __getstate__(self) -> dict[str, Any]:
        """For worker processes: the image handles and centres, not the tables or SpatialData objects."""
        import copy
        from dataclasses import replace

        readers = []
        for r in self.readers:
            light = copy.copy(r)
            light.spots = replace(r.spots, table=None, source=None, keys={}, rows=np.zeros(0, dtype=np.int64))
            readers.append(light)
        return {**self.__dict__, "readers": readers}

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        s = int(self.section[rows[0]])
        if (self.section[rows] != s).any():
            raise ValueError("A batch of training patches must hold spots of one section.")
        return self.readers[s].read(rows - self.offsets[s])


def write_outputs(
    sp: Spots, model: Any, emb: np.ndarray, pred: np.ndarray, key_added: str, *, in_sample: bool,
    x_is_prediction: bool = False,
) -> None:
    """Write embedding, predicted layer and run record of one section (the only writer of model outputs)."""
    full, layer_format = prediction_layer(sp, list(model.genes), pred)
    if layer_format == "sparse":
        logger.info(
            f"Writing `layers[{key_added!r}]` sparse ({len(model.genes)} modelled of {sp.table.n_vars} "
            f"genes; a dense layer would exceed sr.settings.max_dense_layer): "
            f"genes not modelled read as 0, not NaN."
        )
    params = {k: v for k, v in model.config.to_dict().items() if k != "extra"}
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
    record = {
        "params": {k: v for k, v in params.items() if v is not None},
        "genes": list(model.genes),
        "history": {
            k: [h.get(k, np.nan) for h in model.history]
            for k in (model.history[0] if model.history else {})
        },
        "target": model.meta["target"],
        "weights_source": model.meta["weights_source"],
        "device": model.meta["device"],
        "train_sections": model.meta["sections"],
        "fit_seconds": model.meta.get("fit_seconds"),
        "in_sample": in_sample,
        "layer_format": layer_format,
        "x_is_prediction": x_is_prediction,
    }
    write_results(sp, obsm={f"X_{key_added}": emb}, layers={key_added: full}, uns={key_added: record})
