"""Visium HD: sum square bins into larger square pseudo-spots (e.g. the width a model's patch sees)."""

from __future__ import annotations

from typing import Any

from ..section import as_sections
from ..section.visium_hd import aggregate
from ..write import unchanged_on_failure


@unchanged_on_failure("sdata")
def aggregate_bins(
    sdata: Any,
    *,
    bin_size: int = 8,
    size_um: float = 96.0,
    min_fraction: float = 0.5,
    key_added: str | None = None,
) -> None:
    """Sum the counts of Visium HD bins into square pseudo-spots ``size_um`` wide.

    Bins are grouped by their grid position (``obs['array_row']``, ``obs['array_col']``: whole numbers
    that neighbouring bins differ by 1, as spatialdata-io numbers them; another grid is refused) into
    blocks of ``k x k`` bins, ``k = round(size_um / bin_size)``. A pseudo-spot sits at the mean centre of the
    tissue bins it sums and is ``k * bin_size`` µm wide. Use it to train on HD data at the scale a
    patch sees (a 8 µm bin holds a few dozen counts and a fraction of one cell; a 100 µm patch sees
    a hundred cells). :func:`stranker.tl.fit` does this itself on HD bins (to the width of its patch);
    call it directly to choose another width, then ``sr.tl.fit(sdata, bin_size=k * bin_size)``.

    Parameters
    ----------
    sdata
        A SpatialData in the layout of ``spatialdata_io.visium_hd`` (tables ``'square_008um'`` ...).
    bin_size
        The bins to sum, in µm (2, 8 or 16).
    size_um
        Width of the pseudo-spots in µm, a positive finite number no wider than the section; rounded to
        a multiple of ``bin_size``.
    min_fraction
        Keep a pseudo-spot when at least this fraction of its ``k x k`` bins are in the table (drops
        slivers at the tissue edge).
    key_added
        Name of the new table; default ``'square_{width:03d}um'`` (the HD naming, so ``bin_size=width``
        selects it), whose squares are added as shapes ``'{dataset}_square_{width:03d}um'``; with
        ``key_added``, shapes ``'{key_added}_shapes'``. Elements an earlier call added under these names
        are replaced; an element of the user's is not.

    Returns
    -------
    ``None``. Adds to ``sdata`` a table (summed counts in ``X``, ``obs['n_bins']``,
    ``obs['array_row']`` / ``obs['array_col']`` of the block, ``uns['microns_per_pixel']``) and the
    square shapes it annotates, placed like the image.
    """
    aggregate(sdata, as_sections(sdata, bin_size=bin_size)[0], bin_size, size_um, min_fraction, key_added)
