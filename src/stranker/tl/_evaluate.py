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
from .._metrics import reliability_scores, summarise
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


def _warn_in_sample(secs: list[Section], key: str) -> None:
    """Warn when the predictions scored are a fit's own, on the spots it trained on (``in_sample``)."""
    recs = {sp.name: sp.table.uns.get(key) for sp in secs}
    names = [n for n, rec in recs.items() if isinstance(rec, dict) and bool(rec.get("in_sample", False))]
    if names:
        trained = [str(s) for s in recs[names[0]].get("train_sections", [])]
        logger.warning(
            f"The predictions under {key!r} of section(s) {names} are in-sample: the fit wrote them on the "
            f"spots it trained on (`uns[{key!r}]['in_sample']`; trained on {trained}), so these figures "
            "tell how well the model fits its training data, not how well it predicts a new section. "
            "Score `sr.tl.predict` on held-out sections for that."
        )


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


def _reliability_inputs(
    secs: list[Section], key: str, layer: str, genes: list[str]
) -> list[dict[str, np.ndarray]]:
    """Per section, the reliability outputs that ``sr.tl.predict`` wrote beside the predictions.

    The intervals ``layers[f'{layer}_lower']`` and ``[f'{layer}_upper']`` and the estimates
    ``var[f'{key}_cv_pcc']`` and ``var[f'{key}_reliable']``, each read only when every section has it
    (a model without them, or saved before stranker estimated them, leaves them out).
    """
    lo_name, hi_name = f"{layer}_lower", f"{layer}_upper"
    cv_col, rel_col = f"{key}_cv_pcc", f"{key}_reliable"
    bounds = [lo_name in sp.table.layers and hi_name in sp.table.layers for sp in secs]
    estimates = [cv_col in sp.table.var and rel_col in sp.table.var for sp in secs]
    for flags, what in ((bounds, f"the intervals `layers[{lo_name!r}]`, `layers[{hi_name!r}]`"),
                        (estimates, f"the reliability estimates `var[{cv_col!r}]`, `var[{rel_col!r}]`")):
        if any(flags) and not all(flags):
            lacking = [sp.name for sp, f in zip(secs, flags, strict=True) if not f]
            logger.warning(f"Sections {lacking} lack {what}: they are not scored in any section.")
    out: list[dict[str, np.ndarray]] = [{} for _ in secs]
    for sp, d in zip(secs, out, strict=True):
        if all(bounds):
            for side, name in (("lower", lo_name), ("upper", hi_name)):
                mat = sp.expression(name, genes)
                d[side] = np.asarray(mat.toarray() if hasattr(mat, "toarray") else mat, dtype=np.float32)
        if all(estimates):
            idx = sp.gene_columns(genes)
            d["cv_pcc"] = sp.table.var[cv_col].to_numpy(dtype=np.float64)[idx]
            d["reliable"] = sp.table.var[rel_col].to_numpy(dtype=bool)[idx]
    return out


def _mean_over_sections(values: list[Any]) -> float | None:
    """Mean of the sections' figures that are not ``None`` (``None`` when none is)."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


_RELIABILITY_KEYS = ("coverage_mean", "coverage_sd", "interval_width", "spearman_cv_pcc",
                     "frac_positive_reliable")


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
        The ``key_added`` of :func:`stranker.tl.predict` to read: its genes ``uns[key]['genes']``,
        its reliability estimates ``var[f'{key}_cv_pcc']`` and ``var[f'{key}_reliable']`` and, by
        default, its layer ``layers[key]``. Predictions that :func:`stranker.tl.fit` wrote on its own
        training spots (``uns[key]['in_sample']``) are scored with a warning: they are in-sample.
    layer
        Predicted expression; default ``key``. Its intervals, where ``predict`` wrote them, are
        ``layers[f'{layer}_lower']`` and ``layers[f'{layer}_upper']``.
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
        ``var[f'{key_added}_pcc']`` (per-gene r), ``var[f'{key_added}_coverage']`` (per-gene interval
        coverage, when the predictions have intervals) and ``uns[key_added]['metrics']`` are written;
        default ``key``.
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

    Where the predictions carry the model's reliability outputs (a model fitted on several sections,
    :func:`stranker.tl.predict`), the metrics also say how they hold up. With the per-spot intervals:
    ``coverage_mean`` and ``coverage_sd`` (mean and standard deviation over genes of the share of spots
    whose measured value lies inside its interval; compare with the nominal ``interval_level``) and
    ``interval_width`` (mean ``upper - lower``). With the per-gene estimates: ``spearman_cv_pcc``
    (Spearman's rank correlation over genes of the estimated r ``var[f'{key}_cv_pcc']`` and the
    measured r), ``n_reliable`` and ``frac_positive_reliable`` (share of the genes called reliable
    whose measured r is > 0; ``None`` when no scored gene is reliable). Without them, these keys
    are absent.
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
    _warn_in_sample(secs, key)
    pairs = [_pairs(sp, layer, genes, counts_layer, target_sum) for sp in secs]
    per = {sp.name: summarise(p, t, genes, n_heg) for sp, (p, t) in zip(secs, pairs, strict=True)}
    extras = _reliability_inputs(secs, key, layer, genes)
    for sp, (_, t), extra in zip(secs, pairs, extras, strict=True):
        per[sp.name].update(reliability_scores(t, per[sp.name]["pcc"], **extra))
    private = ("pcc", "coverage")  # per-gene arrays: written into var, not into the metrics
    public = {name: {k: v for k, v in m.items() if k not in private} for name, m in per.items()}
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
        true = np.concatenate([t for _, t in pairs])
        pooled_extra = {k: v for k, v in extras[0].items() if k in ("cv_pcc", "reliable")}
        if "lower" in extras[0]:
            pooled_extra.update(lower=np.concatenate([e["lower"] for e in extras]),
                                upper=np.concatenate([e["upper"] for e in extras]))
        pooled.update(reliability_scores(true, pooled["pcc"], **pooled_extra))
        for k in _RELIABILITY_KEYS:
            if k in public[secs[0].name]:
                metrics[k] = _mean_over_sections([public[n][k] for n in public])
        if "n_reliable" in public[secs[0].name]:
            metrics["n_reliable"] = public[secs[0].name]["n_reliable"]
        metrics.update(
            scope="mean over sections of per-section figures; 'pooled' pools all spots",
            per_section=public, pooled={k: v for k, v in pooled.items() if k not in private},
        )
    if "coverage_mean" in metrics:
        level = (secs[0].table.uns.get(key) or {}).get("interval_level")
        if level is not None:
            metrics["interval_level"] = float(level)
        logger.info(
            f"Interval coverage {metrics['coverage_mean']:.3f} ± {metrics['coverage_sd']:.3f} over genes"
            + (f" (nominal {float(level):g})" if level is not None else "")
            + f", mean width {metrics['interval_width']:.3g}."
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
        var = {f"{key_added}_pcc": r}
        if "coverage" in per[sp.name]:
            cov = np.full(sp.table.n_vars, np.nan, dtype=np.float32)
            cov[sp.gene_columns(genes)] = per[sp.name]["coverage"]
            var[f"{key_added}_coverage"] = cov
        rec = dict(sp.table.uns.get(key_added, {}))
        rec["metrics"] = metrics if len(secs) == 1 else {**public[sp.name], "all_sections": metrics}
        write_results(sp, var=var, uns={key_added: rec})
    return metrics
