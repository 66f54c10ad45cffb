"""HEST-1k samples (Jaume et al., 2024) as SpatialData, read from the folder layout HEST publishes.

A HEST folder holds, per sample id: ``st/{id}.h5ad`` (counts; ``obsm['spatial']`` spot centres in
full-resolution pixels), ``wsis/{id}.tif`` (pyramidal TIFF), ``metadata/{id}.json`` (pixel size,
organ, technology, patient, ...), and optionally ``patches/{id}.h5`` (``img``, ``coords`` = top-left
corners in full-resolution pixels, ``barcode``) and ``tissue_seg/{id}_contours.geojson``. A HEST-Bench
task folder has ``adata/`` in place of ``st/`` and no WSIs; its samples are read from their patches.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .._constants import Keys
from .._errors import InputError
from .._settings import logger
from ..section._record import check_mpp
from ..write import add_elements

HEST_REPO = "MahmoodLab/hest"
EXPR_DIRS = ("st", "adata")  # HEST-1k, HEST-Bench
# HEST's patches: 224 x 224 px at 0.5 µm/px (112 µm), HESTData.dump_patches' defaults and HEST's README
PATCH_MPP = 0.5
PATCH_UM = 112.0
# the pixel size the patches' corners imply and the sample's may differ by a few percent (versions of
# HEST's estimate): a warning; beyond this factor they are of another scan (20x vs 40x): refused
PATCH_FACTOR = 1.25
# spot diameter (µm) by technology when the metadata does not say. HEST pools Xenium transcripts into
# 100 µm squares (its scalefactor says 55 µm: ignored) and Visium HD 16 µm bins into 128 µm squares
_SPOT_UM = {"visium": 55.0, "spatial transcriptomics": 100.0, "st": 100.0, "xenium": 100.0,
            "visium hd": 128.0}
_SQUARES = ("xenium", "visium hd")
_FILTER_ALIASES = {"technology": "st_technology"}


def _expr_path(root: Path, sid: str) -> Path | None:
    for d in EXPR_DIRS:
        p = root / d / f"{sid}.h5ad"
        if p.exists():
            return p
    return None


def hest_ids(root: str | Path) -> list[str]:
    """Sample ids present in a HEST folder (those with ``st/{id}.h5ad`` or ``adata/{id}.h5ad``)."""
    root = Path(root)
    ids = {p.stem for d in EXPR_DIRS if (root / d).is_dir() for p in (root / d).glob("*.h5ad")}
    return sorted(ids)


def hest_metadata(root: str | Path, sample_id: str) -> dict[str, Any]:
    """Return the sample's ``metadata/{id}.json`` as a dict (empty when the folder has none)."""
    path = Path(root) / "metadata" / f"{sample_id}.json"
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); download it again.") from e
    if not isinstance(meta, dict):
        raise InputError(f"{path} holds a {type(meta).__name__}, not HEST's metadata object.")
    return meta


def _matches(meta: dict[str, Any], filters: dict[str, Any]) -> bool:
    for key, want in filters.items():
        have = meta.get(key)
        wants = want if isinstance(want, list | tuple | set) else [want]
        norm = [w.lower() if isinstance(w, str) else w for w in wants]
        if (have.lower() if isinstance(have, str) else have) not in norm:
            return False
    return True


