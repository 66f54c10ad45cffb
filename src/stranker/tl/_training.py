"""The pieces :meth:`stranker.Model.train` is made of: sections, genes, targets, inputs, reference bank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._constants import Keys
from .._errors import InputError
from .._expression import log_expression
from .._settings import logger, settings
from ..pp._genes import choose, resolve_genes
from ..section import Section, as_sections
from ..section.patches import PatchGeometry, PatchReader, check_inside
from ..section.visium_hd import bins_to_patches
from ..spots import SpotInputs
from ..write import check_key_added

if TYPE_CHECKING:
    from ..train import TrainData


def backbone_defaults(cfg: Any, mpps: list[float | None]) -> Any:
    """Apply a named backbone's input size and physical patch size, where the user did not choose them.

    The configuration records the fields the user set (``cfg.chosen_fields()``: ``image_size``,
    ``patch_px``, ``patch_um``); the result keeps that record (the values set here are defaults). An
    ``image_size`` the backbone cannot take (a ViT of one input size) is refused, by the check
    :func:`stranker.pp.embed_patches` makes too.
    """
    from dataclasses import replace

    from ..model.backbones import input_size_problem, named, resolve

    spec = named(cfg.backbone)
    if spec is None:  # a timm name: no defaults, but a ViT of one input size refuses others
        problem = input_size_problem(resolve(cfg.backbone), cfg.image_size)
        if problem:
            raise InputError(problem)
        return cfg
    chosen = cfg.chosen_fields()
    changes: dict[str, Any] = {}
    if "image_size" not in chosen:
        changes["image_size"] = spec.input_px
    if "patch_px" not in chosen and "patch_um" not in chosen and spec.patch_um is not None:
        if all(m is not None for m in mpps):
            changes["patch_um"] = spec.patch_um
        else:
            logger.warning(
                f"{spec.name!r} was trained on {spec.input_px} px patches at {spec.mpp} µm/px, but a section "
                f"has no known µm/px: its patches are {cfg.patch_px:g} px wide. Set "
                "`table.uns['microns_per_pixel']` or pass `patch_px=` / `patch_um=`."
            )
    problem = input_size_problem(spec, changes.get("image_size", cfg.image_size))  # embed_patches' check too
    if problem:
        raise InputError(problem)
    return replace(cfg, **changes)


def training_sections(
    data: Any, cfg: Any, *, key_added: str | None, aggregate: bool, **keys: Any
) -> tuple[list[Section], Any, PatchGeometry | None]:
    """Return the checked training sections of ``data``, the configuration and the patch geometry.

    A named backbone's defaults apply to the fields the user did not set (``cfg.chosen_fields()``,
    whichever of ``sr.tl.fit`` and ``sr.Model(make_config(...))`` made ``cfg``); Visium HD bins are summed
    into pseudo-spots as wide as the patch when ``aggregate`` (the tables are added to the data,
    and removed again if training fails: :meth:`stranker.Model.train` is undone on failure).
    ``keys`` are those of :func:`stranker.section.as_sections`.
    """
    secs = as_sections(data, **keys, need_image=cfg.image_features is None)
    geometry = None
    if cfg.image_features is None:
        cfg = backbone_defaults(cfg, [sp.microns_per_pixel for sp in secs])
        # how wide the patches are, on these sections and on any other the model reads later
        geometry = PatchGeometry.of(secs, cfg.patch_px, cfg.patch_um, cfg.image_size)
    if key_added is not None:
        check_key_added(secs, key_added)
    check_distinct(secs)
    if aggregate and geometry is not None:
        secs, _ = bins_to_patches(secs, geometry)
    check_spots(secs)
    return secs, cfg, geometry


def unlabeled_patches(data: Any, cfg: Any, geometry: PatchGeometry | None) -> np.ndarray | None:
    """uint8 patches of every spot of the sections ``data`` (no expression read), for ``w_consistency``.

    ``None`` when ``data`` is ``None``. Refuses the combinations that would silently do nothing: a
    positive ``w_consistency`` without unlabelled sections and unlabelled sections without it, and
    precomputed features (the term reads pixels).
    """
    if data is None:
        if cfg.w_consistency > 0:
            raise InputError(
                f"`w_consistency={cfg.w_consistency:g}` trains the teacher-student consistency on "
                "unlabelled tissue, but no `unlabeled` sections were given: pass `unlabeled=` (e.g. the "
                "slides to predict) or `w_consistency=0`."
            )
        return None
    if not cfg.w_consistency > 0:
        raise InputError(
            "`unlabeled` sections were given but `w_consistency=0` would never read them: pass "
            "`w_consistency=` > 0 (10 is the value measured, docs/method.md) or leave out `unlabeled`."
        )
    if geometry is None:
        raise InputError("`unlabeled` needs pixels: it cannot be used with `image_features`.")
    secs = as_sections(data, need_table=False)
    n_bytes = sum(sp.n_spots for sp in secs) * len(cfg.scales) * cfg.image_size**2 * 3
    if n_bytes > settings.max_patch_memory:
        raise InputError(
            f"The unlabelled patches would take {n_bytes / 2**30:.1f} GiB, more than "
            "`sr.settings.max_patch_memory`: pass fewer `unlabeled` sections or raise that setting."
        )
    out = []
    for sp in secs:
        check_inside(sp)
        reader = PatchReader(sp, geometry.size_on(sp), cfg.scales, cfg.image_size)
        out.append(SpotInputs.streamed(reader).all())
    return np.concatenate(out)


def check_distinct(secs: list[Section]) -> None:
    """Refuse one section passed twice (its spots would count twice)."""
    seen: dict[tuple[int, bytes], str] = {}
    for sp in secs:
        key = (id(sp.table), np.asarray(sp.rows).tobytes())
        if key in seen:
            raise InputError(
                f"Sections {seen[key]!r} and {sp.name!r} are the same spots of the same table: "
                "pass each training section once."
            )
        seen[key] = sp.name


def check_spots(secs: list[Section]) -> None:
    """Refuse a section with fewer than two spots."""
    for sp in secs:
        if sp.n_spots < 2:
            raise InputError(
                f"Section {sp.name!r} has {sp.n_spots} spot(s); training needs spots with expression."
            )


def section_positions(centers: np.ndarray) -> np.ndarray:
    """Spot centres scaled into [0, 1] within their section (aspect kept)."""
    if len(centers) == 0:
        return np.zeros((0, 2), dtype=np.float32)
    lo = centers.min(0)
    span = float((centers.max(0) - lo).max()) or 1.0
    return ((centers - lo) / span).astype(np.float32)


def targets(secs: list[Section], genes: list[str], layer: str | None, target_sum: float) -> list[np.ndarray]:
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


def choose_genes(secs: list[Section], genes: Any, layer: str | None, n_top_genes: int) -> list[str]:
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


def feature_record(secs: list[Section], key: str | None) -> dict[str, Any]:
    """Return the record of features ``obsm[key]`` (:func:`stranker.pp.embed_patches`) as JSON values."""
    record = secs[0].table.uns.get(key) if key is not None else None
    if not isinstance(record, dict):
        return {}
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in record.items()}


def _features(secs: list[Section], key: str) -> np.ndarray:
    """Precomputed per-spot features ``obsm[key]`` of every section, checked."""
    for sp in secs:
        if key not in sp.table.obsm:
            raise InputError(f"`obsm[{key!r}]` not found in the table of section {sp.name!r}.")
    x = np.concatenate([np.asarray(sp.table.obsm[key], dtype=np.float32)[sp.rows] for sp in secs])
    if not np.isfinite(x).all():
        raise InputError(f"`obsm[{key!r}]` has NaN or infinite values.")
    return x


@dataclass
class TrainingInputs:
    """The training spots of every section, as the training loop takes them.

    Attributes
    ----------
    sections
        The training sections, in order.
    genes
        Modelled genes.
    values
        ``(n_spots, n_genes)`` targets (log scale) of all sections, one after another.
    mean, std
        Per-gene mean and standard deviation of ``values`` (the model learns standardised values).
    data
        What :func:`stranker.train.train` takes: patches (uint8, in memory, or streamed through
        ``readers``) or features, standardised targets, positions in the section, section ids.
    readers
        Each section's patch reader (``None`` for precomputed features).
    feature_dim
        Width of the precomputed features, else ``None``.
    """

    sections: list[Section]
    genes: list[str]
    values: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    data: TrainData
    readers: list[PatchReader] | None
    feature_dim: int | None

    @classmethod
    def of(
        cls, secs: list[Section], genes: list[str], cfg: Any, geometry: PatchGeometry | None, *,
        layer: str | None, target_sum: float, stream: bool | None,
    ) -> TrainingInputs:
        """Targets, patches (or ``cfg.image_features``), positions and section ids of ``secs``.

        ``stream=None`` streams the patches when they would exceed ``sr.settings.max_patch_memory``.
        """
        import torch

        from ..train import TrainData

        y, mean, std = standardise(targets(secs, genes, layer, target_sum), cfg.target_scale)
        feature_dim, readers = None, None
        if cfg.image_features is not None:
            x = _features(secs, cfg.image_features)
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
            images = None if stream else torch.from_numpy(
                np.concatenate([SpotInputs.streamed(r).all() for r in readers]))
        pos = np.concatenate([section_positions(sp.centers) for sp in secs])
        section = np.repeat(np.arange(len(secs)), [sp.n_spots for sp in secs])
        data = TrainData(
            images=images, expr=torch.from_numpy((y - mean) / std).float(), pos=torch.from_numpy(pos),
            section=torch.from_numpy(section),
            read=SectionPatches(readers, section) if images is None else None,
        )
        return cls(secs, list(genes), y, mean, std, data, readers, feature_dim)

    @property
    def n_spots(self) -> int:
        """Training spots over all sections."""
        return len(self.values)

    def subset(self, keep: list[int], cfg: Any) -> TrainingInputs:
        """Return the inputs of sections ``keep`` alone, targets standardised on them (a fold model's).

        Patches held in memory are shared, not copied; streamed patches are read through the same readers.
        """
        import torch

        from ..train import TrainData

        section = self.data.section.numpy()
        mask = np.isin(section, keep)
        remap = np.full(len(self.sections), -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        y, mean, std = standardise([self.values[section == s] for s in keep], cfg.target_scale)
        new_section = remap[section[mask]]
        rows = torch.from_numpy(np.flatnonzero(mask))
        readers = None if self.readers is None else [self.readers[s] for s in keep]
        data = TrainData(
            images=None if self.data.images is None else self.data.images[rows],
            expr=torch.from_numpy((y - mean) / std).float(), pos=self.data.pos[rows],
            section=torch.from_numpy(new_section),
            read=SectionPatches(readers, new_section) if self.data.images is None else None,
        )
        return TrainingInputs([self.sections[s] for s in keep], self.genes, y, mean, std, data, readers,
                              self.feature_dim)

    def held(self, s: int) -> np.ndarray | None:
        """Patches (or features) of section ``s`` already in memory, else ``None`` (streamed)."""
        if self.data.images is None:
            return None
        ends = np.cumsum([sp.n_spots for sp in self.sections])
        return self.data.images[ends[s] - self.sections[s].n_spots : ends[s]].numpy()


def reference_bank(aligner: Any, inputs: TrainingInputs, device: Any) -> dict[str, np.ndarray]:
    """Return what retrieval looks up: the training spots' gene-branch embeddings and targets.

    ``keys`` are the gene-branch embeddings (each section read in context), ``values`` the targets
    (log scale).
    """
    import torch

    data = inputs.data
    with torch.no_grad():
        keys = []
        for s in range(len(inputs.sections)):
            m = data.section == s
            keys.append(aligner.gene(data.expr[m].to(device), data.pos[m].to(device)).float().cpu())
    return {"keys": torch.cat(keys).numpy(), "values": inputs.values.astype(np.float32)}


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
