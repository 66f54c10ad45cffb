"""The one place that writes results into the user's objects, after everything succeeded."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._settings import logger
from ..section import Section


def maybe_copy(data: Any, copy: bool) -> Any:
    """Return ``data`` itself, or a deep copy of it (each item of a list) when ``copy`` is true."""
    if not copy:
        return data
    if isinstance(data, list | tuple):
        return [maybe_copy(d, True) for d in data]
    if type(data).__name__ == "SpatialData":
        from spatialdata import deepcopy

        return deepcopy(data)
    return data.copy()


def _full(values: np.ndarray, sp: Section, existing: Any = None) -> np.ndarray:
    """Rows of ``sp`` -> an array over all rows of its table (other rows keep ``existing`` or NaN)."""
    if sp.is_full_table:
        return values
    shape = (sp.table.n_obs, *values.shape[1:])
    if existing is not None and np.shape(existing) == shape:
        full = np.array(existing, dtype=np.result_type(values.dtype, np.float32), copy=True)
    else:
        full = np.full(shape, np.nan, dtype=np.result_type(values.dtype, np.float32))
    full[sp.rows] = values
    return full


def _full_sparse(values: Any, sp: Section, existing: Any = None) -> Any:
    """Sparse rows of ``sp`` -> CSR over all rows of its table (other rows keep ``existing``, else empty)."""
    from scipy import sparse

    values = sparse.csr_matrix(values)
    if sp.is_full_table:
        return values
    n = sp.table.n_obs
    place = sparse.csr_matrix(
        (np.ones(len(sp.rows), dtype=values.dtype), (sp.rows, np.arange(len(sp.rows)))),
        shape=(n, len(sp.rows)),
    )
    out = place @ values
    if existing is not None and sparse.issparse(existing) and existing.shape == out.shape:
        keep = np.ones(n, dtype=values.dtype)
        keep[sp.rows] = 0
        out = sparse.diags(keep) @ existing + out
    return sparse.csr_matrix(out)


def write_results(
    sp: Section,
    *,
    layers: dict[str, Any] | None = None,
    obsm: dict[str, np.ndarray] | None = None,
    obs: dict[str, np.ndarray] | None = None,
    var: dict[str, np.ndarray] | None = None,
    uns: dict[str, Any] | None = None,
    drop: dict[str, list[str]] | None = None,
) -> None:
    """Assign results of the rows of one section to its table and log one line naming the keys added.

    ``drop``: keys to remove, by field (``{'layers': [...], 'obs': [...], 'var': [...]}``): outputs an
    earlier stranker call wrote under the same ``key_added`` that this one does not replace.

    Arrays over the section's spots are laid into arrays over every row of the table (other rows keep
    what a former result held there, else NaN / empty).
    """
    t = sp.table
    full_layers = {
        k: _full_sparse(v, sp, t.layers.get(k)) if hasattr(v, "tocsr")
        else (v if sp.is_full_table else _full(np.asarray(v), sp, t.layers.get(k)))
        for k, v in (layers or {}).items()
    }
    full_obsm = {k: _full(np.asarray(v), sp, t.obsm.get(k)) for k, v in (obsm or {}).items()}
    full_obs = {k: _full(np.asarray(v), sp, t.obs[k].to_numpy() if k in t.obs else None)
                for k, v in (obs or {}).items()}
    write_table(t, f"the table of {sp.name!r}", layers=full_layers, obsm=full_obsm, obs=full_obs, var=var,
                uns=uns, drop=drop)


def write_table(
    t: Any,
    where: str,
    *,
    layers: dict[str, Any] | None = None,
    obsm: dict[str, np.ndarray] | None = None,
    obs: dict[str, np.ndarray] | None = None,
    var: dict[str, np.ndarray] | None = None,
    uns: dict[str, Any] | None = None,
    drop: dict[str, list[str]] | None = None,
) -> None:
    """Assign whole-table values to an AnnData (``where`` names it in the log line); remove ``drop``."""
    gone = []
    for field, keys in (drop or {}).items():
        for k in keys:
            if field in ("obs", "var") and k in getattr(t, field).columns:
                setattr(t, field, getattr(t, field).drop(columns=[k]))
            elif field in ("layers", "obsm", "uns") and k in getattr(t, field):
                del getattr(t, field)[k]
            else:
                continue
            gone.append(f"{field}[{k!r}]")
    if gone:
        logger.info(f"Removed {', '.join(gone)} from {where}: left by an earlier call under the same key.")
    for k, v in (layers or {}).items():
        t.layers[k] = v
    for k, v in (obsm or {}).items():
        t.obsm[k] = v
    for k, v in (obs or {}).items():
        t.obs[k] = v
    for k, v in (var or {}).items():
        t.var[k] = v
    for k, v in (uns or {}).items():
        t.uns[k] = v
    _log_added(where, layers=layers, obsm=obsm, obs=obs, var=var, uns=uns)


def write_cohort(
    adata: Any, *, obs: dict | None = None, obsm: dict | None = None, uns: dict | None = None
) -> None:
    """Assign slide-level results to a cohort AnnData (one row per slide) and log the keys added."""
    for k, v in (obs or {}).items():
        adata.obs[k] = v
    for k, v in (obsm or {}).items():
        adata.obsm[k] = np.asarray(v)
    for k, v in (uns or {}).items():
        adata.uns[k] = v
    _log_added("the cohort", obs=obs, obsm=obsm, uns=uns)


def _log_added(where: str, **fields: dict | None) -> None:
    """One INFO line: ``Added layers['x'], obsm['X_x'] to <where>``."""
    keys = [f"{field}[{k!r}]" for field, d in fields.items() for k in (d or {})]
    if keys:
        logger.info(f"Added {', '.join(keys)} to {where}.")


def unique_tables(secs: list[Section]) -> list[Section]:
    """One section per distinct table object (several libraries can share one AnnData)."""
    seen: set[int] = set()
    out = []
    for sp in secs:
        if sp.table is not None and id(sp.table) not in seen:
            seen.add(id(sp.table))
            out.append(sp)
    return out
