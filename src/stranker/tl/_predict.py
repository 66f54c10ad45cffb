"""sr.tl.predict: embeddings and expression on any section, with or without spots."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._constants import Keys
from .._docs import doc_params
from .._errors import InputError
from .._settings import logger
from ..section import Section, as_sections
from ..section.patches import _TILE, check_inside
from ..spots import check_workers
from ..write import (
    check_free,
    check_key_added,
    genes_in_table,
    maybe_copy,
    unchanged_on_failure,
    write_predictions,
    written_by_stranker,
)

_DETECT_PX = 1 << 22  # tissue detection reads at most about this many pixels (a 2048 x 2048 level)


def _detection_level(sp: Section, spacing: float) -> tuple[int, int]:
    """Level and stride for tissue detection: a tile spans at least 8 pixels, at most ~4 Mpx are read."""
    img = sp.image
    fine_enough = [i for i, s in enumerate(img.scales) if s <= spacing / 8] or [int(np.argmin(img.scales))]
    level = max(fine_enough, key=lambda i: img.scales[i])
    n_px = int(img.levels[level].shape[1]) * int(img.levels[level].shape[2])
    return level, max(int(np.ceil(np.sqrt(n_px / _DETECT_PX))), 1)


def tissue_grid(sp: Section, spacing: float, min_tissue: float = 0.5) -> np.ndarray:
    """Centres (level-0 px) of a square grid of ``spacing``-wide tiles that lie on tissue.

    Tissue is told from background by Otsu's threshold on colour saturation (H&E stains are
    saturated, glass is not), kept within [0.05, 0.15] so that a field that is all tissue is not
    split into two kinds of tissue, on the coarsest pyramid level where a tile still spans 8 pixels,
    subsampled to a few million pixels at most, so the cost does not grow with the slide's full
    resolution. A tile is kept when at least ``min_tissue`` of it is tissue.
    """
    from scipy.ndimage import uniform_filter
    from skimage.filters import threshold_otsu

    img = sp.image
    level, stride = _detection_level(sp, spacing)
    arr = img.levels[level][:, ::stride, ::stride]
    s = img.scales[level] * stride
    _, h, w = arr.shape
    rgb = img.to_rgb(arr)
    mx, mn = rgb.max(-1), rgb.min(-1)
    del rgb
    # HSV saturation in float32, computed in place (no float temporaries: ~10 bytes per pixel read)
    sat = np.subtract(mx, mn, dtype=np.float32)
    np.divide(sat, np.maximum(mx, 1), out=sat)
    del mx, mn
    thr = threshold_otsu(sat) if np.ptp(sat) > 0 else 1.0
    mask = (sat > min(max(thr, 0.05), 0.15)).astype(np.float32)
    del sat
    side = max(int(round(spacing / s)), 1)
    frac = uniform_filter(mask, size=side, mode="constant")
    h0, w0 = img.shape
    xs = np.arange(spacing / 2, w0, spacing)
    ys = np.arange(spacing / 2, h0, spacing)
    iy = np.clip((ys / s).astype(int), 0, h - 1)
    ix = np.clip((xs / s).astype(int), 0, w - 1)
    # only the tiles on tissue are ever listed (the full grid is a boolean image, not a list of centres)
    row, col = np.nonzero(frac[np.ix_(iy, ix)] >= min_tissue)
    return np.column_stack([xs[col], ys[row]])


def model_mpp(model: Any) -> float | None:
    """Microns per (level-0) pixel of the sections the model was trained on, when known."""
    meta = model.meta
    if meta.microns_per_pixel:
        return float(meta.microns_per_pixel)
    if meta.patch_um and model.config.patch_um is None and meta.patch_px:
        return float(meta.patch_um) / float(meta.patch_px)  # patches were patch_px wide on section 1
    if meta.spot_diameter_um and meta.spot_diameter_px:
        return float(meta.spot_diameter_um) / float(meta.spot_diameter_px)
    return None


def check_scale(sp: Section, model: Any, tile_px: float | None) -> None:
    """Refuse or warn when only one of model and section knows its µm/px (the other would be guessed).

    Tiling an image-only section needs a tile size in its pixels: without both resolutions (or
    ``tile_px``) it is refused. Spots are read at the model's patch size in pixels, with a warning.
    """
    if model.config.image_features is not None:
        return
    train, slide = model_mpp(model), sp.microns_per_pixel
    if (train is None) == (slide is None):
        return
    if train is None:
        what = (f"the model does not know its physical scale (its training data recorded no µm/px) while "
                f"section {sp.name!r} is at {slide:.4g} µm/px")
        fix = "refit on data that records its resolution (`uns['microns_per_pixel']`)"
    else:
        what = (f"the model was trained at {train:.4g} µm/px while section {sp.name!r} does not record its "
                "resolution")
        fix = ("pass `microns_per_pixel=` (or `spot_diameter_um=`, e.g. 100 for legacy ST), or record it "
               "(`table.uns['microns_per_pixel']`, `sdata.attrs['microns_per_pixel']`, "
               "`sr.io.read_slide(..., mpp=)`)")
    if sp.n_spots == 0 and tile_px is None:
        raise InputError(
            f"Cannot size the tiles: {what}. Pass `tile_px=` (the training spot size in this image's "
            f"pixels), or {fix}."
        )
    patch = model.meta.patch_px or model.config.patch_px
    sp.warned.add("unknown_resolution")  # this warning says it: the patch reader does not say it again
    logger.warning(f"{what[0].upper()}{what[1:]}: patches are read {float(patch):.0f} px wide as if both had "
                   f"the same resolution. To be sure, {fix}.")


def resampling(sp: Section, model: Any) -> dict[str, Any]:
    """How the patches of a section are read for ``model``: pyramid level and scale factor (for ``uns``)."""
    reader = model.patch_reader(sp)
    side0 = reader.size * max(reader.scales)
    level = sp.image.level_for(side0 / reader.out_px)
    train = model_mpp(model)
    slide = sp.microns_per_pixel
    return {
        "slide_microns_per_pixel": slide,
        "model_microns_per_pixel": train,
        # slide pixels per training pixel: 2.0 means the slide is sampled twice as finely as the training data
        "factor": float(train / slide) if train and slide else None,
        "patch_px": float(reader.size),
        "level": int(level),
        "level_scale": float(sp.image.scales[level]),
        **_branch(sp, model),
    }


def _branch(sp: Section, model: Any) -> dict[str, Any]:
    """Which image branch of a model with a sharp finish reads ``sp`` (``Aligner.branch_for``)."""
    al = model.aligner
    if getattr(al, "coarse", None) is None:
        return {}
    coarser = model.coarser(sp)
    return {"coarser": float(coarser), "branch": "coarse" if al.branch_for(coarser) is al.coarse else "sharp"}


def check_detail(sp: Section, model: Any, info: dict[str, Any]) -> float:
    """Warn when a section's patches are upsampled beyond the coarsest the model was trained on.

    Returns the upsampling: the backbone's input side over the section's pixels per patch side.
    """
    c = model.config
    up = c.image_size / info["patch_px"]  # full-resolution pixels per patch side
    trained = max(1.0, c.image_size / model.geometry.size_px) * max(1.0, float(c.resolution_jitter))
    if up > trained * 1.1:
        logger.warning(
            f"Section {sp.name!r} has {info['patch_px']:.0f} px per patch for the model's "
            f"{model.config.image_size} px input: upsampled {up:.2g}x, coarser than any patch the model was "
            f"trained on (resolution_jitter={model.config.resolution_jitter:g}). Expect lower accuracy; a "
            f"model fitted with resolution_jitter >= {up:.2g} reads it as it reads its training slides."
        )
    return up


def tile_section(
    sp: Section, model: Any, tile_px: float | None, log: Any = logger.info
) -> tuple[Section, float]:
    """Lay tiles of the training spot size over the tissue of an image-only section.

    Parameters
    ----------
    sp
        A section with an image and no spots.
    model
        The fitted model: its spot size (in µm when model and section both know their scale) sizes the tiles.
    tile_px
        Tile side in pixels of the section's image, overriding the model's spot size.
    log
        Where the one line about the tiles goes.

    Returns
    -------
    The section with one spot per tile (no table; ``keys`` of ``sp``), and the tile side in pixels.
    """
    if tile_px is None:
        d_px, train, mpp = model.meta.spot_diameter_px, model_mpp(model), sp.microns_per_pixel
        d_um = model.meta.spot_diameter_um or (d_px * train if d_px and train else None)
        tile_px = d_um / mpp if d_um and mpp else d_px  # pixels only when neither knows (check_scale)
    if not tile_px or not np.isfinite(tile_px) or tile_px <= 0:
        raise InputError("Cannot tell the tile size for this slide: pass `tile_px=` (pixels of its image).")
    centres = tissue_grid(sp, float(tile_px))
    if len(centres) == 0:
        raise InputError(
            f"No tissue found on the image of section {sp.name!r}; pass spots or check the image."
        )
    # order tiles block by block (the blocks the patch reader reads at once), so that consecutive
    # batches read neighbouring windows of the file instead of sweeping whole rows of the slide
    probe = Section(name=sp.name, image=sp.image, centers=centres[:1], diameter=float(tile_px), table=None,
                  rows=np.arange(1), microns_per_pixel=sp.microns_per_pixel)
    block = _TILE * resampling(probe, model)["level_scale"]
    by, bx = (centres[:, 1] // block).astype(np.int64), (centres[:, 0] // block).astype(np.int64)
    centres = centres[np.lexsort((centres[:, 0], centres[:, 1], bx, by))]
    log(f"Laid {len(centres)} tiles of {tile_px:.0f} px over the tissue of {sp.name!r}.")
    tiled = Section(name=sp.name, image=sp.image, centers=centres, diameter=float(tile_px), table=None,
                  rows=np.arange(len(centres)), microns_per_pixel=sp.microns_per_pixel, source=sp.source,
                  keys=sp.keys)
    return tiled, float(tile_px)


def spots_or_tiles(
    sp: Section, model: Any, tile_px: float | None, *, retile: bool = False, log: Any = logger.info,
    label: str | None = None,
) -> tuple[Section, str, float]:
    """Return what ``model`` reads of a section: its spots, or tiles laid over an image-only slide.

    The one preparation of a section for inference (``predict``, ``embed_slides``): its scale checked
    against the model's (:func:`check_scale`), then its spots checked to lie on the image, or tiles laid
    (:func:`tile_section`) when it has no spots or ``retile`` (they are the tiles of an earlier call).

    ``label`` names the section in messages (default ``Section '<name>'``).

    Returns
    -------
    The section to read, ``'spots'`` or ``'tiles'``, and the spot (tile) side in its pixels.
    """
    check_scale(sp, model, tile_px)
    if sp.n_spots == 0 or retile:
        if sp.keys.kind != "spatialdata":
            raise InputError(f"{label or f'Section {sp.name!r}'} has no spots.")
        sp, size = tile_section(sp, model, tile_px, log=log)
        return sp, "tiles", size
    if model.config.image_features is None:
        check_inside(sp)
    return sp, "spots", float(sp.diameter)


@unchanged_on_failure()
@doc_params()
def predict(
    model: Any,
    data: Any,
    *,
    key_added: str = Keys.PREFIX,
    device: str | None = None,
    tile_px: float | None = None,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    library_id: str | None = None,
    library_key: str | None = None,
    bin_size: int | None = None,
    adapt: bool = False,
    copy: bool = False,
    spot_diameter_um: float | None = None,
    microns_per_pixel: float | None = None,
    num_workers: int | None = None,
) -> Any:
    """Predict expression and image embeddings on any section.

    Parameters
    ----------
    model
        A fitted :class:`stranker.Model`, or the folder it was saved to (loaded with
        :meth:`stranker.Model.load`).
    data
        SpatialData, AnnData (squidpy layout) or a list. A SpatialData with an image but no spots
        (e.g. a whole slide from :func:`stranker.io.read_slide`) gets a grid of spot-sized tiles over
        its tissue, streamed through the model in batches (memory does not grow with the slide beyond
        the outputs). Visium and Visium HD SpatialData from ``spatialdata_io`` are read as they are.
    key_added
        Prefix of the written keys.
    device
        Torch device; default ``sr.settings.device``.
    tile_px
        Tile side for image-only slides, in image pixels (default: the training spot size in µm at
        the slide's resolution). When only one of model and slide records its µm/px, tiling is
        refused unless ``tile_px`` is given (and spots are read with a warning).
    {doc_elements}
    {doc_library_key}
    bin_size
        Visium HD: the bin size (µm) whose table and squares to predict on (2, 8 or 16). Each bin is
        one spot: the model reads its own patch (its training width in µm) centred on the bin.
    adapt
        Test-time adaptation: the backbone's batch-norm statistics are recomputed on each section's
        own patches (AdaBN; up to 2048 of them, evenly spread) before it is read; the model itself is
        not changed. For a slide from another scanner, stain or patient than the training slides.
    copy
        Write into a copy of ``data`` and return it instead of ``None``.
    {doc_resolution}
    num_workers
        Threads that read, decode and resize the next batches of patches from the image while the
        network runs the current one (``0``: each batch is read after the one before has run);
        ``None``: :data:`stranker.spots.READ_WORKERS` (2). The predictions are the same for any
        number, in the same order; at most ``2 * num_workers`` batches are read ahead, so memory does
        not grow with it beyond a few batches. Unused for a model on precomputed features.

    Returns
    -------
    ``None`` (the copy with ``copy=True``). On sections with spots and a table, writes
    ``obsm['X_{key_added}']``, ``layers[key_added]`` (modelled genes; others NaN, or a sparse layer
    of the modelled genes beyond ``sr.settings.max_dense_layer``) and ``uns[key_added]``
    (``in_sample=False``; ``genes``: the genes written, to pass on, e.g. to ``sq.gr.spatial_autocorr``;
    ``genes_absent``: modelled genes the table lacks, not written, with a warning; ``adapt``: whether
    the predictions came from the adapted model; ``resampling``: slide and model µm/px, their ratio
    ``factor``, the pyramid level read, and for a model with a sharp finish (``sharp_epochs``) how
    many times ``coarser`` the slide's patches are than the training slides' and which image
    ``branch`` read them: ``'sharp'`` (the finished teacher) or ``'coarse'`` (the teacher as resolution
    jitter left it, for slides coarser than the training slides by more than half a jitter step));
    ``expression_rank``: for a model with ``predict_rank`` (the default), on how many principal axes of
    the training expression the predictions were projected. For a model with a reliability record
    (:func:`stranker.tl.fit`, two or more training sections): ``var['{key_added}_cv_pcc']``,
    ``_cv_pcc_lo``, ``_cv_pcc_hi`` (each gene's estimated r on a new section, with its interval) and
    ``var['{key_added}_reliable']`` (r > 0 at FDR ``uns[key_added]['fdr']``); per-spot intervals
    ``layers['{key_added}_lower']`` / ``['{key_added}_upper']`` at level
    ``uns[key_added]['interval_level']`` (split conformal on the fold models' out-of-fold residuals,
    half-width ``q_gene * obs['{key_added}_difficulty']``: a spot whose embedding lies far from the
    training spots gets a wider interval; the same dense or sparse format as the prediction); and
    ``uns[key_added]['shift']``: the section's ``score`` (median difficulty or colour distance), its
    conformal ``p_value`` against the training sections, and ``shifted`` with its ``reasons``
    (``'appearance'``: farther than every held-out training section; ``'resolution'``: coarser than
    every training section; ``'patient'``: a patient the training tables did not name, where the
    estimates were made across sections of the training patients): a WARNING names the section, and
    the reliability estimates may be optimistic there. A model without the
    record writes none of these and says why in ``uns[key_added]['reliability']``. On an image-only
    SpatialData, adds circles
    ``'{key_added}_tiles'`` and a table ``'{key_added}_table'`` annotating them (predictions in
    ``layers[key_added]`` only; its ``X`` is empty, so the predictions are held once: pass
    ``layer=key_added`` to scanpy); on spots without a table, the table only. Elements that an earlier
    predict added under these names are replaced (its tiles are laid anew, at this call's ``tile_px``,
    not read as spots); an element of the user's is not (pass another ``key_added``).
    """
    model = as_model(model)
    check_workers(num_workers)  # before anything is read
    data = maybe_copy(data, copy)
    need_image = model.config.image_features is None
    secs = as_sections(data, image_key=image_key, shapes_key=shapes_key, table_key=table_key,
                    library_id=library_id, library_key=library_key, bin_size=bin_size,
                    spot_diameter_um=spot_diameter_um, microns_per_pixel=microns_per_pixel,
                    need_image=need_image, need_table=False)
    check_key_added(secs, key_added, model=model)
    plans = []
    for sp in secs:
        retile = _own_tiles(sp, key_added)  # an earlier predict's tiles are laid anew
        if sp.keys.kind == "spatialdata" and (sp.n_spots == 0 or retile):
            check_free(sp.source, shapes=[f"{key_added}_tiles"], tables=[f"{key_added}_table"])
        elif sp.table is not None:
            _check_genes(sp, model, key_added)
        elif sp.keys.kind == "spatialdata":
            check_free(sp.source, tables=[f"{key_added}_table"])
        sp, kind, _ = spots_or_tiles(sp, model, tile_px, retile=retile)
        info = resampling(sp, model) if need_image else None
        if info and info["factor"] and abs(info["factor"] - 1) > 0.01:
            logger.info(f"Section {sp.name!r} is at {info['slide_microns_per_pixel']:.4g} µm/px, model at "
                        f"{info['model_microns_per_pixel']:.4g}: patches resampled x{1 / info['factor']:.3g} "
                        f"from pyramid level {info['level']}.")
        if info:
            check_detail(sp, model, info)
        if model.reliability_record is None:  # nothing to judge the predictions by
            (emb, pred), trust = model.infer(sp, device=device, adapt=adapt, num_workers=num_workers), None
        else:
            emb, pred, colour = model.infer(sp, device=device, adapt=adapt, colour=True,
                                            num_workers=num_workers)
            trust = model.trust(sp, emb, pred, colour)
        if trust is not None and trust["shift"]["shifted"]:
            logger.warning(
                f"Section {sp.name!r} {shift_reasons(trust['shift'])}: the reliability estimates "
                f"(`var['{key_added}_cv_pcc']`, `var['{key_added}_reliable']`) and the intervals were made "
                f"on sections like the training ones and may be optimistic there.")
        plans.append((kind, sp, info, emb, pred, trust))
    # everything computed: write
    for kind, sp, info, emb, pred, trust in plans:
        extra = {"adapt": bool(adapt)}
        if info is not None:
            extra["resampling"] = {k: v for k, v in info.items() if v is not None}
        write_predictions(sp, model, emb, pred, key_added, tiles=kind == "tiles", in_sample=False,
                          extra=extra, trust=trust)
    return data if copy else None


def shift_reasons(sh: dict[str, Any]) -> str:
    """Say why a section's shift record calls it ``shifted``."""
    said = {
        "appearance": f"lies farther from the training sections than any held-out training section did "
                      f"(shift score {sh['score']:.3g} > {max(sh['calibration'], default=0):.3g}, p = "
                      f"{sh['p_value']:.2g})",
        "resolution": f"gives the network {sh.get('coarser') or 0:.2g}x less detail than the training "
                      f"sections ({sh.get('training_coarser') or 0:.2g}x at most)",
        "patient": f"is of patient {sh.get('patient')!r}, and the estimates were made across sections of "
                   f"{', '.join(map(repr, sh.get('training_patients', [])))} only",
    }
    return "; ".join(said[r] for r in sh.get("reasons", ["appearance"]))


def as_model(model: Any) -> Any:
    """Return a fitted :class:`stranker.Model`, loading a folder path; refuse anything else."""
    from pathlib import Path

    from ._model import Model

    if isinstance(model, Model):
        return model
    if isinstance(model, str | Path):
        return Model.load(model)
    raise InputError(
        f"`model` must be a fitted stranker.Model (from `sr.tl.fit`) or the folder of a saved one, got "
        f"{type(model).__name__}: load a saved model with `sr.Model.load(path)`."
    )


def _own_tiles(sp: Section, key_added: str) -> bool:
    """Whether the spots of ``sp`` are the tiles an earlier predict laid under ``key_added`` (not data)."""
    key = f"{key_added}_tiles"
    return (sp.keys.kind == "spatialdata" and sp.keys.shapes_key == key
            and written_by_stranker(sp.source.shapes[key], key))


def _check_genes(sp: Section, model: Any, key_added: str) -> None:
    """Warn about modelled genes the table lacks (they are not written); refuse when it has none."""
    present, absent = genes_in_table(sp, model.genes)
    if not present:
        raise InputError(
            f"The table of section {sp.name!r} has none of the model's {len(model.genes)} genes "
            f"(e.g. {list(model.genes[:3])}; the table has e.g. {list(sp.var_names[:3])}): "
            "are the genes named the same way (symbols or Ensembl ids) in both?"
        )
    if absent:
        logger.warning(
            f"{len(absent)} of the model's {len(model.genes)} genes are not in the table of section "
            f"{sp.name!r} and get no prediction there: {absent[:20]}{' ...' if len(absent) > 20 else ''}. "
            f"The genes written are `uns[{key_added!r}]['genes']`; the absent ones "
            f"`uns[{key_added!r}]['genes_absent']`."
        )
