"""Features of a frozen backbone for every spot, computed once and reused by later fits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._constants import Keys
from .._docs import doc_params
from .._errors import InputError
from .._settings import logger, settings
from ..section import as_sections
from ..section.patches import PatchReader, check_inside, patch_size_px
from ..spots import SpotInputs, device_of, run_batches
from ..write import maybe_copy, unchanged_on_failure, write_results


@unchanged_on_failure()
@doc_params()
def embed_patches(
    data: Any,
    backbone: Any = "resnet18",
    *,
    weights: str | None = None,
    pretrained: bool = True,
    size: float | None = None,
    size_um: float | None = None,
    scales: float | Sequence[float] = 1.0,
    image_size: int | None = None,
    batch_size: int = 128,
    device: str | None = None,
    key_added: str | None = None,
    copy: bool = False,
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    library_id: str | None = None,
    library_key: str | None = None,
    bin_size: int | None = None,
    spot_diameter_um: float | None = None,
    microns_per_pixel: float | None = None,
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
        A named foundation model (``'uni'``, ``'h-optimus-0'``, ... :func:`stranker.tl.backbones`),
        ``'hf-hub:ORG/NAME'`` or a timm model name; a fitted :class:`stranker.Model` (its teacher's
        backbone, patch size and input size); or a ``torch.nn.Module`` mapping ``(b, 3, h, w)``
        ImageNet-normalised images to ``(b, d)`` (left on its device and in its mode afterwards).
    weights
        Local state dict of the backbone. Without it: the Hugging Face cache, else a download when
        ``sr.settings.allow_download``; else an error saying how to get the weights.
    pretrained
        ``False``: random weights (a warning says so).
    size, size_um
        Patch side in full-resolution pixels, or in micrometres; ignored for a Model. Default: the physical
        size a named model was trained at (e.g. 112 µm: 224 px at 0.5 µm/px), else 224 px.
    scales
        One multiplier of the patch side or several; features of the scales are concatenated.
    image_size
        Side in pixels the patches are resized to before the backbone; ignored for a Model. Default:
        a named model's input size, else 112. A backbone of one input size (a ViT with a fixed patch
        grid) refuses others, as :func:`stranker.tl.fit` does.
    batch_size
        Spots per forward pass.
    device
        Torch device; default ``sr.settings.device``.
    key_added
        ``obsm`` key; default ``'X_<backbone name>'``.
    copy
        Return a modified copy instead of writing in place.
    {doc_elements}
    {doc_library_key}
    {doc_bin_size}
    {doc_resolution}

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes ``obsm[key_added]``: float32 ``(n_spots, d)``
    features (``d`` = backbone features times the number of scales), and ``uns[key_added]``: where
    they came from (``backbone``, ``weights_source``, ``patch_px``, ``patch_um``, ``microns_per_pixel``,
    ``image_size``, ``scales``, ``mean``, ``std``).
    """
    import torch

    from ..model.backbones import create_backbone, input_size_problem, named, pixel_stats, resolve

    dev = device_of(device)
    scale_list = [float(scales)] if np.ndim(scales) == 0 else [float(s) for s in scales]  # type: ignore[arg-type]
    model, spec, source = None, None, "module"
    if type(backbone).__name__ == "Model" and hasattr(backbone, "aligner"):
        model = backbone
        branch = model.aligner.teacher
        if branch.backbone is None:
            raise InputError(
                "This model was trained on precomputed features; it has no image backbone to embed with."
            )
        net, name = branch.backbone, model.config.backbone
        source = f"model:{model.meta.weights_source}"
        mean, std = branch.pix_mean.cpu(), branch.pix_std.cpu()
        scale_list, image_size = list(model.config.scales), model.config.image_size
    elif isinstance(backbone, str):
        net, source = create_backbone(backbone, weights, pretrained, settings.allow_download)
        if source == "random":
            logger.warning(f"Embedding with a randomly initialised {backbone!r} (pretrained=False).")
        name, spec = backbone, named(backbone)
        mean, std = pixel_stats(net)
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
    if image_size is None:
        image_size = spec.input_px if spec is not None else 112
    if isinstance(backbone, str):  # fit's check: a ViT of one input size refuses others, before any data
        problem = input_size_problem(resolve(backbone, settings.allow_download), image_size)
        if problem:
            raise InputError(problem)
    key = key_added or f"X_{name.split(':')[-1].split('/')[-1]}"
    if key == Keys.SPATIAL:
        raise InputError("`key_added='spatial'` would overwrite the spot coordinates: choose another name.")
    data = maybe_copy(data, copy)
    secs = as_sections(
        data, image_key=image_key, shapes_key=shapes_key, table_key=table_key,
        library_id=library_id, library_key=library_key, bin_size=bin_size,
        spot_diameter_um=spot_diameter_um, microns_per_pixel=microns_per_pixel,
    )
    if size is None and size_um is None and spec is not None and spec.patch_um is not None:
        if all(sp.microns_per_pixel is not None for sp in secs):
            size_um = spec.patch_um
        else:
            logger.warning(f"{spec.name!r} was trained at {spec.mpp} µm/px, but a section has no known "
                           "µm/px: its patches are 224 px wide. Pass `size=` or `size_um=`.")
    readers = []
    for sp in secs:
        check_inside(sp)
        readers.append(model.patch_reader(sp) if model is not None
                       else PatchReader(sp, patch_size_px(sp, size, size_um, 224), scale_list, image_size))
    was_training = net.training
    param = next(iter(net.parameters()), None)
    home = param.device if param is not None else None  # the user's module goes back where it was
    norm = {"mean": [float(v) for v in mean.flatten()], "std": [float(v) for v in std.flatten()]}
    net = net.to(dev).eval()
    mean, std = mean.to(dev), std.to(dev)
    def step(x: Any) -> tuple[Any]:  # (b, scales, 3, h, w) -> features of the scales side by side
        return (net(((x.flatten(0, 1) - mean) / std).contiguous()).reshape(len(x), -1),)

    results = []
    try:
        for reader in readers:
            feats = run_batches(step, SpotInputs.streamed(reader), device=dev,
                                batch_size=batch_size, desc="embed")[0]
            if not np.isfinite(feats).all():
                raise InputError(
                    f"The backbone gave NaN or infinite features on section {reader.spots.name!r}."
                )
            results.append(feats)
    finally:
        net.train(was_training)
        if home is not None:
            net.to(home)
    for sp, feats, reader in zip(secs, results, readers, strict=True):
        mpp = sp.microns_per_pixel
        record = {
            "backbone": name,
            "weights_source": source, "patch_px": float(reader.size),
            "patch_um": None if mpp is None else float(reader.size * mpp),
            "microns_per_pixel": mpp, "image_size": int(reader.out_px),
            "scales": [float(s) for s in reader.scales],
            **norm,
        }
        write_results(sp, obsm={key: feats}, uns={key: {k: v for k, v in record.items() if v is not None}})
    return data if copy else None
