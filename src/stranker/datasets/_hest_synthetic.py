"""Synthetic sections written to disk in HEST-1k's layout (for trying read_hest and HEST-Bench offline)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import write_file
from .._constants import Keys
from ..io._hest import PATCH_MPP, PATCH_UM


def _pyramid_tiff(path: Path, rgb: np.ndarray, mpp: float, levels: int = 3) -> None:
    import tifffile

    pyr = [rgb]
    for _ in range(levels - 1):
        a = pyr[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        if h < 2 or w < 2:
            break
        pyr.append(a[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3)).round().astype(np.uint8))
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for i, lv in enumerate(pyr):
            kw: dict[str, Any] = dict(tile=(128, 128), photometric="rgb", compression="zlib",
                                      resolution=(1e4 / (mpp * 2**i),) * 2, resolutionunit="CENTIMETER")
            if i == 0:
                kw["subifds"] = len(pyr) - 1
            else:
                kw["subfiletype"] = 1
            tw.write(lv, **kw)


def hest_patches_like(rgb: np.ndarray, centers: np.ndarray, mpp: float, patch_px: int = 224):
    """Patches cut as HEST cuts them: ``patch_px`` px at 0.5 µm/px around each centre.

    The source window is ``112 µm / mpp`` pixels wide and starts at ``centre - side // 2`` (the
    corner HEST stores, HEST#52), white outside the image; it is resized to ``patch_px``.

    Returns
    -------
    ``(img, corners)``: ``(n, patch_px, patch_px, 3)`` uint8 and ``(n, 2)`` int64 corners ``(x, y)``.
    """
    from PIL import Image

    side = PATCH_UM / mpp * patch_px / 224
    corners = (centers - side // 2).astype(np.int64)
    s = int(round(side))
    h, w = rgb.shape[:2]
    out = np.empty((len(centers), patch_px, patch_px, 3), dtype=np.uint8)
    for i, (x0, y0) in enumerate(corners):
        win = np.full((s, s, 3), 255, dtype=np.uint8)
        ys, xs, ye, xe = max(y0, 0), max(x0, 0), min(y0 + s, h), min(x0 + s, w)
        if ye > ys and xe > xs:
            win[ys - y0 : ye - y0, xs - x0 : xe - x0] = rgb[ys:ye, xs:xe]
        out[i] = win if s == patch_px else np.asarray(Image.fromarray(win).resize((patch_px, patch_px),
                                                                                   Image.BILINEAR))
    return out, corners


def synthetic_hest(
    root: str | Path,
    n_samples: int = 3,
    n_spots: int = 120,
    *,
    patients: Sequence[str] | None = None,
    technology: str = "Visium",
    mpp: float | None = None,
    n_genes: int = 80,
    patches: bool = True,
    wsi: bool = True,
    seed: int = 0,
) -> list[str]:
    """Write synthetic sections (:func:`stranker.datasets.synthetic`) to a folder in HEST-1k's layout.

    Each sample ``SYN{i}`` gets ``st/{id}.h5ad`` (counts, ``obsm['spatial']`` in full-resolution
    pixels, ``uns['spatial']['ST']`` with a downscaled image and scalefactors), ``wsis/{id}.tif``
    (tiled pyramidal TIFF), ``metadata/{id}.json``, ``patches/{id}.h5`` (224 px at 0.5 µm/px, corners
    top-left as HEST writes them) and ``tissue_seg/{id}_contours.geojson``.

    Parameters
    ----------
    root
        Folder to write to (created).
    n_samples, n_spots, n_genes, seed
        Passed to :func:`stranker.datasets.synthetic`.
    patients
        Patient of each sample (metadata ``patient``); default one per sample.
    technology
        Metadata ``st_technology``: ``'Visium'``, ``'ST'`` or ``'Xenium'`` (square pseudo-spots).
    mpp
        Pixel size the metadata declares (µm/px); default the synthetic sections' own.
    patches, wsi
        Write ``patches/`` and ``wsis/``.

    Returns
    -------
    The sample ids written.
    """
    import anndata as ad
    import h5py
    import scipy.sparse as sps

    from ._synthetic import synthetic

    root = Path(root)
    secs = synthetic(n_sections=n_samples, n_spots=n_spots, n_genes=n_genes, seed=seed)
    patients = list(patients) if patients is not None else [f"P{i}" for i in range(n_samples)]
    if len(patients) != n_samples:
        raise ValueError(f"`patients` has {len(patients)} entries for {n_samples} samples.")
    ids = []
    for i, sd in enumerate(secs):
        sid = f"SYN{i}"
        ids.append(sid)
        img = sd.images[Keys.IMAGE]
        lvl = img["scale0"]["image"] if hasattr(img, "children") else img
        rgb = np.ascontiguousarray(np.moveaxis(np.asarray(lvl.values), 0, -1))
        table = sd.tables[Keys.TABLE]
        true_mpp = float(table.uns["synthetic"]["microns_per_pixel"])
        m = float(mpp) if mpp is not None else true_mpp
        xy = np.asarray(table.obsm[Keys.SPATIAL], dtype=np.float64)
        spot_px = 100.0 / true_mpp  # the synthetic spots are 100 µm wide at their own scale
        barcodes = [f"{sid}-{j:05d}" for j in range(table.n_obs)]

        f = 1000.0 / max(rgb.shape[:2])
        thumb = rgb[:: max(int(round(1 / f)), 1), :: max(int(round(1 / f)), 1)]
        a = ad.AnnData(X=sps.csr_matrix(table.X, dtype=np.float32))
        a.obs_names = barcodes
        a.var_names = list(table.var_names)
        a.obs["in_tissue"] = 1
        a.obsm["spatial"] = xy
        scalef = {"spot_diameter_fullres": spot_px,
                  "tissue_downscaled_fullres_scalef": thumb.shape[0] / rgb.shape[0]}
        a.uns["spatial"] = {"ST": {"images": {"downscaled_fullres": thumb}, "scalefactors": scalef}}
        write_file(root / "st" / f"{sid}.h5ad", lambda p, a=a: a.write_h5ad(p))

        meta = {"id": sid, "dataset_title": "stranker synthetic", "organ": "Synthetic",
                "species": "Homo sapiens", "oncotree_code": "SYN", "patient": patients[i],
                "st_technology": technology,
                "pixel_size_um_estimated": m, "pixel_size_um_embedded": m, "spot_diameter": spot_px * m,
                "inter_spot_dist": 2 * spot_px * m, "spots_under_tissue": int(table.n_obs),
                "fullres_px_width": int(rgb.shape[1]), "fullres_px_height": int(rgb.shape[0])}
        write_file(root / "metadata" / f"{sid}.json", lambda p, meta=meta: p.write_text(json.dumps(meta)))

        if wsi:
            write_file(root / "wsis" / f"{sid}.tif", lambda p, rgb=rgb, m=m: _pyramid_tiff(p, rgb, m))
        if patches:
            pimg, corners = hest_patches_like(rgb, xy, m)

            def write_h5(p, pimg=pimg, corners=corners, barcodes=barcodes):
                with h5py.File(p, "w") as h:
                    h.create_dataset("img", data=pimg, chunks=(1, *pimg.shape[1:]))
                    h.create_dataset("coords", data=corners)
                    h.create_dataset("barcode", data=np.array(barcodes, dtype="S")[:, None])
                    h["img"].attrs["pixel_size"] = PATCH_MPP

            write_file(root / "patches" / f"{sid}.h5", write_h5)
        lo, hi = xy.min(0) - spot_px, xy.max(0) + spot_px
        ring = [[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]], [lo[0], lo[1]]]
        gj = {"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {"tissue_id": 0},
             "geometry": {"type": "Polygon", "coordinates": [[[float(x), float(y)] for x, y in ring]]}}]}
        seg = root / "tissue_seg" / f"{sid}_contours.geojson"
        write_file(seg, lambda p, gj=gj: p.write_text(json.dumps(gj)))
    return ids
