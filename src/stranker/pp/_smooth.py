"""Spatial smoothing of expression over neighbouring spots (squidpy's neighbour graph)."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sps

from .._constants import Keys
from .._docs import doc_params
from .._errors import InputError
from ..section import as_sections
from ..write import maybe_copy, unchanged_on_failure, write_results


def neighbour_weights(centers: np.ndarray, n_neighs: int = 6, include_self: bool = True) -> sps.csr_matrix:
    """Row-normalised spatial kNN weights from squidpy's ``spatial_neighbors`` (generic coordinates)."""
    import anndata as ad
    import squidpy as sq

    n = len(centers)
    if n < 2:
        return sps.identity(n, format="csr", dtype=np.float32)
    tmp = ad.AnnData(
        np.zeros((n, 1), dtype=np.float32), obsm={"spatial": np.asarray(centers, dtype=np.float64)}
    )
    sq.gr.spatial_neighbors(tmp, coord_type="generic", n_neighs=min(n_neighs, n - 1))
    w = (tmp.obsp["spatial_connectivities"] > 0).astype(np.float32)
    if include_self:
        w = w + sps.identity(n, format="csr", dtype=np.float32)
    deg = np.asarray(w.sum(1)).ravel()
    deg[deg == 0] = 1.0
    return sps.diags(1.0 / deg) @ w


@unchanged_on_failure()
@doc_params()
def smooth(
    data: Any,
    *,
    layer: str | None = Keys.LOGNORM,
    n_neighs: int = 6,
    include_self: bool = True,
    key_added: str = Keys.SMOOTHED,
    copy: bool = False,
    shapes_key: str | None = None,
    table_key: str | None = None,
    library_id: str | None = None,
    library_key: str | None = None,
    bin_size: int | None = None,
) -> Any:
    """Average expression over each spot's spatial neighbours.

    The graph is squidpy's ``sq.gr.spatial_neighbors`` (``coord_type='generic'``, ``n_neighs``
    nearest spots) on the spot centres; each spot gets the unweighted mean over itself and its
    neighbours. Sections are smoothed separately.

    Parameters
    ----------
    data
        SpatialData, AnnData or a list of either.
    layer
        Layer to smooth (default the log-normalised layer of :func:`stranker.pp.normalize`);
        ``None`` uses ``X``.
    n_neighs
        Neighbours per spot.
    include_self
        Include the spot itself in its average.
    key_added
        Layer written.
    copy
        Return a modified copy instead of writing in place.
    shapes_key, table_key, library_id
        Which elements when there are several.
    {doc_library_key}
    {doc_bin_size}

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes ``layers[key_added]`` (float32; CSR when the
    layer smoothed is sparse, which it stays: a spot's average holds the genes its neighbours express).
    """
    if n_neighs < 1:
        raise InputError(f"`n_neighs` must be at least 1, got {n_neighs}.")
    data = maybe_copy(data, copy)
    secs = as_sections(
        data, shapes_key=shapes_key, table_key=table_key, library_id=library_id, library_key=library_key,
        bin_size=bin_size, need_image=False,
    )
    if layer is not None:
        for sp in secs:
            if layer not in sp.table.layers:
                hint = " Run `sr.pp.normalize` first." if layer == Keys.LOGNORM else ""
                raise InputError(f"Layer {layer!r} not in the table of section {sp.name!r}.{hint}")
    results = []
    for sp in secs:
        x = sp.expression(layer)
        x = sps.csr_matrix(x) if sps.issparse(x) else np.asarray(x, dtype=np.float32)
        if not np.isfinite(x.data if sps.issparse(x) else x).all():
            raise InputError(f"Layer {layer!r} of section {sp.name!r} has NaN or infinite values.")
        res = neighbour_weights(sp.centers, n_neighs, include_self) @ x
        results.append(
            sps.csr_matrix(res, dtype=np.float32) if sps.issparse(res) else np.asarray(res, dtype=np.float32)
        )
    for sp, res in zip(secs, results, strict=True):
        write_results(sp, layers={key_added: res})
    return data if copy else None
