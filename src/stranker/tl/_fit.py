"""sr.tl.fit: train the ranking-aligned image-gene model on one or more sections."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._constants import Keys
from .._docs import doc_params
from .._key_added import check_key_added
from .._settings import logger, settings
from .._spots import InputError, Spots, as_spots
from .._undo import unchanged_on_failure
from .._write import write_outputs
from ..pp._genes import choose, log_expression, resolve_genes
from ..pp._patches import PatchGeometry, PatchReader, check_inside


def backbone_defaults(cfg: Any, options: dict[str, Any], mpps: list[float | None]) -> Any:
    """Apply a named backbone's input size and physical patch size, where the user did not choose them."""
    from dataclasses import replace

    from ..model.backbones import named

    spec = named(cfg.backbone)
    if spec is None:
        return cfg
    changes: dict[str, Any] = {}
    if "image_size" not in options:
        changes["image_size"] = spec.input_px
    if "patch_px" not in options and "patch_um" not in options and spec.patch_um is not None:
        if all(m is not None for m in mpps):
            changes["patch_um"] = spec.patch_um
        else:
            logger.warning(
                f"{spec.name!r} was trained on {spec.input_px} px patches at {spec.mpp} µm/px, but a section "
                f"has no known µm/px: its patches are {cfg.patch_px:g} px wide. Set "
                "`table.uns['microns_per_pixel']` or pass `patch_px=` / `patch_um=`."
            )
    size = changes.get("image_size", cfg.image_size)
    if size != spec.input_px and spec.arch.startswith("vit") and not spec.kwargs.get("dynamic_img_size"):
        raise InputError(f"{spec.name!r} takes {spec.input_px} px images only; got `image_size={size}`.")
    return replace(cfg, **changes)


def section_positions(centers: np.ndarray) -> np.ndarray:
    """Spot centres scaled into [0, 1] within their section (aspect kept)."""
    if len(centers) == 0:
        return np.zeros((0, 2), dtype=np.float32)
    lo = centers.min(0)
    span = float((centers.max(0) - lo).max()) or 1.0
    return ((centers - lo) / span).astype(np.float32)


def targets(secs: list[Spots], genes: list[str], layer: str | None, target_sum: float) -> list[np.ndarray]:
    """Log-normalised expression (``target_sum`` per spot over all genes, log1p) of ``genes``.

    Only the columns of ``genes`` are densified; library sizes are summed on the (sparse) table.
    """
    return [log_expression(sp, genes, layer, target_sum) for sp in secs]


