"""Batched augmentation on the device: weak (dihedral) and strong (+ colour and stain jitter)."""

from __future__ import annotations

import torch

JITTER_LEVELS = 4  # resolution jitter: steps of lowered resolution above 1 (unchanged)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Return the k-th (0..7) of the 8 flips/rotations of ``(..., h, w)`` images."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


Part = tuple[int, int, int]  # (start, stop, total): x holds rows start:stop of a batch of total rows


def _n(x: torch.Tensor, part: Part | None) -> int:
    return x.shape[0] if part is None else part[2]


def _rows(t: torch.Tensor, part: Part | None) -> torch.Tensor:
    return t if part is None else t[part[0] : part[1]]


def random_dihedral(x: torch.Tensor, gen: torch.Generator, part: Part | None = None) -> torch.Tensor:
    """Each sample of ``(b, ..., h, w)`` gets its own random flip/rotation.

    Done in 8 groups, not a loop over spots.
    """
    ks = _rows(torch.randint(0, 8, (_n(x, part),), generator=gen, device="cpu"), part).to(x.device)
    out = torch.empty_like(x)
    for k in range(8):
        m = ks == k
        if m.any():
            out[m] = dihedral(x[m], k)
    return out


def colour_jitter(
    x: torch.Tensor, gen: torch.Generator, strength: float, part: Part | None = None
) -> torch.Tensor:
    """Per-sample brightness, contrast, saturation and stain-channel jitter of images in [0, 1].

    ``x``: ``(b, ..., 3, h, w)``.
    """
    b = _n(x, part)
    shape = (b,) + (1,) * (x.dim() - 1)

    def u(lo: float, hi: float, shp=shape) -> torch.Tensor:
        return _rows(torch.rand(shp, generator=gen) * (hi - lo) + lo, part).to(x.device, x.dtype)

    s = strength
    x = x * u(1 - 0.2 * s, 1 + 0.2 * s)  # brightness
    mean = x.mean(dim=(-3, -2, -1), keepdim=True)
    x = (x - mean) * u(1 - 0.2 * s, 1 + 0.2 * s) + mean  # contrast
    grey = x.mean(dim=-3, keepdim=True)
    x = (x - grey) * u(1 - 0.3 * s, 1 + 0.3 * s) + grey  # saturation
    ch_shape = (b,) + (1,) * (x.dim() - 4) + (3, 1, 1)
    # per-channel stain shift
    x = x * u(1 - 0.05 * s, 1 + 0.05 * s, ch_shape) + u(-0.03 * s, 0.03 * s, ch_shape)
    return x.clamp(0, 1)


def hed_jitter(x: torch.Tensor, gen: torch.Generator, sigma: float, part: Part | None = None) -> torch.Tensor:
    """Per-sample stain jitter in haematoxylin-eosin-DAB space (Tellez et al. 2018).

    Each image's HED optical densities (Ruifrok & Johnston vectors, scikit-image's ``rgb2hed``
    scaling) become ``alpha * hed + beta`` with ``alpha ~ U(1 - sigma, 1 + sigma)`` and
    ``beta ~ U(-sigma, sigma)`` drawn per channel, then go back to RGB. Tellez et al. call
    ``sigma = 0.05`` light and ``0.2`` strong.

    Parameters
    ----------
    x
        ``(b, ..., 3, h, w)`` RGB in [0, 1].
    gen
        Generator of the random draws (on the CPU).
    sigma
        Strength of the jitter.
    part
        As in :func:`augment`.

    Returns
    -------
    The jittered images, in [0, 1].
    """
    from .stain import hed_to_rgb, rgb_to_hed

    b = _n(x, part)
    shape = (b,) + (1,) * (x.dim() - 4) + (3, 1, 1)
    alpha = _rows(1 + sigma * (2 * torch.rand(shape, generator=gen) - 1), part).to(x.device, x.dtype)
    beta = _rows(sigma * (2 * torch.rand(shape, generator=gen) - 1), part).to(x.device, x.dtype)
    lead = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:])
    hed = rgb_to_hed(flat, clamp=False).reshape(x.shape)
    return hed_to_rgb((hed * alpha + beta).reshape(flat.shape)).reshape(*lead, *x.shape[-3:])


