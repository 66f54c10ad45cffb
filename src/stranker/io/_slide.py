"""Whole-slide images (SVS, NDPI, OME-TIFF, pyramidal TIFF) as lazily read SpatialData images."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from .._constants import Keys
from .._errors import InputError
from .._pixels import to_uint8, white_level
from .._settings import logger
from ..section._record import MPP_RANGE, check_mpp

# formats OpenSlide reads and tifffile does not (or not as well): vendor formats
_VENDOR = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}
_TIFF = {".tif", ".tiff", ".btf", ".tf2", ".tf8"}
_CHUNK = 1024  # pixels per side of a dask chunk (one lazy read)
_CACHE_BYTES = 16 * 3 * _CHUNK**2  # decoded windows kept per level: 16 chunks of RGB (48 MB)
_MICRONS = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "nm": 1e-3, "Å": 1e-4}


class _Level:
    """One pyramid level as a read-only ``(c, y, x)`` uint8 array that reads only the window asked for.

    ``dask.array.from_array`` cuts it into chunks; each chunk computed is one call of
    :meth:`__getitem__`, which reads that window from the file and nothing else. The windows read
    last are kept, up to ``_CACHE_BYTES`` (a few tens of MB), so that neighbouring patches read in
    consecutive batches do not decode the same part of the file again; a strided read (tissue
    detection) is not kept. Reader threads may ask for the same window at once: it is decoded once,
    the others wait for it.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, shape: tuple[int, int, int], read: Any, name: str) -> None:
        import threading
        from collections import OrderedDict

        self.shape = tuple(int(s) for s in shape)
        self._read = read  # (y0, y1, x0, x1) -> (y, x, c) array
        self.name = name
        self._cache: OrderedDict[tuple[int, int, int, int], np.ndarray] = OrderedDict()
        self._pending: dict[tuple[int, int, int, int], Any] = {}  # windows being decoded: their futures
        self._lock = threading.Lock()

    @property
    def cached_bytes(self) -> int:
        """Bytes of decoded windows held in the cache."""
        with self._lock:
            return sum(w.nbytes for w in self._cache.values())

    def _window(self, y0: int, y1: int, x0: int, x1: int, keep: bool = True) -> np.ndarray:
        from concurrent.futures import Future

        key = (y0, y1, x0, x1)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = Future()
                mine = True
            else:
                mine = False
        if not mine:  # another thread decodes this window: wait for it
            return pending.result()
        try:
            win = self._decode(y0, y1, x0, x1)
        except BaseException as e:  # the threads waiting for this window get the same error
            with self._lock:
                del self._pending[key]
            pending.set_exception(e)
            raise
        with self._lock:
            del self._pending[key]
            if keep and win.nbytes <= _CACHE_BYTES:
                self._cache[key] = win
                held = sum(w.nbytes for w in self._cache.values())
                while held > _CACHE_BYTES:
                    held -= self._cache.popitem(last=False)[1].nbytes
        pending.set_result(win)
        return win

    def _decode(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        try:
            return np.asarray(self._read(y0, y1, x0, x1))
        except Exception as e:  # a codec error deep in tifffile/zarr/OpenSlide: say which file and where
            raise InputError(
                f"{self.name}: cannot decode the region y {y0}:{y1}, x {x0}:{x1} ({type(e).__name__}: {e}); "
                "the file is damaged or truncated."
            ) from e

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        cs, ys, xs = key
        if not (isinstance(ys, slice) and isinstance(xs, slice)):
            raise TypeError(f"{self.name}: only slices index a slide level, not {ys!r}, {xs!r}.")
        y0, y1, dy = ys.indices(self.shape[1])
        x0, x1, dx = xs.indices(self.shape[2])
        if dy < 1 or dx < 1:
            raise ValueError(f"{self.name}: negative steps are not supported.")
        if y1 <= y0 or x1 <= x0:
            return np.zeros((self.shape[0], max(y1 - y0, 0), max(x1 - x0, 0)), dtype=np.uint8)[cs]
        # a strided read (dask passes the step through, e.g. tissue detection on a subsampled level)
        # keeps every step-th pixel of the window; the full window is decoded but not kept
        strided = dy > 1 or dx > 1
        win = self._window(y0, y1, x0, x1, keep=not strided)
        if strided:
            win = np.ascontiguousarray(win[::dy, ::dx])
        return np.moveaxis(win, -1, 0)[cs]


def read_slide(
    path: str | Path,
    *,
    mpp: float | None = None,
    backend: str | None = None,
    image_key: str = Keys.IMAGE,
    series: int = 0,
) -> Any:
    """Open a whole-slide image as a SpatialData whose image reads lazily from the file's pyramid.

    Parameters
    ----------
    path
        An SVS, NDPI, MRXS, SCN (read by OpenSlide), OME-TIFF or pyramidal TIFF (read by tifffile).
    mpp
        Microns per pixel of the full-resolution level, a number within
        :data:`stranker.section._record.MPP_RANGE` (0.05–20; a string such as ``'0.5'`` is refused);
        overrides what the file says. Needed when the file does not record its resolution, or records
        one outside that range: no resolution tags (TIFF's default, 1 pixel per inch, would be
        25 400 µm/px) or a screen resolution (72, 96, 300 dpi) is no microscope's scale, and is never
        read as one.
    backend
        ``'tifffile'`` or ``'openslide'``; by default OpenSlide for vendor formats and tifffile for TIFF.
    image_key
        Name of the image element.
    series
        Image series of a TIFF holding several (tifffile only).

    Returns
    -------
    A :class:`spatialdata.SpatialData` with one multiscale image ``image_key`` (one dask-backed scale
    per pyramid level of the file, in the ``'global'`` coordinate system of level-0 pixels). Nothing is
    read until a region is asked for. The resolution is stored as ``attrs['microns_per_pixel']`` of
    the image element and in ``sdata.attrs['microns_per_pixel'][image_key]``, where
    :func:`stranker.tl.predict` finds it.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Slide file {path} does not exist.")
    if mpp is not None:
        mpp = check_mpp(mpp, "`mpp=`", _MPP_FIX)
    ext = path.suffix.lower()
    if backend is None:
        backend = "openslide" if ext in _VENDOR else "tifffile"
    if backend == "openslide":
        levels, recorded, fmt = _open_openslide(path)
    elif backend == "tifffile":
        if ext in _VENDOR - {".svs", ".ndpi"}:
            raise InputError(f"{path.name}: tifffile cannot read {ext} slides; use `backend='openslide'`.")
        levels, recorded, fmt = _open_tifffile(path, series)
    else:
        raise InputError(f"`backend` must be 'tifffile' or 'openslide', got {backend!r}.")
    if mpp is not None:
        file_mpp = mpp
    else:
        file_mpp = _recorded_mpp(path.name, fmt, *recorded)
    logger.info(
        f"Opened {path.name} ({fmt}, {backend}): {len(levels)} level(s), level 0 "
        f"{levels[0].shape[2]} x {levels[0].shape[1]} px at {file_mpp:.4g} µm/px."
    )
    return _as_sdata(levels, float(file_mpp), image_key, str(path))


def _as_sdata(levels: list[_Level], mpp: float, image_key: str, source: str) -> Any:
    """Stack lazy levels into a spatialdata multiscale image (``scale0`` .. ``scaleN``)."""
    import dask.array as da
    import xarray as xr
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity, set_transformation
    from spatialdata.transformations._utils import compute_coordinates

    token = uuid.uuid4().hex
    nodes = {}
    for i, lv in enumerate(levels):
        arr = da.from_array(
            lv,
            chunks=(lv.shape[0], _CHUNK, _CHUNK),
            name=f"stranker-slide-{token}-{i}",
            asarray=False,
            lock=False,
            meta=np.empty((0, 0, 0), dtype=np.uint8),
        )
        c_coords = ["r", "g", "b"] if lv.shape[0] == 3 else [f"c{j}" for j in range(lv.shape[0])]
        nodes[f"scale{i}"] = xr.Dataset(
            {"image": xr.DataArray(arr, dims=("c", "y", "x"), coords={"c": c_coords})}
        )
    tree = xr.DataTree.from_dict(nodes)
    set_transformation(tree, {"global": Identity()}, set_all=True)
    tree = compute_coordinates(tree)
    Image2DModel().validate(tree)
    tree.attrs[Keys.MPP] = mpp
    tree.attrs["source"] = source
    sdata = SpatialData(images={image_key: tree})
    sdata.attrs[Keys.MPP] = {image_key: mpp}
    return sdata


_MPP_FIX = "Pass the scan's µm per pixel, e.g. `mpp=0.5` for a 20x scan, `0.25` for 40x."


def _recorded_mpp(name: str, fmt: str, value: Any, where: str) -> float:
    """Return the resolution a file records (``value``, read from ``where``), or refuse naming ``mpp=``.

    A value that is not a positive number within :data:`~stranker.section._record.MPP_RANGE` is no
    microscope's scale (TIFF's default of 1 dpi, a screen resolution): the resolution is unknown.
    """
    fix = (f"pass `mpp=`: `sr.io.read_slide({name!r}, mpp=...)`, e.g. `mpp=0.5` for a 20x scan, "
           "`0.25` for 40x.")
    if value is None:
        raise InputError(
            f"{name} ({fmt}) does not record its resolution (no microns per pixel in its metadata); {fix}"
        )
    try:
        return check_mpp(value, f"{name} ({fmt}): the resolution its {where} records", text=True)
    except InputError as e:
        lo, hi = MPP_RANGE
        shown = f"{value:.4g}" if isinstance(value, float) else repr(value)
        raise InputError(
            f"{name} ({fmt}) records no microscope resolution: its {where} say {shown} µm/px, not a "
            f"positive number within {lo:g}–{hi:g} µm/px (TIFF's default of 1 pixel per inch is "
            f"25 400 µm/px; the screen resolutions 72, 96, 300 dpi are 353, 265, 85 µm/px); {fix}"
        ) from e


# --------------------------------------------------------------------------------------------
# tifffile
# --------------------------------------------------------------------------------------------
def _open_tifffile(path: Path, series: int) -> tuple[list[_Level], tuple[Any, str], str]:
    try:
        import tifffile
        import zarr
    except ImportError as e:  # pragma: no cover - both are dependencies
        raise InputError(
            f"Reading TIFF slides needs tifffile and zarr ({e}); `pip install tifffile zarr`."
        ) from e
    try:
        tif = tifffile.TiffFile(path)
    except Exception as e:
        raise InputError(
            f"{path.name} is not a TIFF file tifffile can read ({e}). For vendor formats "
            "(SVS, NDPI, MRXS) use `backend='openslide'`."
        ) from e
    if series >= len(tif.series):
        raise InputError(f"{path.name} has {len(tif.series)} image series; `series={series}` does not exist.")
    s = tif.series[series]
    _check_complete(path, s)
    store = zarr.open(s.aszarr(), mode="r")
    arrays = [store[k] for k in sorted(store.keys(), key=int)] if hasattr(store, "keys") else [store]
    fmt = "OME-TIFF" if tif.is_ome else ("SVS" if tif.is_svs else ("NDPI" if tif.is_ndpi else "TIFF"))
    raw = []
    for lv, arr in zip(s.levels, arrays, strict=True):
        axes = lv.axes
        squeeze = tuple(j for j, a in enumerate(axes) if a not in "YXSC" and lv.shape[j] == 1)
        rest = "".join(a for j, a in enumerate(axes) if j not in squeeze)
        if set(rest) - set("YXSC") or "Y" not in rest or "X" not in rest:
            raise InputError(
                f"{path.name}: image axes {axes!r} (shape {lv.shape}) are not a 2-D (RGB) image."
            )
        if len(rest) == 2:
            rest += "S"
        order = [rest.index("Y"), rest.index("X"), rest.index("S" if "S" in rest else "C")]
        shape = tuple(lv.shape[j] for j in range(len(axes)) if j not in squeeze)
        h, w, c = shape[order[0]], shape[order[1]], (shape[order[2]] if len(shape) == 3 else 1)
        raw.append(((c, h, w), _tiff_reader(arr, squeeze, order, len(axes))))
    # the pixel range (the value that is white) is the same for all levels: decided once, from the
    # values of the coarsest level, by the rule of stranker._pixels (None for uint8)
    (_, h, w), read = raw[-1]
    rows = max(1, _CHUNK * _CHUNK // max(w, 1))
    try:
        white = white_level(
            (read(y0, min(y0 + rows, h), 0, w)[..., :3] for y0 in range(0, h, rows)), s.dtype, path.name
        )
    except InputError:
        raise
    except Exception as e:  # a codec error deep in tifffile/zarr
        raise InputError(
            f"{path.name}: cannot decode its coarsest level ({type(e).__name__}: {e}); the file is damaged "
            "or truncated."
        ) from e
    levels = [
        _Level(shape, lambda *win, read=read: to_uint8(read(*win), white), f"{path.name}[{i}]")
        for i, (shape, read) in enumerate(raw)
    ]
    return levels, _tiff_mpp(tif, s), fmt


def _check_complete(path: Path, s: Any) -> None:
    """Refuse a TIFF whose image data (tiles or strips of any level) reach beyond the end of the file."""
    size = path.stat().st_size
    for i, lv in enumerate(s.levels):
        for page in lv.pages:
            if page is None or not hasattr(page, "dataoffsets"):
                continue
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=False) if n]
            if ends and max(ends) > size:
                raise InputError(
                    f"{path.name} is truncated: the image data of level {i} end at byte {max(ends)} but the "
                    f"file has {size} bytes. Copy or download it again."
                )


def _tiff_reader(arr: Any, squeeze: tuple[int, ...], order: list[int], ndim: int):
    """Return ``read(y0, y1, x0, x1)``: a window of a level as ``(y, x, c)`` values of the file's dtype."""

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        key: list[Any] = [slice(None)] * ndim
        kept = [j for j in range(ndim) if j not in squeeze]
        for j in squeeze:
            key[j] = 0
        key[kept[order[0]]] = slice(y0, y1)
        key[kept[order[1]]] = slice(x0, x1)
        win = np.asarray(arr[tuple(key)])
        if win.ndim == 2:
            win = win[..., None]
        return np.transpose(win, order)

    return read


