"""sr.pp.patches: image patches centred on every spot, as arrays (read by ``section.patches``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._docs import doc_params
from ..section import as_sections
from ..section.patches import PatchReader, check_inside, patch_size_px
from ..spots import SpotInputs


@doc_params()
def patches(
    data: Any,
    *,
    size: float | None = None,
    size_um: float | None = None,
    scales: float | Sequence[float] = 1.0,
    out_px: int | None = None,
    batch_size: int = 512,
    pad_value: int = 255,
    on_outside: str = "raise",
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    library_id: str | None = None,
    library_key: str | None = None,
    bin_size: int | None = None,
    spot_diameter_um: float | None = None,
    microns_per_pixel: float | None = None,
) -> np.ndarray | list[np.ndarray]:
    """Cut image patches centred on every spot.

    Parameters
    ----------
    data
        SpatialData, AnnData in squidpy layout, or a list of either.
    size
        Patch side in full-resolution pixels (those of Space Ranger's and squidpy's spot coordinates:
        the same patch whether the full-resolution or only the hires image was read); 224 when neither
        ``size`` nor ``size_um`` is given.
    size_um
        Patch side in micrometres (needs the image resolution, ``uns['microns_per_pixel']``).
    scales
        One multiplier of ``size`` or several (e.g. ``(1, 2)``: the spot and twice its width of
        context). Each scale is read from the coarsest pyramid level that keeps 2x oversampling.
    out_px
        Side of the returned patches in pixels (antialiased resize); ``None`` keeps ``size`` (with
        ``size_um``: the pixels of the image read).
    batch_size
        Spots read per batch.
    pad_value
        Grey value for pixels beyond the image border (255: white background).
    on_outside
        ``'raise'`` (default) when a spot centre lies outside the image, ``'pad'`` to keep a padded patch.
    {doc_elements}
    {doc_library_key}
    {doc_bin_size}
    {doc_resolution}

    Returns
    -------
    uint8 array ``(n_spots, out_px, out_px, 3)`` when ``scales`` is one number, else
    ``(n_spots, n_scales, out_px, out_px, 3)``, in table row order; a list of these for a list input.
    """
    single_scale = np.ndim(scales) == 0
    scale_list = [float(scales)] if single_scale else [float(s) for s in scales]  # type: ignore[arg-type]
    secs = as_sections(
        data, image_key=image_key, shapes_key=shapes_key, table_key=table_key,
        library_id=library_id, library_key=library_key, bin_size=bin_size, need_table=False,
        spot_diameter_um=spot_diameter_um, microns_per_pixel=microns_per_pixel,
    )
    results = []
    for sp in secs:
        check_inside(sp, on_outside)
        side = patch_size_px(sp, size, size_um, 224)
        px = out_px if out_px is not None or size_um is not None else round(side * sp.fullres_per_px)
        reader = PatchReader(sp, side, scale_list, px, pad_value)
        out = SpotInputs.streamed(reader).all(batch_size)
        results.append(out[:, 0] if single_scale else out)
    return results if isinstance(data, list | tuple) else results[0]