def degrade(
    x: torch.Tensor, gen: torch.Generator, max_factor: float, part: Part | None = None,
    levels: int = JITTER_LEVELS, keep: float | None = None,
) -> torch.Tensor:
    """Per-sample loss of resolution: downsample by a random factor in [1, ``max_factor``], upsample back.

    The factor of each image is one of ``levels + 1`` steps, log-uniform from 1 (unchanged) to
    ``max_factor``; images of one step are resampled together (a loop over steps, not spots). A model
    trained so reads a slide scanned or rendered at a coarser resolution than its training slides
    (whose patches are upsampled to the input size) as it reads its own.

    Parameters
    ----------
    x
        ``(b, ..., 3, h, w)`` images.
    gen
        Generator of the random draws (on the CPU).
    max_factor
        The coarsest loss of resolution, e.g. 3: down to a third of the pixels per side.
    part
        As in :func:`augment`.
    levels
        Number of steps above 1.
    keep
        Share of images left unchanged; the others take one of the ``levels`` lowered steps, each
        alike. ``None``: every step alike, so ``1 / (levels + 1)`` are unchanged.

    Returns
    -------
    Images of the same shape.
    """
    if max_factor <= 1:
        return x
    if keep is None:
        steps = _rows(torch.randint(0, levels + 1, (_n(x, part),), generator=gen), part)
    else:
        u = _rows(torch.rand(_n(x, part), generator=gen), part)
        lowered = 1 + ((u - keep) / max(1 - keep, 1e-12) * levels).long().clamp(0, levels - 1)
        steps = torch.where(u < keep, torch.zeros_like(lowered), lowered)
    out = x.clone()
    flat_shape = x.shape[1:-3]
    for k in range(1, levels + 1):
        m = (steps == k).to(x.device)
        if not m.any():
            continue
        f = max_factor ** (k / levels)
        back = lower_resolution(x[m].reshape(-1, *x.shape[-3:]), f)
        out[m] = back.reshape(-1, *flat_shape, *x.shape[-3:])
    return out


def random_crop(
    x: torch.Tensor, gen: torch.Generator, max_crop: float, part: Part | None = None
) -> torch.Tensor:
    """Per-sample random crop of ``1 - max_crop`` to 1 of the side, at a random place, resized back.

    Done for the whole batch at once (one ``grid_sample``); every scale of a sample is cropped alike.
    The spot's centre stays inside every crop for ``max_crop < 1``.

    Parameters
    ----------
    x
        ``(b, ..., 3, h, w)`` images.
    gen
        Generator of the random draws (on the CPU).
    max_crop
        Largest fraction of the side cut away, e.g. 0.25: crops of 75-100 % of the side.
    part
        As in :func:`augment`.

    Returns
    -------
    Images of the same shape.
    """
    import torch.nn.functional as F

    if max_crop <= 0:
        return x
    b = _n(x, part)
    side = _rows(1 - max_crop * torch.rand(b, generator=gen), part)
    shift = _rows(2 * torch.rand(b, 2, generator=gen) - 1, part) * (1 - side)[:, None]
    reps = x.shape[1:-3].numel()  # scales per sample
    theta = torch.zeros(len(side), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = side
    theta[:, :, 2] = shift
    theta = theta.repeat_interleave(reps, dim=0).to(x.device, x.dtype)
    flat = x.reshape(-1, *x.shape[-3:])
    grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(x.shape).clamp(0, 1)


def lower_resolution(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``(n, 3, h, w)`` images downsampled by ``factor`` (bilinear, antialiased) and upsampled back."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h / factor)), max(1, round(w / factor))), mode="bilinear",
                          antialias=True, align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


def augment(
    x: torch.Tensor, gen: torch.Generator, strong: bool, part: Part | None = None, hed: float = 0.0,
    resolution: float = 1.0, crop: float = 0.0, resolution_keep: float | None = None,
) -> torch.Tensor:
    """Weak view: random dihedral. Strong view: dihedral, colour/stain jitter and pixel noise.

    ``part=(start, stop, total)`` says that ``x`` holds rows ``start:stop`` of a batch of ``total``
    rows (one process's share under distributed training): the random draws are those of the whole
    batch, so each process augments its rows exactly as a single process would. ``hed > 0`` adds
    :func:`hed_jitter` of that strength to both views (no random draws are taken when it is 0);
    ``resolution > 1`` adds :func:`degrade` up to that factor, leaving ``resolution_keep`` of the
    patches unchanged (``None``: one in ``levels + 1``); ``crop > 0`` first takes a
    :func:`random_crop` of each patch (no draws are taken when it is 0).
    """
    x = random_dihedral(x, gen, part)
    if crop > 0:
        x = random_crop(x, gen, crop, part)
    if resolution > 1:
        x = degrade(x, gen, resolution, part, keep=resolution_keep)
    if hed > 0:
        x = hed_jitter(x, gen, hed, part)
    if strong:
        x = colour_jitter(x, gen, 1.0, part)
        noise = _rows(torch.randn((_n(x, part), *x.shape[1:]), generator=gen), part)
        x = (x + 0.02 * noise.to(x.device, x.dtype)).clamp(0, 1)
    else:
        x = colour_jitter(x, gen, 0.3, part)
    return x