def standardise(y_secs: list[np.ndarray], scale: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All training targets and the per-gene ``mean`` and ``std`` the model learns ``(y - mean) / std`` in.

    ``scale='pooled'``: mean and sd over all spots. ``'section'``: each section's targets are first
    centred and scaled to its own mean and sd, then put on the mean over sections of those: the model
    learns the differences between spots within a section, not the differences in level between
    sections (depth, batch, patient), which an image cannot tell.
    """
    if scale == "section":
        mus = np.stack([ys.mean(0) for ys in y_secs])
        sds = np.stack([ys.std(0) for ys in y_secs])
        mean, std = mus.mean(0), np.sqrt((sds**2).mean(0))
        std[std < 1e-6] = 1.0
        sds[sds < 1e-6] = 1.0
        y = np.concatenate([(ys - m) / s * std + mean for ys, m, s in zip(y_secs, mus, sds, strict=True)])
        return y.astype(np.float32), mean, std
    y = np.concatenate(y_secs)
    mean, std = y.mean(0), y.std(0)
    std[std < 1e-6] = 1.0
    return y, mean, std


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
@doc_params()
def fit(
    data: Any,
    *,
    genes: Sequence[str] | str | None = None,
    layer: str | None = None,
    target_sum: float = 1e4,
    method: str = "stranker",
    backbone: str | None = None,
    weights: str | None = None,
    pretrained: bool = True,
    freeze: bool | str | None = None,
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
    library_key: str | None = None,
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
        A named foundation model (``'uni'``, ``'uni2-h'``, ``'h-optimus-0'``, ``'virchow2'``, ...; see
        :func:`stranker.tl.backbones`), ``'hf-hub:ORG/NAME'`` or any timm model name (default
        ``'resnet18'``). A named model also sets the defaults of ``image_size`` and of the patch's
        physical size (``patch_um``, e.g. 224 px at 0.5 µm/px) to those it was trained at.
        ``'test_resnet'`` is a tiny network for trying things in seconds on a CPU (with
        ``pretrained=False``; its predictions mean nothing).
    weights
        Local state dict of the backbone (``.safetensors``, ``.pth``). Without it the pretrained weights
        come from the Hugging Face cache, else are downloaded (``sr.settings.allow_download``, not under
        ``HF_HUB_OFFLINE``); if they cannot be had, an error says how to get them.
    pretrained
        ``False`` trains from random initialisation (a warning says so); the only way to get it.
    freeze
        ``True`` trains the heads on a frozen backbone, ``False`` fine-tunes it, ``'last:N'`` its last N
        blocks; default: frozen for the foundation models of the registry, fine-tuned otherwise.
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
    {doc_elements}
    {doc_library_key}
    {doc_bin_size}
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
                      image_features=image_features, pretrained=pretrained, freeze=freeze, **options)
    checkpoint.check_arguments(checkpoint_dir, checkpoint_every, resume)  # before reading any data
    if image_features is None:  # an unknown backbone or missing weights fail before any work
        from ..model.backbones import find_weights, resolve

        spec = resolve(cfg.backbone, settings.allow_download)
        find_weights(spec, cfg.weights, cfg.pretrained, settings.allow_download)
    dev = distributed.setup(resolve_device(device or settings.device))
    secs = as_spots(data, image_key=image_key, shapes_key=shapes_key, table_key=table_key,
                    library_id=library_id, library_key=library_key, bin_size=bin_size,
                    need_image=image_features is None)
    if image_features is None:
        cfg = backbone_defaults(cfg, options, [sp.microns_per_pixel for sp in secs])
    # how wide the patches are, on these sections and on any other the model reads later
    geometry = (
        PatchGeometry.of(secs, cfg.patch_px, cfg.patch_um, cfg.image_size) if image_features is None else None
    )
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
    if aggregate and geometry is not None:  # removed again if the fit fails (@unchanged_on_failure)
        secs, _ = bins_to_patches(secs, geometry)
    for sp in secs:
        if sp.n_spots < 2:
            raise InputError(
                f"Section {sp.name!r} has {sp.n_spots} spot(s); training needs spots with expression."
            )
    gene_list = choose_genes(secs, genes, layer, n_top_genes)
    y_secs = targets(secs, gene_list, layer, target_sum)
    y, mean, std = standardise(y_secs, cfg.target_scale)

    # inputs: patches (uint8, in memory) or precomputed features
    feature_dim = None
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
    else:
        for sp in secs:
            check_inside(sp)
        readers = [PatchReader(sp, geometry.size_on(sp), cfg.scales, cfg.image_size) for sp in secs]
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
        aligner = Aligner(cfg, len(gene_list), feature_dim=feature_dim, download=settings.allow_download)
    record = secs[0].table.uns.get(image_features) if image_features is not None else None
    provenance = {  # where the features came from (sr.pp.embed_patches), as plain JSON values
        k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in record.items()
    } if isinstance(record, dict) else {}
    source = provenance.get("weights_source") if image_features is not None else aligner.weights_source
    if aligner.student.frozen:
        logger.info(f"The backbone {cfg.backbone!r} is frozen: stranker trains its heads on it "
                    "(freeze=False fine-tunes it, freeze='last:N' its last N blocks).")
    if source == "random":
        logger.warning(
            f"Training on a randomly initialised backbone ({provenance.get('backbone', cfg.backbone)!r}, "
            "asked with pretrained=False): expect much lower accuracy than with pretrained weights."
        )
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
        "n_spots": int(len(y)),
        **(geometry.to_meta() if geometry else {"patch_um": None, "patch_px": float(cfg.patch_px)}),
        "spot_diameter_px": float(np.median([sp.diameter for sp in secs])),
        "spot_diameter_um": float(np.median([sp.diameter * sp.microns_per_pixel for sp in secs]))
        if all(sp.microns_per_pixel is not None for sp in secs) else None,
        "weights_source": aligner.weights_source, "device": str(dev), "seed": seed,
        "feature_dim": feature_dim, "features": provenance or None,
        "torch": torch.__version__, "train_seconds": train_s, "streamed": tdata.streamed,
        "world_size": distributed.world_size(),
    }
    model = Model(aligner, cfg, gene_list, meta, bank)

    if distributed.rank() != 0:  # the other processes of a distributed fit hold the same model
        return model
    # in-sample outputs, computed for every section before anything is written, from the patches
    # (or features) already in memory; streamed patches are read again
    results = []
    ends = np.cumsum([sp.n_spots for sp in secs])
    for s, sp in enumerate(secs):
        held = None if images is None else images[ends[s] - sp.n_spots : ends[s]].numpy()
        if image_features is not None:
            results.append(model.infer(sp, device=str(dev), features=held))
        else:
            results.append(model.infer(sp, device=str(dev), patches=held))
    meta["fit_seconds"] = time.perf_counter() - t_start
    for sp, (emb, pred) in zip(secs, results, strict=True):
        write_outputs(sp, model, emb, pred, key_added, in_sample=True)
    return model


def bins_to_patches(
    secs: list[Spots], geometry: PatchGeometry
) -> tuple[list[Spots], list[tuple[Any, str, str]]]:
    """Visium HD sections -> their bins summed into pseudo-spots as wide as the patch the model reads.

    Returns the sections (others unchanged) and the (SpatialData, table, shapes) keys that were added.
    """
    import re

    from ..io._bins import aggregate

    out, added = [], []
    for sp in secs:
        m = re.fullmatch(r"square_(\d+)um", str(sp.keys.table_key or ""))
        if (m is None or sp.keys.kind != "spatialdata" or sp.microns_per_pixel is None
                or not {"array_row", "array_col"} <= set(sp.table.obs)):
            out.append(sp)
            continue
        bin_um = int(m.group(1))
        # the tissue width the patch shows on this section
        width_um = geometry.size_um or geometry.size_px * sp.microns_per_pixel
        k = int(round(width_um / bin_um))
        if k < 2:  # the bins are about as wide as the patch already
            out.append(sp)
            continue
        sdata, key = sp.source, f"square_{k * bin_um:03d}um"
        if key in sdata.tables:
            logger.info(f"Training on {key!r}, the {bin_um} µm bins already summed to the patch width.")
        else:
            key, skey = aggregate(sdata, sp, bin_um, k * bin_um)
            added.append((sdata, key, skey))
        out.append(as_spots(sdata, table_key=key, image_key=sp.keys.image_key, need_image=True)[0])
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
            light.spots = replace(r.spots, table=None, source=None, rows=np.zeros(0, dtype=np.int64))
            readers.append(light)
        return {**self.__dict__, "readers": readers}

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        s = int(self.section[rows[0]])
        if (self.section[rows] != s).any():
            raise ValueError("A batch of training patches must hold spots of one section.")
        return self.readers[s].read(rows - self.offsets[s])