def _tiff_mpp(tif: Any, s: Any) -> tuple[Any, str]:
    """Microns per pixel from OME metadata, the Aperio description, or the TIFF resolution tags.

    Returns the value as recorded (unchecked; ``None`` when the file records none) and where it was
    read, for :func:`_recorded_mpp`. A TIFF without resolution tags is TIFF's default of 1 pixel per
    inch (25 400 µm/px), which :func:`_recorded_mpp` refuses as no microscope's scale.
    """
    if tif.is_ome and tif.ome_metadata:
        m = re.search(r"<Pixels[^>]*>", tif.ome_metadata)
        if m:
            size = re.search(r'PhysicalSizeX="([^"]+)"', m.group(0))
            unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', m.group(0))
            if size:
                u = unit.group(1) if unit else "µm"
                if u in _MICRONS:
                    try:
                        return float(size.group(1)) * _MICRONS[u], f"OME PhysicalSizeX ({size.group(1)} {u})"
                    except ValueError:
                        return size.group(1), "OME PhysicalSizeX"
    page = s.levels[0].keyframe
    if tif.is_svs:
        import tifffile

        meta = tifffile.svs_description_metadata(page.description)
        if meta.get("MPP"):
            return meta["MPP"], "Aperio description (MPP)"
    try:
        unit = int(page.resolutionunit)
        xres = float(page.resolution[0])
    except (AttributeError, TypeError, ValueError, IndexError):
        return None, "resolution tags"
    # inch, centimetre, millimetre, micrometre (the last two are tifffile's extensions) in micrometres
    per_unit = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}.get(unit)
    if per_unit is None:  # RESUNIT NONE: the tags give an aspect ratio, not a size
        return None, "resolution tags"
    name = {2: "inch", 3: "centimetre", 4: "millimetre", 5: "micrometre"}[unit]
    if page.tags.get(282) is None:
        return per_unit / xres, f"resolution tags (none: TIFF's default, {xres:g} pixel per {name})"
    if not xres > 0:
        return xres, f"resolution tags ({xres:g} pixels per {name})"
    return per_unit / xres, f"resolution tags ({xres:g} pixels per {name})"


