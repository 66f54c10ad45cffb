"""HER2+ breast cancer legacy-ST sections (Andersson et al., Nat. Commun. 2021), fetched with pooch."""

from __future__ import annotations

import hashlib
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from .._constants import Keys
from .._errors import InputError
from .._settings import logger, settings

BASE_URL = "https://github.com/almaan/her2st/raw/master/"
SPOT_DIAMETER_UM = 100.0  # legacy ST spots
SPOT_PITCH_UM = 200.0  # centre to centre on the array
# Sections whose only upstream image is the viewer's rendering (``app/www/imgs``): the width in pixels of
# the original scan, the frame of ``pixel_x``/``pixel_y`` in their spot files (upstream does not carry it)
VIEWER_SCAN_WIDTH = {"A1": 6954}
BLACK_BELOW = 8  # a viewer rendering's pixels darker than this in every channel are its blacked-out glass


class HashMismatchError(InputError):
    """A cached file does not have the SHA-256 of the published file."""


def _registry() -> dict[str, dict[str, tuple[str, str]]]:
    """Map section -> {'counts'|'spots'|'image': (upstream path, sha256)} from the packaged hash list."""
    reg: dict[str, dict[str, tuple[str, str]]] = {}
    text = files("stranker.datasets").joinpath("her2st_sha256.txt").read_text()
    for line in text.splitlines():
        if not line.strip():
            continue
        digest, path = line.split(maxsplit=1)
        parts = path.split("/")
        if "ST-cnts" in parts:
            reg.setdefault(parts[-1].split(".")[0], {})["counts"] = (path, digest)
        elif "ST-spotfiles" in parts:
            reg.setdefault(parts[-1].split("_")[0], {})["spots"] = (path, digest)
        elif "ST-imgs" in parts:
            reg.setdefault(parts[-2], {})["image"] = (path, digest)
        elif "imgs" in parts and parts[-1].split("_")[0] in VIEWER_SCAN_WIDTH:
            reg.setdefault(parts[-1].split("_")[0], {})["viewer"] = (path, digest)
    return reg


def _image_kind(files: dict[str, tuple[str, str]]) -> str | None:
    """'image' (full-resolution scan), 'viewer' (upstream's lower-resolution rendering) or None."""
    return "image" if "image" in files else "viewer" if "viewer" in files else None


