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


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """``(b, 3, h, w)`` RGB in [0, 1] -> haematoxylin, eosin, DAB optical densities (rgb2hed)."""
    log_adjust = torch.log(torch.tensor(1e-6, device=x.device))
    od = torch.log(x.clamp_min(1e-6)) / log_adjust
    hed = torch.einsum("bchw,cd->bdhw", od, _HED_FROM_RGB.to(x.device, x.dtype))
    return hed.clamp_min(0)


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