# --------------------------------------------------------------------------------------------
# OpenSlide
# --------------------------------------------------------------------------------------------
def _open_openslide(path: Path) -> tuple[list[_Level], tuple[Any, str], str]:
    try:
        import openslide
    except (ImportError, OSError) as e:
        raise InputError(
            f"Reading {path.suffix} slides needs OpenSlide ({e}). Install it with "
            "`pip install 'stranker[wsi]'` (the openslide-bin and openslide-python wheels); "
            "TIFF-based SVS/NDPI files can also be read with `backend='tifffile'`."
        ) from e
    try:
        osl = openslide.OpenSlide(str(path))
    except openslide.OpenSlideError as e:
        raise InputError(f"OpenSlide cannot read {path.name}: {e}") from e
    props = osl.properties
    mpp = props.get(openslide.PROPERTY_NAME_MPP_X)
    fmt = props.get(openslide.PROPERTY_NAME_VENDOR, "openslide")
    levels = []
    for i, ((w, h), ds) in enumerate(zip(osl.level_dimensions, osl.level_downsamples, strict=True)):
        levels.append(_Level((3, h, w), _openslide_reader(osl, i, float(ds)), f"{path.name}[{i}]"))
    return levels, (mpp or None, f"OpenSlide property {openslide.PROPERTY_NAME_MPP_X!r}"), fmt


def _openslide_reader(osl: Any, level: int, downsample: float):
    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        # OpenSlide places the region by its level-0 corner; transparent (outside) pixels become white
        rgba = np.asarray(
            osl.read_region(
                (int(round(x0 * downsample)), int(round(y0 * downsample))), level, (x1 - x0, y1 - y0)
            )
        )
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 255
        return rgb

    return read
