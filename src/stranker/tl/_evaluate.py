"""sr.tl.evaluate: per-gene Pearson r and error of predicted against measured expression."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._constants import Keys
from .._deprecate import _UNSET
from .._docs import doc_params
from .._errors import InputError
from .._expression import lognorm, section_counts
from .._metrics import summarise
from .._settings import logger
from ..section import Section, as_sections
from ..write import read_predictions, unchanged_on_failure, write_results


def _pairs(sp: Section, layer: str, genes: list[str], counts_layer: str | None, target_sum: float):
    idx = sp.gene_columns(genes)
    if (idx < 0).any():
        raise InputError(
            f"Genes {[g for g, i in zip(genes, idx, strict=True) if i < 0][:5]} "
            f"not in section {sp.name!r}."
        )
    pred = read_predictions(sp, layer, genes)
    true = lognorm(section_counts(sp, counts_layer), target_sum, cols=idx)
    return pred, true


def _scored_genes(secs: list[Section], key_added: str) -> tuple[list[str], list[str]]:
    """Genes predicted in every section (``uns[key_added]['genes']``), and the modelled ones left out."""
    recs = []
    for sp in secs:
        rec = sp.table.uns.get(key_added, {})
        if "genes" not in rec:
            raise InputError(
                f"No `uns[{key_added!r}]['genes']` in section {sp.name!r}: "
                "pass `genes=` or run `sr.tl.predict`."
            )
        recs.append(rec)
    everywhere = set.intersection(*(set(r["genes"]) for r in recs))
    genes = [g for g in recs[0]["genes"] if g in everywhere]
    modelled = dict.fromkeys(g for r in recs for g in [*r["genes"], *r.get("genes_absent", [])])
    left = [g for g in modelled if g not in everywhere]
    if not genes:
        raise InputError("No gene has a prediction in every section: evaluate them one by one.")
    if left:
        logger.warning(
            f"Scoring the {len(genes)} modelled genes that every table has; {len(left)} modelled gene(s) "
            f"are not measured in every section and are not scored: {left[:20]}"
            f"{' ...' if len(left) > 20 else ''} "
            "(`genes_not_scored` in the metrics)."
        )
    return genes, left


@unchanged_on_failure()
@doc_params()
def evaluate(
    data: Any,
    *,
    key: str = _UNSET,
    layer: str | None = None,
    genes: Sequence[str] | None = None,
    counts_layer: str | None = None,
    target_sum: float = 1e4,
    n_heg: int = 50,
    key_added: str | None = None,
    table_key: str | None = None,
    library_id: str | None = None,
    library_key: str | None = None,
    bin_size: int | None = None,
) -> dict[str, Any]:
    """Compare predicted with measured expression, per gene across spots.

    The measured side is ``log1p(counts / total * target_sum)`` over all genes (``fit``'s target).

    Parameters
    ----------
    data
        One or several sections that hold measured counts and ``layers[layer]``.
    key
        The ``key_added`` of :func:`stranker.tl.predict` to read: its genes ``uns[key]['genes']``
        and, by default, its layer ``layers[key]``.
    layer
        Predicted expression; default ``key``.
    genes
        Genes to score; default the modelled genes predicted in every section (``uns[key]['genes']``;
        modelled genes a table lacks are listed in ``genes_not_scored``, with a warning).
    counts_layer
        Layer of raw counts; ``None`` uses ``X``.
    target_sum
        Scaling of the measured side.
    n_heg
        HEG = the ``n_heg`` genes most expressed in the evaluated spots (mclSTExp's definition).
    key_added
        ``var[f'{key_added}_pcc']`` and ``uns[key_added]['metrics']`` are written; default ``key``.
        (Passed alone, it is still read as ``key`` too, with a FutureWarning: pass ``key=``.)
    {doc_tables}
    {doc_library_key}
    {doc_bin_size}

    Returns
    -------
    Metrics ``pcc_all`` (ACG), ``pcc_heg`` (HEG), ``spearman_all`` and ``spearman_heg`` (the same with
    Spearman's rank correlation), ``pcc_median``, ``frac_positive``, ``mae``, ``mse``.
    With one section, Pearson r is per gene across its spots. With several, the dict has
    ``per_section`` (each section alone) and ``pooled`` (all spots together), and the top-level
    figures are the mean over sections. ``n_genes`` genes are scored; ``n_genes_undefined`` of them
    (``genes_undefined``) have no r (constant prediction or measurement) and are left out of every r
    figure; ``genes_not_scored`` lists modelled genes that some table lacks.
    """
    if isinstance(n_heg, bool) or not isinstance(n_heg, numbers.Integral) or n_heg < 1:
        raise InputError(f"`n_heg` must be a whole number >= 1, got {n_heg!r}.")
    if key is _UNSET and key_added is not None:
        warnings.warn(
            "sr.tl.evaluate(): `key_added=` alone also named the predictions to read; pass `key=` for "
            "those (the key of sr.tl.predict). From the next release `key_added=` names only what is "
            "written.",
            FutureWarning,
            stacklevel=2,
        )
        key = key_added
    key = Keys.PREFIX if key is _UNSET else key
    key_added = key if key_added is None else key_added
    layer = key if layer is None else layer
    secs = as_sections(data, table_key=table_key, library_id=library_id, library_key=library_key,
                    bin_size=bin_size, need_image=False)
    few = [f"{sp.name!r} ({sp.n_spots})" for sp in secs if sp.n_spots < 2]
    if few:
        raise InputError(f"Section(s) {', '.join(few)} have fewer than 2 spots: r across spots needs 2.")
    not_scored: list[str] = []
    if genes is None:
        genes, not_scored = _scored_genes(secs, key)
    genes = list(genes)
    if not genes:
        raise InputError("`genes` is empty: name at least one gene to score, or pass `genes=None`.")
    pairs = [_pairs(sp, layer, genes, counts_layer, target_sum) for sp in secs]
    per = {sp.name: summarise(p, t, genes, n_heg) for sp, (p, t) in zip(secs, pairs, strict=True)}
    public = {name: {k: v for k, v in m.items() if k != "pcc"} for name, m in per.items()}
    if len(secs) == 1:
        metrics = dict(public[secs[0].name])
        metrics["scope"] = "per gene across the spots of one section"
    else:
        pooled = summarise(
            np.concatenate([p for p, _ in pairs]), np.concatenate([t for _, t in pairs]), genes, n_heg
        )
        keys = ("pcc_all", "pcc_heg", "spearman_all", "spearman_heg", "pcc_median", "frac_positive", "mae",
                "mse")
        metrics = {k: float(np.mean([public[n][k] for n in public])) for k in keys}
        metrics.update(
            scope="mean over sections of per-section figures; 'pooled' pools all spots",
            per_section=public, pooled={k: v for k, v in pooled.items() if k != "pcc"},
        )
    undefined = sorted({g for m in per.values() for g in m["genes_undefined"]})
    metrics.update(n_genes=len(genes), n_genes_undefined=len(undefined), genes_undefined=undefined,
                   genes_not_scored=not_scored)
    if undefined:
        logger.warning(
            f"Pearson r is undefined (prediction or measurement constant over the spots) for "
            f"{len(undefined)} of {len(genes)} genes, left out of every r figure: {undefined[:10]}"
            f"{' ...' if len(undefined) > 10 else ''} (`n_genes_undefined`, `genes_undefined`)."
        )
    for sp in secs:
        r = np.full(sp.table.n_vars, np.nan, dtype=np.float32)
        r[sp.gene_columns(genes)] = per[sp.name]["pcc"]
        rec = dict(sp.table.uns.get(key_added, {}))
        rec["metrics"] = metrics if len(secs) == 1 else {**public[sp.name], "all_sections": metrics}
        write_results(sp, var={f"{key_added}_pcc": r}, uns={key_added: rec})
    return metrics