def read_hest(
    root: str | Path,
    sample_id: str | list[str] | None = None,
    *,
    image: str = "auto",
    patches: bool = True,
    **filters: Any,
) -> Any:
    """Read HEST-1k samples (or a HEST-Bench task folder) as SpatialData that every stranker function takes.

    Parameters
    ----------
    root
        Folder in HEST's layout: ``st/`` (or ``adata/``), ``wsis/``, ``metadata/``, and optionally
        ``patches/`` and ``tissue_seg/``.
    sample_id
        One id (e.g. ``'TENX95'``), a list of ids, or ``None`` for every sample of the folder that
        passes ``filters``.
    image
        ``'auto'``: the whole-slide image ``wsis/{id}.tif`` (read lazily by
        :func:`stranker.io.read_slide`), else a mosaic of the sample's patches; ``'wsi'`` or
        ``'patches'`` to insist on one.
    patches
        Read ``patches/{id}.h5`` when present: its corners go to ``obsm['hest_patch_corner']``.
    **filters
        Metadata to match when reading a folder, e.g. ``organ='Bowel'``, ``oncotree_code='IDC'``,
        ``st_technology='Visium'`` (alias ``technology``), ``species='Homo sapiens'``; a list matches
        any of its values, strings case-insensitively.

    Returns
    -------
    A :class:`spatialdata.SpatialData` for one id, a list for a list of ids, a dict ``{id: SpatialData}``
    for a whole folder. Each has image ``'he'`` (lazy; level-0 pixels in ``'global'``), spots ``'spots'``
    (circles, or squares for Xenium and Visium HD pseudo-spots, centred on ``obsm['spatial']``), table
    ``'table'``
    (HEST's counts in ``X``; ``uns['hest']`` the sample's metadata: organ, technology, patient,
    oncotree code, ...; ``uns['microns_per_pixel']`` the image's resolution, taken from the metadata's
    ``pixel_size_um_estimated``; ``obs['hest_patch']`` the row of each spot in ``patches/{id}.h5``
    (``uns['hest']['patches_file']``), -1 for none) and, when ``tissue_seg/{id}_contours.geojson``
    exists, polygons ``'tissue'``.

    Raises
    ------
    InputError
        For a sample that cannot be read as it is: an expression file that is truncated or damaged; a
        metadata pixel size that is present but not a positive number within
        :data:`stranker.section._record.MPP_RANGE` (0.05–20 µm/px; a null or NaN is absent); patch
        ``coords`` on the spots' centres rather than HEST's top-left corners; a pixel size the patches'
        corners imply more than ``PATCH_FACTOR`` (1.25x) from the sample's (a smaller difference is
        a warning). ``patches=False`` reads a sample without its patch file.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"HEST folder {root} does not exist.")
    if image not in ("auto", "wsi", "patches"):
        raise InputError(f"`image` must be 'auto', 'wsi' or 'patches', got {image!r}.")
    ids = hest_ids(root)
    if not ids:
        tasks = sorted(d.name for d in root.iterdir() if d.is_dir() and hest_ids(d))
        if tasks:
            raise InputError(f"{root} is a folder of HEST-Bench tasks {tasks}: read one, e.g. "
                             f"`sr.io.read_hest('{root / tasks[0]}')`.")
        raise InputError(
            f"{root} holds no HEST sample: expected st/{{id}}.h5ad (HEST-1k) or adata/{{id}}.h5ad "
            "(HEST-Bench). "
            "Download samples with `sr.datasets.hest(ids)`."
        )
    filters = {_FILTER_ALIASES.get(k, k): v for k, v in filters.items()}
    if sample_id is None:
        chosen = ids
        if filters:
            metas = {sid: hest_metadata(root, sid) for sid in ids}
            known = set().union(*(m.keys() for m in metas.values()))
            unknown = sorted(set(filters) - known)
            if unknown:
                raise InputError(
                    f"No sample's metadata in {root / 'metadata'} has the key(s) {unknown}; "
                    f"keys present: {sorted(known) or 'none (no metadata/*.json)'}."
                )
            chosen = [sid for sid in ids if _matches(metas[sid], filters)]
            if not chosen:
                raise InputError(f"No sample in {root} matches {filters}.")
        return {sid: _read_one(root, sid, image=image, patches=patches) for sid in chosen}
    if filters:
        raise InputError("Metadata filters select among a folder's samples: pass them with `sample_id=None`.")
    if isinstance(sample_id, list | tuple):
        return [read_hest(root, s, image=image, patches=patches) for s in sample_id]
    if sample_id not in ids:
        raise InputError(f"Sample {sample_id!r} is not in {root}; samples present: {ids}.")
    return _read_one(root, str(sample_id), image=image, patches=patches)


# --------------------------------------------------------------------------------------------
# one sample
# --------------------------------------------------------------------------------------------
def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _read_one(root: Path, sid: str, *, image: str, patches: bool) -> Any:
    import anndata as ad

    expr = _expr_path(root, sid)
    meta = hest_metadata(root, sid)
    try:
        adata = ad.read_h5ad(expr)
    except Exception as e:  # h5py / anndata on a truncated or damaged file: say which and what to do
        raise InputError(
            f"HEST {sid}: {expr} cannot be read as an AnnData ({type(e).__name__}: {e}); the file is "
            f"truncated or damaged. Download it again, e.g. with `sr.datasets.hest([{sid!r}])`."
        ) from e
    if Keys.SPATIAL not in adata.obsm:
        raise InputError(f"{expr} has no obsm['spatial'] (spot centres in full-resolution pixels).")
    xy = np.asarray(adata.obsm[Keys.SPATIAL], dtype=np.float64)[:, :2]
    adata.obs_names = adata.obs_names.astype(str)
    if not adata.obs_names.is_unique:
        raise InputError(f"{expr}: spot barcodes (obs_names) are not unique.")
    adata.var_names_make_unique()

    patch = _read_patch_index(root / "patches" / f"{sid}.h5", adata) if patches else None
    mpp, mpp_from = _mpp(meta, patch, sid)
    if patch is not None and mpp is not None and patch["half"] is not None:
        _check_patch_scale(sid, patch, mpp, mpp_from)

    wsi = root / "wsis" / f"{sid}.tif"
    if image == "wsi" or (image == "auto" and wsi.exists()):
        if not wsi.exists():
            raise InputError(f"HEST {sid}: {wsi} does not exist; download it or pass `image='patches'`.")
        from ._slide import read_slide

        if mpp_from.startswith("patch"):  # no metadata: the TIFF's resolution before the patches' estimate
            try:
                sdata, mpp_from = read_slide(wsi), "the TIFF"
            except InputError:
                sdata = read_slide(wsi, mpp=mpp)
            else:  # the TIFF's must agree with the patches' as the metadata's must
                _check_patch_scale(sid, patch, float(sdata.attrs[Keys.MPP][Keys.IMAGE]), mpp_from)
        else:
            sdata = read_slide(wsi, mpp=mpp)
        mpp = float(sdata.attrs[Keys.MPP][Keys.IMAGE])
        image_mpp, source = mpp, "wsi"
    else:
        if patch is None:
            raise InputError(
                f"HEST {sid}: neither {wsi} nor {root / 'patches' / (sid + '.h5')} exists: there is no "
                "image. "
                f"Download the sample's wsis/ (and patches/) files, e.g. with `sr.datasets.hest([{sid!r}])`."
            )
        if mpp is None:
            raise InputError(f"HEST {sid}: no pixel size in metadata/{sid}.json and none from its patches.")
        sdata = _patch_mosaic(patch, mpp)
        image_mpp, source = PATCH_MPP, "patches"
        logger.info(
            f"HEST {sid}: no whole-slide image; the image is a mosaic of its {patch['n']} patches "
            f"({PATCH_MPP} µm/px, white outside them)."
        )
    logger.info(f"HEST {sid}: {adata.n_obs} spots, {mpp:.4g} µm/px ({mpp_from}), image from {source}.")

    tech = str(meta.get("st_technology", "")).strip().lower()
    spot_um = _finite(meta.get("spot_diameter"))
    if spot_um is None and tech != "xenium":
        sf = adata.uns.get(Keys.SPATIAL, {}).get("ST", {}).get("scalefactors", {})
        d_px = _finite(sf.get("spot_diameter_fullres"))
        spot_um = d_px * mpp if d_px is not None else None
    if spot_um is None:
        spot_um = _SPOT_UM.get(tech)
    if spot_um is None:
        raise InputError(
            f"HEST {sid}: the spot size is unknown (no 'spot_diameter' in its metadata, no "
            f"'spot_diameter_fullres' scalefactor, technology {meta.get('st_technology')!r})."
        )
    shapes = _spot_shapes(xy, spot_um / mpp, adata.obs_names, square=tech in _SQUARES)

    obs_patch = np.full(adata.n_obs, -1, dtype=np.int64)
    if patch is not None:
        corners = np.full((adata.n_obs, 2), np.nan)
        obs_patch[patch["rows"]] = np.arange(patch["n"])[patch["found"]]
        corners[patch["rows"]] = patch["coords"][patch["found"]]
        adata.obsm["hest_patch_corner"] = corners
    adata.obs["hest_patch"] = obs_patch
    adata.obs[Keys.INSTANCE] = adata.obs_names.to_numpy()
    adata.obs[Keys.REGION] = np.array([Keys.SHAPES] * adata.n_obs)
    adata.obs[Keys.REGION] = adata.obs[Keys.REGION].astype("category")
    adata.uns.pop("spatialdata_attrs", None)
    adata.uns[Keys.MPP] = float(image_mpp)
    adata.uns["section"] = sid
    adata.uns["hest"] = _clean_meta({**meta, "id": sid, "image_source": source, "pixel_size_um": mpp,
                                     "patches_file": str(patch["path"]) if patch is not None else None})
    from spatialdata.models import TableModel

    table = TableModel.parse(adata, region=Keys.SHAPES, region_key=Keys.REGION, instance_key=Keys.INSTANCE)
    tissue = _tissue(root / "tissue_seg", sid)
    more = {"tissue": tissue} if tissue is not None else {}
    add_elements(sdata, shapes={Keys.SHAPES: shapes, **more}, tables={Keys.TABLE: table})
    return sdata


def _clean_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Metadata that AnnData can write: no None or NaN, nested values as JSON text."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            continue
        out[str(k)] = v if isinstance(v, str | int | float | bool) else json.dumps(v)
    return out


def _meta_mpp(meta: dict[str, Any], key: str, sid: str) -> float | None:
    """Return a pixel size of the metadata: ``None`` when absent (missing, null or NaN), else checked."""
    v = meta.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return check_mpp(
        v, f"HEST {sid}: metadata/{sid}.json's {key!r}",
        "Download the metadata again, or correct the value (µm per full-resolution pixel of the WSI).",
        text=True,
    )


def _mpp(meta: dict[str, Any], patch: dict[str, Any] | None, sid: str) -> tuple[float | None, str]:
    """Microns per full-resolution pixel: HEST's estimate, else the embedded value, else the patches'.

    A value present in the metadata (not null, not NaN) must be a positive number within
    :data:`stranker.section._record.MPP_RANGE`: a bad one is refused, never passed over for the next.
    """
    v = _meta_mpp(meta, "pixel_size_um_estimated", sid)
    if v is not None:
        return v, "metadata pixel_size_um_estimated"
    v = _meta_mpp(meta, "pixel_size_um_embedded", sid)
    if v is not None:
        logger.warning(
            f"HEST {sid}: no pixel_size_um_estimated in its metadata; using pixel_size_um_embedded."
        )
        return v, "metadata pixel_size_um_embedded"
    if patch is not None and patch["mpp"] is not None:
        fix = (f"Pass `patches=False` to read the sample without {patch['path'].name}, or give it "
               f"'pixel_size_um_estimated' in metadata/{sid}.json.")
        v = check_mpp(patch["mpp"], f"HEST {sid}: the pixel size its patches' corners imply", fix)
        return v, "patch corners (112 µm patches)"
    return None, "the TIFF"


def _check_patch_scale(sid: str, patch: dict[str, Any], mpp: float, mpp_from: str) -> None:
    """Warn when the patches' corners imply another pixel size than ``mpp``; refuse beyond ``PATCH_FACTOR``.

    HEST's corner is ``centre - side // 2`` in whole pixels: the offset is known to within a pixel.
    """
    if patch["mpp"] is None or abs(patch["half"] - (PATCH_UM / mpp) // 2) <= 1.5:
        return
    ratio = max(patch["mpp"] / mpp, mpp / patch["mpp"])
    what = (f"HEST {sid}: the corners of {patch['path'].name} imply {patch['mpp']:.4g} µm/px, "
            f"{mpp_from} says {mpp:.4g}")
    if ratio > PATCH_FACTOR:
        raise InputError(
            f"{what}: {ratio:.3g}x apart (more than {PATCH_FACTOR:g}x), so the patches are of another "
            "scan or version of the sample, and a mosaic of them would be placed (and sized) wrongly. "
            "Download the sample's files again, or pass `patches=False` to read it without "
            f"{patch['path'].name}."
        )
    logger.warning(f"{what}; using the latter (are the patches from another version of the sample?).")


# --------------------------------------------------------------------------------------------
# patches/{id}.h5: img (n, 224, 224, 3), coords (n, 2) top-left corners, barcode (n, 1)
# --------------------------------------------------------------------------------------------
def _read_patch_index(path: Path, adata: Any) -> dict[str, Any] | None:
    """Corners and barcodes of a patch file (not the pixels), matched to the table's spots."""
    if not path.exists():
        return None
    import h5py

    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("img", "coords", "barcode") if k not in f]
            if missing:
                raise InputError(
                    f"{path} lacks {missing}; HEST patch files hold 'img', 'coords' and 'barcode'."
                )
            shape = tuple(int(s) for s in f["img"].shape)
            coords = np.asarray(f["coords"][:], dtype=np.float64)
            raw = np.asarray(f["barcode"][:]).reshape(-1)
    except OSError as e:
        raise InputError(f"{path} is not an HDF5 file h5py can read ({e}); download it again.") from e
    n = shape[0]
    if len(shape) != 4 or shape[3] != 3 or coords.shape != (n, 2) or len(raw) != n:
        raise InputError(
            f"{path}: img {shape}, coords {coords.shape}, barcode {raw.shape} do not describe n RGB "
            "patches with one (x, y) corner and barcode each."
        )
    barcodes = np.array([b.decode() if isinstance(b, bytes) else str(b) for b in raw])
    rows = adata.obs_names.get_indexer(barcodes)
    found = rows >= 0
    if not found.all():
        logger.warning(f"{path.name}: {int((~found).sum())} of {n} patches have a barcode not in the table.")
    # HEST cut each patch around its spot: corner = centre - size // 2 (HEST#52), so the patches tell
    # their side in full-resolution pixels, hence the pixel size (a patch is 112 µm wide)
    xy = np.asarray(adata.obsm[Keys.SPATIAL], dtype=np.float64)[:, :2]
    half = mpp = None
    if found.any():
        half = float(np.median(xy[rows[found]] - coords[found]))
        if half < 1:  # a corner on (or past) its spot's centre: HEST's patches are at least 5 px wide
            raise InputError(
                f"{path}: the patches' coords lie {half:.3g} px from their spots' centres (obsm['spatial']); "
                "HEST's coords are the top-left corners, centre - side // 2 (HEST#52), so these are centres "
                "or another frame. Write the corners (`coords - side // 2`), or pass `patches=False` to "
                "read the sample without its patches."
            )
        # side // 2 <= half < side // 2 + 1, so the side is 2 * half + 1 to within a pixel
        mpp = PATCH_UM / (2 * half + 1)
    return {"path": path, "n": n, "px": (shape[1], shape[2]), "coords": coords, "rows": rows[found],
            "found": found, "half": half, "mpp": mpp}


