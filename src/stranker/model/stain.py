"""Colour and stain statistics of patches, computed on the device in one batched pass."""

from __future__ import annotations

import torch

# Ruifrok & Johnston H&E-DAB stain vectors (as in scikit-image's rgb2hed)
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64
)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED).float()
N_BINS = 16
N_STAIN = 3 + 3 + 3 + 3 + 9 + N_BINS + 1  # 38 per scale


_LOG_ADJUST = float(torch.log(torch.tensor(1e-6, dtype=torch.float64)))


def rgb_to_hed(x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """``(b, 3, h, w)`` RGB in [0, 1] -> haematoxylin, eosin, DAB optical densities (rgb2hed).

    ``clamp=False`` keeps negative densities, so that :func:`hed_to_rgb` inverts it exactly.
    """
    od = torch.log(x.clamp_min(1e-6)) / _LOG_ADJUST
    hed = torch.einsum("bchw,cd->bdhw", od, _HED_FROM_RGB.to(x.device, x.dtype))
    return hed.clamp_min(0) if clamp else hed


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed` (``clamp=False``): ``(b, 3, h, w)`` HED -> RGB in [0, 1] (hed2rgb)."""
    od = torch.einsum("bdhw,dc->bchw", hed, _RGB_FROM_HED.to(hed.device, hed.dtype))
    return torch.exp(od * _LOG_ADJUST).clamp(0, 1)


# sRGB (D65) <-> CIE L*a*b*
_XYZ_FROM_RGB = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=torch.float64,
)
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB).float()
_XYZ_FROM_RGB = _XYZ_FROM_RGB.float()
_WHITE = (0.95047, 1.0, 1.08883)
# Reinhard target: per-patch mean and sd of L*, a*, b* over tissue pixels, averaged over the spot
# patches of her2st C2-C5 (160 µm, read at 112 px)
REINHARD_TARGET = ((54.2, 15.6, -21.4), (18.0, 3.9, 7.7))


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """``(b, 3, h, w)`` sRGB in [0, 1] -> CIE L*a*b* (D65), as scikit-image's ``rgb2lab``."""
    lin = torch.where(x > 0.04045, ((x.clamp_min(0) + 0.055) / 1.055) ** 2.4, x / 12.92)
    xyz = torch.einsum("bchw,dc->bdhw", lin, _XYZ_FROM_RGB.to(x.device, x.dtype))
    xyz = xyz / torch.tensor(_WHITE, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_lab`, clipped to [0, 1]."""
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16 / 116) / 7.787)
    xyz = xyz * torch.tensor(_WHITE, device=lab.device, dtype=lab.dtype).view(1, 3, 1, 1)
    lin = torch.einsum("bchw,dc->bdhw", xyz, _RGB_FROM_XYZ.to(lab.device, lab.dtype)).clamp(0, 1)
    return torch.where(lin > 0.0031308, 1.055 * lin ** (1 / 2.4) - 0.055, 12.92 * lin).clamp(0, 1)


def tissue_weights(x: torch.Tensor) -> torch.Tensor:
    """``(b, 1, h, w)`` 1 on tissue pixels, 0 on white (grey > 0.85) or black (grey < 0.08) background.

    A patch with fewer than 16 tissue pixels counts all its pixels.
    """
    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    w = ((grey > 0.08) & (grey < 0.85)).to(x.dtype)
    few = w.flatten(1).sum(1) < 16
    return torch.where(few.view(-1, 1, 1, 1), torch.ones_like(w), w)


def reinhard(x: torch.Tensor, target: tuple[tuple[float, ...], tuple[float, ...]] = REINHARD_TARGET
             ) -> torch.Tensor:
    """Reinhard colour normalisation of each patch: its tissue's L*a*b* mean and sd mapped onto ``target``.

    Parameters
    ----------
    x
        ``(b, 3, h, w)`` RGB in [0, 1].
    target
        ``(mean, sd)`` of L*, a*, b* to map onto (default: tissue of her2st C2-C5).

    Returns
    -------
    ``(b, 3, h, w)`` RGB in [0, 1]. Statistics are taken over tissue pixels only
    (:func:`tissue_weights`), so a white or blacked-out background does not set them.
    """
    dt = x.dtype
    x = x.float()
    lab = rgb_to_lab(x)
    w = tissue_weights(x)
    n = w.sum((2, 3), keepdim=True)
    mu = (lab * w).sum((2, 3), keepdim=True) / n
    sd = (((lab - mu) ** 2 * w).sum((2, 3), keepdim=True) / n).sqrt().clamp_min(1e-3)
    t_mu = torch.tensor(target[0], device=x.device).view(1, 3, 1, 1)
    t_sd = torch.tensor(target[1], device=x.device).view(1, 3, 1, 1)
    return lab_to_rgb((lab - mu) / sd * t_sd + t_mu).to(dt)


@torch.no_grad()
def stain_features(x: torch.Tensor) -> torch.Tensor:
    """38 colour/stain statistics per patch.

    RGB mean and sd; HED mean, sd and 10/50/90th percentiles; a 16-bin grey histogram; the
    fraction of non-background (grey < 0.8) pixels.

    Parameters
    ----------
    x
        ``(b, 3, h, w)`` float RGB in [0, 1].

    Returns
    -------
    ``(b, 38)`` float32.
    """
    x = x.float()
    b = x.shape[0]
    flat = x.flatten(2)
    hed = rgb_to_hed(x).flatten(2)
    grey = (0.299 * flat[:, 0] + 0.587 * flat[:, 1] + 0.114 * flat[:, 2]).clamp(0, 1)
    q = torch.quantile(hed, torch.tensor([0.1, 0.5, 0.9], device=x.device), dim=2)  # (3, b, 3)
    idx = (grey * N_BINS).long().clamp_(0, N_BINS - 1)
    hist = torch.zeros(b, N_BINS, device=x.device).scatter_add_(1, idx, torch.ones_like(grey)) / grey.shape[1]
    tissue = (grey < 0.8).float().mean(1, keepdim=True)
    return torch.cat(
        [
            flat.mean(2), flat.std(2), hed.mean(2) * 10, hed.std(2) * 10,
            q.permute(1, 0, 2).reshape(b, 9) * 10, hist, tissue,
        ],
        dim=1,
    )
