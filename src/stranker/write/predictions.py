"""Model outputs into the user's objects: embeddings, the predicted layer and the run record.

A section with a table gets them in that table; spots without a table, and tiles laid over an
image-only slide, get a new table (and, for tiles, the circles it annotates) added to their SpatialData.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._constants import Keys
from .._settings import logger
from ..section import Section
from .elements import add_elements
from .layers import genes_in_table, prediction_layer
from .tables import write_results

RELIABILITY_COLUMNS = ("cv_pcc", "cv_pcc_lo", "cv_pcc_hi", "reliable")  # var[f"{key_added}_{c}"]


def write_predictions(
    sp: Section, model: Any, emb: np.ndarray, pred: np.ndarray, key_added: str, *, tiles: bool,
    in_sample: bool, extra: dict[str, Any] | None = None, trust: dict[str, Any] | None = None,
) -> None:
    """Write the outputs of one section wherever they go (its table, or new elements of its SpatialData).

    Parameters
    ----------
    sp
        The section predicted on (its spots, or the tiles laid over it when ``tiles``).
    model
        The fitted model.
    emb, pred
        Embeddings and predictions of its spots, in order.
    key_added
        Prefix of the written keys.
    tiles
        The spots are tiles stranker laid: circles ``'{key_added}_tiles'`` are added with the table.
    in_sample, extra, trust
        As :func:`write_outputs` records them.
    """
    if not tiles and sp.table is not None:
        write_outputs(sp, model, emb, pred, key_added, in_sample=in_sample, extra=extra, trust=trust)
        return
    import geopandas  # noqa: F401  (spatialdata shapes)
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import get_transformation

    sdata, shapes = sp.source, {}
    if tiles:
        region = f"{key_added}_tiles"
        transforms = get_transformation(sdata.images[sp.keys.image_key], get_all=True)
        index = np.arange(sp.n_spots)  # integer ids: no Python string per tile (1M tiles on a slide)
        shapes[region] = ShapesModel.parse(
            sp.centers, geometry=0, radius=np.full(sp.n_spots, sp.diameter / 2), index=index,
            transformations=transforms,
        )
    else:
        region = sp.keys.shapes_key
        index = list(sdata.shapes[region].index)
    table = _new_table(sp, model, region, index)
    new = Section(name=sp.name, image=sp.image, centers=sp.centers, diameter=sp.diameter, table=table,
                  rows=np.arange(sp.n_spots), microns_per_pixel=sp.microns_per_pixel)
    write_outputs(new, model, emb, pred, key_added, in_sample=in_sample, extra=extra, trust=trust)
    add_elements(sdata, shapes=shapes, tables={f"{key_added}_table": table}, by="sr.tl.predict")
    logger.info(f"Adding table {key_added + '_table'!r} annotating {region!r}")


def write_outputs(
    sp: Section, model: Any, emb: np.ndarray, pred: np.ndarray, key_added: str, *, in_sample: bool,
    extra: dict[str, Any] | None = None, trust: dict[str, Any] | None = None,
) -> None:
    """Write embedding, predicted layer, reliability and run record of one section's table.

    ``extra``: further entries of the run record ``uns[key_added]`` (e.g. ``predict``'s ``adapt`` and
    ``resampling``), written with it at once. ``trust`` (:meth:`stranker.Model.trust`): the section's
    intervals (``lower``, ``upper``), per-spot ``difficulty`` and ``shift`` record, written beside the
    prediction (``layers['{key_added}_lower'/'_upper']``, ``obs['{key_added}_difficulty']``,
    ``uns[key_added]['shift']``). The model's per-gene reliability goes into ``var`` whenever it has one.
    """
    full, layer_format = prediction_layer(sp, list(model.genes), pred)
    written, absent = genes_in_table(sp, model.genes)
    if layer_format == "sparse":
        logger.info(
            f"Writing `layers[{key_added!r}]` sparse ({len(model.genes)} modelled of {sp.table.n_vars} "
            f"genes; a dense layer would exceed sr.settings.max_dense_layer): "
            f"genes not modelled read as 0, not NaN."
        )
    params = {k: v for k, v in model.config.to_dict().items() if k not in ("extra", "chosen")}
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
    record.update(extra or {})
    if model.expression_rank is not None:  # predictions projected onto this many axes of the training targets
        record["expression_rank"] = model.expression_rank
    layers, obs, var = {key_added: full}, {}, {}
    table = model.reliability
    if table is None:
        record["reliability"] = (
            "not estimated: the model was fitted with reliability=False, on a single section, or saved "
            "before stranker estimated it; refit on several sections to get var columns, intervals and "
            "the shift score")
    else:
        cols = sp.gene_columns(list(model.genes))
        keep = cols >= 0
        kinds = ((np.float64, np.nan),) * 3 + ((bool, False),)
        for name, (dtype, fill) in zip(RELIABILITY_COLUMNS, kinds, strict=True):
            col = np.full(sp.table.n_vars, fill, dtype=dtype)
            col[cols[keep]] = table[name].to_numpy()[keep]
            var[f"{key_added}_{name}"] = col
        rec = model.reliability_record
        record["fdr"] = float(model.config.fdr)
        record["interval_level"] = float(rec.level)
        record["reliability"] = (
            f"estimated on {len(rec.groups)} held-out groups {rec.groups} by fold models of "
            f"{rec.fold_epochs} epochs; reliable: r on new sections > 0 at FDR {model.config.fdr:g} "
            f"(Benjamini-Hochberg over a t-test across the held-out groups) and estimated r >= 0.1")
        record["n_reliable"] = int(table["reliable"].to_numpy()[keep].sum())
    # outputs of an earlier call under this key (its run record was checked) that this one does not write
    drop = {"var": [] if table is not None else [f"{key_added}_{c}" for c in RELIABILITY_COLUMNS],
            "layers": [] if trust is not None else [f"{key_added}_lower", f"{key_added}_upper"],
            "obs": [] if trust is not None else [f"{key_added}_difficulty"]}
    if trust is not None:
        layers[f"{key_added}_lower"] = prediction_layer(sp, list(model.genes), trust["lower"])[0]
        layers[f"{key_added}_upper"] = prediction_layer(sp, list(model.genes), trust["upper"])[0]
        obs[f"{key_added}_difficulty"] = trust["difficulty"].astype(np.float32)
        record["shift"] = trust["shift"]
    write_results(sp, obsm={f"X_{key_added}": emb}, layers=layers, obs=obs, var=var, uns={key_added: record},
                  drop=drop)


def _new_table(sp: Section, model: Any, shapes_key: str, index: Any) -> Any:
    """Return a table annotating ``shapes_key`` for the spots of ``sp``: no ``X``, genes as ``var``."""
    import anndata as ad
    import pandas as pd
    from spatialdata.models import TableModel

    ids = pd.Index(np.asarray(index).astype(str))
    obs = pd.DataFrame({Keys.INSTANCE: np.asarray(index), Keys.REGION: pd.Categorical.from_codes(
        np.zeros(len(ids), dtype=np.int8), categories=[shapes_key])}, index=ids)
    # no X: the predictions are stored once, in layers[key_added] (written by write_outputs)
    a = ad.AnnData(obs=obs, var=pd.DataFrame(index=list(model.genes)))
    a.obsm[Keys.SPATIAL] = sp.centers.copy()
    if sp.microns_per_pixel is not None:
        a.uns[Keys.MPP] = sp.microns_per_pixel
    return TableModel.parse(a, region=shapes_key, region_key=Keys.REGION, instance_key=Keys.INSTANCE)
