"""Patch geometry and reading: how wide a model's patch is on a section, and patches read in batches.

Patches are centred on spots, at one or more scales, read window by window from the lazy image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import InputError
from .._settings import logger
from ._record import Section

_TILE = 2048  # level pixels per side of the window read at once
_RESIZE_BYTES = 16 * 2**20  # float working memory of one resize step: patches are resized this many at once
# sections of known resolution trained on with one of unknown resolution are all read patch_px wide:
# refused when their resolutions differ by more than this factor (the patches' tissue widths would)
MIXED_TOLERANCE = 1.05


def patch_size_px(
    spots: Section, size: float | None, size_um: float | None, default: float | None = None
) -> float:
    """Patch side in level-0 pixels.

    From ``size`` (full-resolution pixels: the pixels the spot coordinates of Space Ranger, squidpy
    and scanpy count, which are the level-0 pixels unless only a downscaled image was read, see
    :attr:`Section.fullres_per_px`) or ``size_um`` (micrometres), else ``default`` pixels.
    """
    if size is None and size_um is None and default is not None:
        size = default
    if (size is None) == (size_um is None):
        raise InputError("Give exactly one of `size` (pixels) and `size_um` (micrometres).")
    if size_um is not None:
        if spots.microns_per_pixel is None:
            raise InputError(
                f"Section {spots.name!r} has no known resolution, "
                "so `size_um` cannot be converted to pixels: "
                "pass `size=` in pixels, or give its scale: `microns_per_pixel=` (µm per full-resolution "
                "pixel) or `spot_diameter_um=` (e.g. 100 for legacy ST), or set "
                "`table.uns['microns_per_pixel']`."
            )
        size = float(size_um) / spots.microns_per_pixel
        if not np.isfinite(size) or size <= 0:
            raise InputError(f"`size_um` must be a positive number of micrometres, got {size_um!r}.")
        return size
    if not np.isfinite(size) or size <= 0:
        raise InputError(f"`size` must be a positive number of pixels, got {size!r}.")
    return float(size) / float(spots.fullres_per_px)


@dataclass(frozen=True)
class PatchGeometry:
    """How wide a model's patches are: every section is read as the training sections were.

    Attributes
    ----------
    size_px
        Patch side (scale 1) in level-0 pixels of the first training section.
    size_um
        Patch side in micrometres; ``None`` when a training section had no known resolution (then
        every section is read ``size_px`` pixels wide).
    mpp
        Micrometres per level-0 pixel of the first training section, when known.
    image_size
        Side of the patch the network sees, in pixels.
    """

    size_px: float
    size_um: float | None
    mpp: float | None
    image_size: int

    @classmethod
    def of(
        cls, secs: Sequence[Section], patch_px: float, patch_um: float | None, image_size: int
    ) -> PatchGeometry:
        """Geometry of training on ``secs``.

        ``patch_um`` micrometres when given, else ``patch_px`` pixels of the first section, which is
        the same tissue width on every section when all resolutions are known. When some sections
        record their µm/px and others do not, every section is read ``patch_px`` pixels wide: refused
        when the known resolutions differ by more than :data:`MIXED_TOLERANCE` (the patches would cover
        different widths of tissue), else a warning names the sections read as if at the known one.
        """
        mpps = [sp.microns_per_pixel for sp in secs]
        known = all(m is not None for m in mpps)
        if patch_um is None and not known and any(m is not None for m in mpps):
            _check_mixed(secs, float(patch_px))
        if patch_um is not None:
            for sp in secs:  # names a section of unknown resolution, or a bad size
                patch_size_px(sp, None, patch_um)
            size_um = float(patch_um)
            size_px = size_um / mpps[0]
        else:
            size_px = patch_size_px(secs[0], patch_px, None)
            size_um = size_px * mpps[0] if known else None
        mpp = mpps[0] if known else None
        return cls(size_px=size_px, size_um=size_um, mpp=mpp, image_size=int(image_size))

    @classmethod
    def from_meta(cls, meta: dict[str, Any], config: Any) -> PatchGeometry:
        """Read the geometry a fitted model recorded (``patch_px``, ``patch_um``, ``microns_per_pixel``)."""
        size_um = meta.get("patch_um")
        if size_um is None and config.patch_um is not None:
            size_um = config.patch_um
        mpp = meta.get("microns_per_pixel")
        return cls(
            size_px=float(meta.get("patch_px") or config.patch_px),
            size_um=None if size_um is None else float(size_um),
            mpp=None if mpp is None else float(mpp),
            image_size=int(config.image_size),
        )

    def to_meta(self) -> dict[str, float | None]:
        """Return the keys :meth:`from_meta` reads (those of ``model.json``'s ``meta``)."""
        return {"patch_px": self.size_px, "patch_um": self.size_um, "microns_per_pixel": self.mpp}

    def size_on(self, spots: Section) -> float:
        """Patch side in level-0 pixels of ``spots``: ``size_um`` at its resolution, else ``size_px``.

        A section of unknown resolution is read ``size_px`` wide with a warning, given once per section
        (a call reads a section's patches more than once: its resampling record, then its patches).
        """
        if self.size_um is not None:
            if spots.microns_per_pixel is not None:
                return self.size_um / spots.microns_per_pixel
            if "unknown_resolution" not in spots.warned:
                spots.warned.add("unknown_resolution")
                logger.warning(
                    f"Section {spots.name!r} has no known resolution: its patches are read "
                    f"{self.size_px:.4g} px wide, {self.size_um:.4g} µm only if it is at the training "
                    f"resolution ({self.mpp} µm/px). Set `uns['microns_per_pixel']`, or pass "
                    "`microns_per_pixel=` or `spot_diameter_um=` (e.g. 100 for legacy ST), "
                    "to read it at its own."
                )
        return self.size_px


def _check_mixed(secs: Sequence[Section], patch_px: float) -> None:
    """Sections some of which record their µm/px: refuse differing resolutions, warn otherwise."""
    unknown = [sp.name for sp in secs if sp.microns_per_pixel is None]
    known = {sp.name: float(sp.microns_per_pixel) for sp in secs if sp.microns_per_pixel is not None}
    lo, hi = min(known.values()), max(known.values())
    fix = ("Record the resolution of every section (`table.uns['microns_per_pixel']`, "
           "`sdata.attrs['microns_per_pixel']`, `sr.io.read_slide(..., mpp=)`).")
    if hi > lo * MIXED_TOLERANCE:
        shown = ", ".join(f"{k!r} {v:.4g}" for k, v in list(known.items())[:5])
        raise InputError(
            f"Training sections {unknown[:5]} record no µm/px while the others are at different resolutions "
            f"({shown} µm/px): without every resolution the patches are read {patch_px:g} px wide on each "
            f"section, and cover different widths of tissue. {fix}"
        )
    logger.warning(
        f"Training sections {unknown[:5]} record no µm/px: their patches are read {patch_px:g} px wide, "
        f"as on the others at {lo:.4g} µm/px ({patch_px * lo:.4g} µm) only if they are at that resolution. "
        f"{fix}"
    )


def check_inside(spots: Section, on_outside: str = "raise") -> np.ndarray:
    """Boolean mask of spots whose centre lies inside the image; raise on any outside by default."""
    if on_outside not in ("raise", "pad"):
        raise InputError(f"`on_outside` must be 'raise' or 'pad', got {on_outside!r}.")
    if spots.image is None:
        raise InputError(f"Section {spots.name!r} has no image to cut patches from.")
    h, w = spots.image.shape
    c = spots.centers
    nan = ~np.isfinite(c).all(1)
    if nan.any():
        bad = np.flatnonzero(nan)
        names = list(spots.obs_names[bad[:5]]) if spots.table is not None else list(bad[:5])
        raise InputError(
            f"{len(bad)} of {spots.n_spots} spots of section {spots.name!r} have NaN or infinite "
            f"coordinates, e.g. {names}: drop them from the table and shapes."
        )
    inside = (c[:, 0] >= 0) & (c[:, 0] < w) & (c[:, 1] >= 0) & (c[:, 1] < h) & np.isfinite(c).all(1)
    if not inside.all():
        bad = np.flatnonzero(~inside)
        names = list(spots.obs_names[bad[:5]]) if spots.table is not None else list(bad[:5])
        msg = (
            f"{len(bad)} of {spots.n_spots} spots of section {spots.name!r} lie outside its image "
            f"({w} x {h} px), e.g. {names}. "
            "Check the transformations between shapes and image, or drop those spots from the table"
        )
        if on_outside == "raise":
            raise InputError(msg + "; `on_outside='pad'` keeps them as blank padded patches.")
        logger.warning(msg + "; their patches are padding.")
    return inside


class PatchReader:
    """Reads ``(b, n_scales, out_px, out_px, 3)`` uint8 patches of chosen spots of one section.

    Parameters
    ----------
    spots
        The section.
    size
        Patch side at scale 1, in level-0 pixels.
    scales
        Multipliers of ``size`` (1 = the spot patch, 2 = a context window twice as wide).
    out_px
        Output side in pixels; ``None`` keeps ``size`` (no resizing at scale 1).
    pad_value
        Value of pixels beyond the image border (255 = white background).
    """

    def __init__(
        self,
        spots: Section,
        size: float,
        scales: Sequence[float] = (1.0,),
        out_px: int | None = None,
        pad_value: int = 255,
    ) -> None:
        if spots.image is None:
            raise InputError(f"Section {spots.name!r} has no image to cut patches from.")
        self.spots = spots
        self.size = float(size)
        self.scales = [float(s) for s in scales]
        if not self.scales or any(not np.isfinite(s) or s <= 0 for s in self.scales):
            raise InputError(f"`scales` must be positive, got {list(scales)}.")
        self.out_px = int(round(size)) if out_px is None else int(out_px)
        if self.out_px < 4:
            raise InputError(f"`out_px` must be at least 4 pixels, got {self.out_px}.")
        self.pad_value = int(pad_value)

    def read(self, idx: np.ndarray | None = None, centers: np.ndarray | None = None) -> np.ndarray:
        """Patches of spots ``idx`` (or of explicit level-0 ``centers``), all scales."""
        c = self.spots.centers if centers is None else np.asarray(centers, dtype=np.float64)
        if idx is not None:
            c = c[np.asarray(idx)]
        out = np.empty((len(c), len(self.scales), self.out_px, self.out_px, 3), dtype=np.uint8)
        for j, s in enumerate(self.scales):
            out[:, j] = self._read_scale(c, self.size * s)
        return out

    def _read_scale(self, c: np.ndarray, side0: float) -> np.ndarray:
        img = self.spots.image
        level = img.level_for(side0 / self.out_px)
        s = img.scales[level]
        crop = max(int(round(side0 / s)), 1)
        x0 = np.floor(c[:, 0] / s - crop / 2 + 0.5).astype(np.int64)
        y0 = np.floor(c[:, 1] / s - crop / 2 + 0.5).astype(np.int64)
        res = np.empty((len(c), self.out_px, self.out_px, 3), dtype=np.uint8)
        # group spots by window so that each window is read once (no loop over spots)
        cell = max(_TILE, 2 * crop)
        key = (y0 // cell) * 1_000_003 + (x0 // cell)
        _, group = np.unique(key, return_inverse=True)
        ar = np.arange(crop)
        # crops are cut and resized a few at a time: the working memory is one window and one step's
        # crops, not the whole batch at the crop's size (and in float while resized)
        step = max(1, _RESIZE_BYTES // (crop * crop * 3 * 4))
        for g in range(int(group.max()) + 1 if len(c) else 0):
            m = np.flatnonzero(group == g)
            wy0, wx0 = int(y0[m].min()), int(x0[m].min())
            wy1, wx1 = int(y0[m].max()) + crop, int(x0[m].max()) + crop
            win = img.read(level, wy0, wy1, wx0, wx1, pad_value=self.pad_value)
            for k in range(0, len(m), step):
                mk = m[k : k + step]
                iy = (y0[mk] - wy0)[:, None] + ar[None, :]
                ix = (x0[mk] - wx0)[:, None] + ar[None, :]
                cut = win[iy[:, :, None], ix[:, None, :]]
                res[mk] = cut if crop == self.out_px else resize_batch(cut, self.out_px)
        return res


def resize_batch(x: np.ndarray, out_px: int) -> np.ndarray:
    """Antialiased bilinear resize of ``(b, h, w, 3)`` uint8 to ``(b, out_px, out_px, 3)``."""
    import torch
    import torch.nn.functional as F

    if len(x) == 0:
        return np.empty((0, out_px, out_px, 3), dtype=np.uint8)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    t = F.interpolate(t, size=(out_px, out_px), mode="bilinear", antialias=True, align_corners=False)
    return t.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
