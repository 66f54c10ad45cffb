"""Features of a frozen backbone for every spot, computed once and reused by later fits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._constants import Keys
from .._settings import settings
from .._spots import InputError, as_spots
from .._undo import unchanged_on_failure
from .._write import maybe_copy, write_results
from ._patches import PatchReader, check_inside, patch_size_px


@unchanged_on_failure()
def embed_patches(
    data: Any,
    backbone: Any = "resnet18",
    *,
    weights: str | None = None,
    size: float | None = None,
    size_um: float | None = None,
    scales: float | Sequence[float] = 1.0,
    image_size: int = 112,
    batch_size: int = 128,
    device: str | None = None,
    key_added: str | None = None,
    copy: bool = False,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    library_id: str | None = None,
    bin_size: int | None = None,
) -> Any:
    """Features of a frozen image backbone for the patch of every spot, into ``obsm``.

    Each section's patches are read in batches from its (lazy) image and fed to the backbone in
    eval mode; nothing but the features is kept. Train on them later with
    ``sr.tl.fit(..., image_features=key_added)``: the backbone then costs nothing per epoch.

    Parameters
    ----------
    data
        SpatialData, AnnData in squidpy layout, or a list of either.
    backbone
        A timm model name (weights from ``weights``, else timm's cache, else random), a fitted
        :class:`stranker.Model` (its teacher's backbone, patch size and input size), or a
        ``torch.nn.Module`` mapping ``(b, 3, h, w)`` ImageNet-normalised images to ``(b, d)``.
    weights
        Local checkpoint file of a timm backbone.
    size, size_um
        Patch side in level-0 pixels (default 224), or in micrometres; ignored for a Model.
    scales
        One multiplier of the patch side or several; features of the scales are concatenated.
    image_size
        Side in pixels the patches are resized to before the backbone; ignored for a Model.
    batch_size
        Spots per forward pass.
    device
        Torch device; default ``sr.settings.device``.
    key_added
        ``obsm`` key; default ``'X_<backbone name>'``.
    copy
        Return a modified copy instead of writing in place.
    image_key, shapes_key, table_key, library_id
        Which elements to use when an object has several.
    bin_size
        Visium HD: the bin size in µm (2, 8, 16) whose table and squares to use; the same as
        ``table_key='square_{bin_size:03d}um'``.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes ``obsm[key_added]``: float32 ``(n_spots, d)``
    features (``d`` = backbone features times the number of scales).
    """
    import torch

    from ..model.encoders import create_backbone
    from ..train.loop import resolve_device, to_input

    dev = resolve_device(device or settings.device)
    scale_list = [float(scales)] if np.ndim(scales) == 0 else [float(s) for s in scales]  # type: ignore[arg-type]
    model = None
    if type(backbone).__name__ == "Model" and hasattr(backbone, "aligner"):
        model = backbone
        branch = model.aligner.teacher
        if branch.backbone is None:
            raise InputError(
                "This model was trained on precomputed features; it has no image backbone to embed with."
            )
        net, name = branch.backbone, model.config.backbone
        mean, std = branch.pix_mean.cpu(), branch.pix_std.cpu()
        scale_list, image_size = list(model.config.scales), model.config.image_size
    elif isinstance(backbone, str):
        net, _ = create_backbone(backbone, weights)
        name = backbone
        cfg = getattr(net, "pretrained_cfg", {}) or {}
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1)
    elif isinstance(backbone, torch.nn.Module):
        net, name = backbone, type(backbone).__name__.lower()
        mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
        std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    else:
        raise InputError(
            "`backbone` must be a timm model name, a fitted stranker.Model or a torch.nn.Module, "
            f"got {type(backbone)}."
        )
    if batch_size < 1:
        raise InputError(f"`batch_size` must be at least 1, got {batch_size}.")
    key = key_added or f"X_{name}"
    if key == Keys.SPATIAL:
        raise InputError("`key_added='spatial'` would overwrite the spot coordinates: choose another name.")
    data = maybe_copy(data, copy)
    secs = as_spots(
        data, image_key=image_key, shapes_key=shapes_key, table_key=table_key,
        library_id=library_id, bin_size=bin_size,
    )
    readers = []
    for sp in secs:
        check_inside(sp)
        readers.append(model._reader(sp) if model is not None
                       else PatchReader(sp, patch_size_px(sp, size, size_um, 224), scale_list, image_size))
    was_training = net.training
    net = net.to(dev).eval()
    mean, std = mean.to(dev), std.to(dev)
    results = []
    try:
        for sp, reader in zip(secs, readers, strict=True):
            out = []
            for start in range(0, sp.n_spots, batch_size):
                x = to_input(
                    torch.from_numpy(reader.read(np.arange(start, min(start + batch_size, sp.n_spots)))), dev
                )
                b, s = x.shape[:2]
                with torch.no_grad(), torch.autocast(
                    dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"
                ):
                    f = net(((x.flatten(0, 1) - mean) / std).contiguous())
                out.append(f.float().reshape(b, -1).cpu().numpy())
            feats = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
            if not np.isfinite(feats).all():
                raise InputError(f"The backbone gave NaN or infinite features on section {sp.name!r}.")
            results.append(feats.astype(np.float32))
    finally:
        net.train(was_training)
    for sp, feats in zip(secs, results, strict=True):
        write_results(sp, obsm={key: feats})
    return data if copy else None