def sections() -> list[str]:
    """Sections of the HER2+ dataset that have counts, spots and an H&E image upstream."""
    return sorted(
        s for s, f in _registry().items() if {"counts", "spots"} <= set(f) and _image_kind(f) is not None
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch(local_name: str, upstream: str, digest: str, data_dir: Path) -> Path:
    """Return the verified local file: found in ``data_dir`` or downloaded there by pooch."""
    path = data_dir / local_name
    if path.exists():
        got = _sha256(path)
        if got != digest:
            raise HashMismatchError(
                f"{path} fails its SHA-256 check (expected {digest}, got {got}): "
                "the file is damaged or not the published one. "
                f"Delete it so that stranker downloads it again from {BASE_URL + upstream}."
            )
        return path
    import pooch

    try:
        out = pooch.retrieve(
            BASE_URL + upstream, known_hash=f"sha256:{digest}", fname=local_name, path=data_dir,
            progressbar=settings.show_progress(),
        )
    except Exception as err:  # network, permissions, pooch's hash mismatch after download
        if isinstance(err, ValueError) and "does not match the known hash" in str(err):
            raise HashMismatchError(f"The download of {local_name} fails its SHA-256 check: {err}") from err
        raise InputError(
            f"{local_name} is not in {data_dir} and could not be downloaded from {BASE_URL + upstream} "
            f"({err}). To work offline, put the file there "
            "(or point STRANKER_DATA_DIR at a folder that has it)."
        ) from err
    return Path(out)


def her2st(section: str | list[str], *, data_dir: str | Path | None = None) -> Any:
    """One section (or a list) of the HER2+ breast cancer ST dataset as SpatialData.

    Built from the public files of github.com/almaan/her2st (Andersson et al., Nat. Commun. 12,
    6012, 2021: cite it): count table, spot file and full-resolution H&E, each checked against its
    published SHA-256. Files are looked up in ``data_dir`` (default ``sr.settings.data_dir``, i.e.
    ``$STRANKER_DATA_DIR`` when set) under the names ``C2.jpg``, ``C2.tsv.gz``, ``C2_selection.tsv``,
    and downloaded there when missing.

    Section ``'A1'`` (patient A) has no full-resolution scan upstream: its image is the viewer's
    rendering ``A1.png`` (2000 px wide, background blacked out, about 3.2 µm/px against about
    0.69 µm/px for C2–C5). Its spot centres are rescaled from the original scan's frame (6954 px
    wide) to the PNG, and ``uns['microns_per_pixel']`` is measured on the PNG from the 200 µm spot
    pitch, so that :func:`stranker.tl.fit` and :func:`stranker.tl.predict` cut patches of the same
    physical size as on the other sections. Its blacked-out background (every channel below 8) is
    made white again, as glass looks in a scan, so that patches at the tissue's edge look like those
    of the other sections.

    Parameters
    ----------
    section
        Section name such as ``'C2'`` (see :func:`stranker.datasets.her2st_sections`), or a list.
    data_dir
        Folder of the files; overrides the settings.

    Returns
    -------
    SpatialData with image ``'he'`` (multiscale, full resolution first), circles ``'spots'`` (the
    spots under tissue, radius from the 100 µm spot size) and table ``'table'`` (raw counts in ``X``
    and ``layers['counts']``, ``obsm['spatial']`` in full-resolution pixels, array coordinates in
    ``obs``, ``uns['microns_per_pixel']``, ``uns['section']`` and ``uns['patient']``: the letter of the
    section's name, A–H). A list of these for a list of sections.
    """
    if isinstance(section, list | tuple):
        return [her2st(s, data_dir=data_dir) for s in section]
    reg = _registry()
    if section not in reg:
        raise InputError(f"Section {section!r} is not in the HER2+ dataset; sections: {sorted(reg)}.")
    kind = _image_kind(reg[section])
    if kind is None:
        raise InputError(
            f"Section {section!r} has no H&E image upstream; sections with images: {sections()}."
        )
    folder = Path(data_dir).expanduser() if data_dir is not None else settings.data_dir
    suffix = ".jpg" if kind == "image" else ".png"
    paths = {
        k: _fetch(name, *reg[section][k], folder)
        for k, name in (("counts", f"{section}.tsv.gz"), ("spots", f"{section}_selection.tsv"),
                        (kind, f"{section}{suffix}"))
    }
    paths["image"] = paths.pop(kind)
    return _build(section, paths, VIEWER_SCAN_WIDTH.get(section) if kind == "viewer" else None)


def microns_per_pixel(array_xy: np.ndarray, pixel_xy: np.ndarray) -> float:
    """Microns per image pixel from the 200 µm array pitch: slope of pixel against array position.

    ``array_xy``: the spots' (sub-spot) array coordinates (``new_x``, ``new_y``); ``pixel_xy``: their
    centres in the image's pixels. The mean of the x and y slopes of a least-squares line.
    """
    slope = np.mean([abs(np.polyfit(array_xy[:, i], pixel_xy[:, i], 1)[0]) for i in (0, 1)])
    return float(SPOT_PITCH_UM / slope)


def _build(section: str, paths: dict[str, Path], scan_width: int | None = None) -> Any:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sps
    from PIL import Image
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    from ._image import multiscale

    counts = pd.read_csv(paths["counts"], sep="\t", index_col=0)
    spots = pd.read_csv(paths["spots"], sep="\t")
    if "selected" in spots:
        spots = spots[spots["selected"] == 1]
    spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"], strict=True)]
    keep = [s for s in counts.index if s in spots.index]
    if len(keep) < len(counts):
        logger.info(
            f"her2st {section}: {len(counts) - len(keep)} spots of the count table are not under tissue."
        )
    counts, spots = counts.loc[keep], spots.loc[keep]

    max_pixels, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # a trusted, hash-checked image
    try:
        with Image.open(paths["image"]) as im:
            rgb = np.asarray(im.convert("RGB"))
    finally:
        Image.MAX_IMAGE_PIXELS = max_pixels
    if scan_width is not None:  # the viewer blacked out the glass; a scanner shows it near white
        rgb = np.where((rgb.max(-1) < BLACK_BELOW)[..., None], np.uint8(255), rgb)
    image = multiscale(np.moveaxis(rgb, -1, 0), [2, 2, 2], chunks=(3, 2048, 2048))
    ids = [f"{section}_{s}" for s in keep]
    xy = spots[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    if scan_width is not None:  # spot file in the original scan's frame, image a rendering of it
        xy = xy * (rgb.shape[1] / scan_width)
    # resolution from the array pitch, in the image's own pixels
    mpp = microns_per_pixel(spots[["new_x", "new_y"]].to_numpy(dtype=np.float64), xy)
    radius = SPOT_DIAMETER_UM / 2 / mpp
    shapes = ShapesModel.parse(
        xy, geometry=0, radius=np.full(len(xy), radius), index=pd.Index(ids, name="spot")
    )

    var_names = pd.Index(counts.columns.astype(str))
    x = sps.csr_matrix(counts.to_numpy(dtype=np.float32))
    obs = pd.DataFrame(
        {
            Keys.INSTANCE: ids,
            Keys.REGION: pd.Categorical([Keys.SHAPES] * len(ids)),
            "section": pd.Categorical([section] * len(ids)),
            "array_x": spots["x"].to_numpy(),
            "array_y": spots["y"].to_numpy(),
        },
        index=ids,
    )
    adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=var_names))
    adata.var_names_make_unique()
    adata.layers[Keys.COUNTS] = x.copy()
    adata.obsm[Keys.SPATIAL] = xy
    adata.uns[Keys.MPP] = float(mpp)
    adata.uns["section"] = section
    adata.uns["patient"] = section[0]  # the dataset's sections are named patient letter + number
    table = TableModel.parse(adata, region=Keys.SHAPES, region_key=Keys.REGION, instance_key=Keys.INSTANCE)
    return SpatialData(images={Keys.IMAGE: image}, shapes={Keys.SHAPES: shapes}, tables={Keys.TABLE: table})
