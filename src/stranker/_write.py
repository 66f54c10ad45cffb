"""The one place that writes results into the user's objects, after everything succeeded."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._predictions import genes_in_table, prediction_layer
from ._section import Section
from ._settings import logger


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
) -> None:
    """Assign results to the table of one section and log one line naming the keys added."""
    t = sp.table
    for k, v in (layers or {}).items():
        if hasattr(v, "tocsr"):  # sparse
            t.layers[k] = _full_sparse(v, sp, t.layers.get(k))
        else:
            t.layers[k] = v if sp.is_full_table else _full(np.asarray(v), sp, t.layers.get(k))
    for k, v in (obsm or {}).items():
        t.obsm[k] = _full(np.asarray(v), sp, t.obsm.get(k))
    for k, v in (obs or {}).items():
        t.obs[k] = _full(np.asarray(v), sp, t.obs[k].to_numpy() if k in t.obs else None)
    for k, v in (var or {}).items():
        t.var[k] = v
    for k, v in (uns or {}).items():
        t.uns[k] = v
    _log_added(f"the table of {sp.name!r}", layers=layers, obsm=obsm, obs=obs, var=var, uns=uns)


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


def write_outputs(
    sp: Section, model: Any, emb: np.ndarray, pred: np.ndarray, key_added: str, *, in_sample: bool
) -> None:
    """Write embedding, predicted layer and run record of one section (the only writer of model outputs)."""
    full, layer_format = prediction_layer(sp, list(model.genes), pred)
    written, absent = genes_in_table(sp, model.genes)
    if layer_format == "sparse":
        logger.info(
            f"Writing `layers[{key_added!r}]` sparse ({len(model.genes)} modelled of {sp.table.n_vars} "
            f"genes; a dense layer would exceed sr.settings.max_dense_layer): "
            f"genes not modelled read as 0, not NaN."
        )
    params = {k: v for k, v in model.config.to_dict().items() if k != "extra"}
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
    record = {
        "params": {k: v for k, v in params.items() if v is not None},
        "genes": written,  # the genes with a prediction in the layer
        "genes_absent": absent,  # modelled genes the table has no column for: not written
        "history": {
            k: [h.get(k, np.nan) for h in model.history]
            for k in (model.history[0] if model.history else {})
        },
        "target": model.meta.target,
        "weights_source": model.meta.weights_source,
        "device": model.meta.device,
        "train_sections": model.meta.sections,
        "fit_seconds": model.meta.fit_seconds,
        "in_sample": in_sample,
        "layer_format": layer_format,
    }
    if model.expression_rank is not None:  # predictions projected onto this many axes of the training targets
        record["expression_rank"] = model.expression_rank
    write_results(sp, obsm={f"X_{key_added}": emb}, layers={key_added: full}, uns={key_added: record})