def read_hest_patches(path: str | Path, rows: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patches of a HEST ``patches/{id}.h5`` file.

    Parameters
    ----------
    path
        The ``.h5`` file.
    rows
        Patch rows to read (sorted or not); all by default.

    Returns
    -------
    ``(img, corners, barcodes)``: ``(n, h, w, 3)`` uint8 patches (224 px at 0.5 µm/px in HEST),
    ``(n, 2)`` top-left corners ``(x, y)`` in full-resolution pixels of the WSI (not centres:
    HEST#52), barcodes as ``str``.
    """
    import h5py

    if not Path(path).is_file():
        raise FileNotFoundError(f"HEST patch file {path} does not exist.")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise InputError(f"{path} is not a HEST patch file (HDF5 with img, coords, barcode): {err}") from err
    with f:
        n = f["img"].shape[0]
        idx = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
        uniq, inv = np.unique(idx, return_inverse=True)  # h5py reads increasing, distinct rows
        img = np.asarray(f["img"][uniq])[inv]
        coords = np.asarray(f["coords"][:])[idx]
        raw = np.asarray(f["barcode"][:]).reshape(-1)[idx]
    return img, coords, np.array([b.decode() if isinstance(b, bytes) else str(b) for b in raw])


def _patch_mosaic(patch: dict[str, Any], mpp: float) -> Any:
    """Return a lazily read image of the patches pasted at their corners, at the patches' 0.5 µm/px.

    The image's ``'global'`` frame is the WSI's full-resolution pixels (an affine scales and shifts
    the mosaic), so spots, tissue contours and corners keep HEST's coordinates.
    """
    from spatialdata.transformations import Affine, set_transformation

    from ._slide import _as_sdata, _Level

    k = PATCH_MPP / mpp  # full-resolution pixels per mosaic pixel
    ph, pw = patch["px"]
    pos = np.round(patch["coords"] / k).astype(np.int64)  # top-left in mosaic pixels
    origin = pos.min(0)
    pos -= origin
    w, h = int(pos[:, 0].max()) + pw, int(pos[:, 1].max()) + ph
    path = patch["path"]

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        import h5py

        out = np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)
        hit = np.flatnonzero(
            (pos[:, 0] < x1) & (pos[:, 0] + pw > x0) & (pos[:, 1] < y1) & (pos[:, 1] + ph > y0)
        )
        if len(hit):
            # one read per patch: h5py's fancy indexing is slow on scattered rows
            with h5py.File(path, "r") as f:
                imgs = [f["img"][i] for i in hit]
            for (px, py), im in zip(pos[hit], imgs, strict=True):
                ys, xs = max(py, y0), max(px, x0)
                ye, xe = min(py + ph, y1), min(px + pw, x1)
                out[ys - y0 : ye - y0, xs - x0 : xe - x0] = im[ys - py : ye - py, xs - px : xe - px, :3]
        return out

    def coarse(f: int):
        def read_f(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            win = read(y0 * f, y1 * f, x0 * f, x1 * f)
            return win.reshape(y1 - y0, f, x1 - x0, f, 3).mean((1, 3)).round().astype(np.uint8)

        return read_f

    # levels 2x and 4x coarser (block means), so that patches fed smaller and tissue masks read less
    levels = [_Level((3, h, w), read, f"{path.name}[mosaic]")]
    levels += [_Level((3, h // f, w // f), coarse(f), f"{path.name}[mosaic/{f}]")
               for f in (2, 4) if min(h, w) // f >= 64]
    sdata = _as_sdata(levels, PATCH_MPP, Keys.IMAGE, str(path))
    m = np.array([[k, 0.0, origin[0] * k], [0.0, k, origin[1] * k], [0.0, 0.0, 1.0]])
    set_transformation(sdata.images[Keys.IMAGE], Affine(m, input_axes=("x", "y"), output_axes=("x", "y")),
                       to_coordinate_system="global", set_all=False)
    return sdata


# --------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------
def _spot_shapes(xy: np.ndarray, diameter_px: float, index: Any, *, square: bool) -> Any:
    import geopandas as gpd
    import pandas as pd
    import shapely
    from spatialdata.models import ShapesModel

    idx = pd.Index(np.asarray(index), name="spot")
    if not square:
        return ShapesModel.parse(xy, geometry=0, radius=np.full(len(xy), diameter_px / 2), index=idx)
    r = diameter_px / 2
    boxes = shapely.box(xy[:, 0] - r, xy[:, 1] - r, xy[:, 0] + r, xy[:, 1] + r)
    return ShapesModel.parse(gpd.GeoDataFrame(geometry=boxes, index=idx))


def _tissue(folder: Path, sid: str) -> Any:
    """Tissue contours of ``tissue_seg/{id}_contours.geojson`` as polygons in full-resolution pixels.

    HEST's older ``{id}_mask.pkl`` is not read: stranker loads no pickle.
    """
    path = folder / f"{sid}_contours.geojson"
    if not path.exists():
        if (folder / f"{sid}_mask.pkl").exists():
            logger.info(f"HEST {sid}: tissue_seg/{sid}_mask.pkl is not read (a pickle); get the .geojson.")
        return None
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel

    try:
        gj = json.loads(path.read_text())
        geoms = [shapely.geometry.shape(f["geometry"]) for f in gj.get("features", []) if f.get("geometry")]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"{path} is not a GeoJSON feature collection ({e}).") from e
    geoms = [g for g in geoms if g.geom_type in ("Polygon", "MultiPolygon") and not g.is_empty]
    if not geoms:
        return None
    return ShapesModel.parse(gpd.GeoDataFrame(geometry=geoms))
