"""sr.tl.survival: cross-validated survival prediction from slide embeddings (concordance index).

Results go to ``uns`` under the method's name, so several methods sit side by side.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._constants import Keys
from .._deprecate import _UNSET, renamed
from .._docs import doc_params
from .._errors import InputError
from .._outcomes import survival_target
from .._settings import logger, resolve_seed
from ..write import unchanged_on_failure, write_cohort
from ._crossval import bags, check_cv, features, folds, one_blas_thread, standardise_bags, transform

#: Uno's IPCW concordance is reported beside Harrell's when more than this fraction is censored.
UNO_CENSORING = 0.2

SURVIVAL_METHODS = ("coxnet", "coxph", "rsf", "attention")


def _cindex(t: np.ndarray, e: np.ndarray, risk: np.ndarray) -> float:
    from sksurv.metrics import concordance_index_censored

    return float(concordance_index_censored(e, t, risk)[0])


def _fit_coxnet(x: np.ndarray, t: np.ndarray, e: np.ndarray, seed: int, l1_ratio: float = 0.5):
    """Elastic-net Cox; the penalty is chosen on the path by inner 3-fold CV (Harrell's C)."""
    from sksurv.linear_model import CoxnetSurvivalAnalysis
    from sksurv.util import Surv

    y = Surv.from_arrays(e, t)
    path = CoxnetSurvivalAnalysis(l1_ratio=l1_ratio, alpha_min_ratio=0.05, n_alphas=20).fit(x, y)
    alphas = path.alphas_
    inner = folds(e, 3, seed) if min(e.sum(), (~e).sum()) >= 3 else np.arange(len(e)) % 3
    scores = np.zeros(len(alphas))
    for k in range(3):
        tr, te = inner != k, inner == k
        if e[te].sum() == 0:
            continue
        try:
            m = CoxnetSurvivalAnalysis(l1_ratio=l1_ratio, alphas=alphas).fit(x[tr], y[tr])
        except ArithmeticError:
            continue
        for j, a in enumerate(alphas):
            scores[j] += _cindex(t[te], e[te], m.predict(x[te], alpha=a))
    best = float(alphas[int(np.argmax(scores))])
    return lambda z: path.predict(z, alpha=best), {"alpha": best, "l1_ratio": l1_ratio}


def _fit_survival(name: str, x: np.ndarray, t: np.ndarray, e: np.ndarray, seed: int):
    from sksurv.util import Surv

    if name == "coxnet":
        return _fit_coxnet(x, t, e, seed)
    y = Surv.from_arrays(e, t)
    if name == "coxph":
        from sksurv.linear_model import CoxPHSurvivalAnalysis

        m = CoxPHSurvivalAnalysis(alpha=1.0).fit(x, y)
        return m.predict, {"alpha": 1.0}
    from sksurv.ensemble import RandomSurvivalForest

    m = RandomSurvivalForest(n_estimators=200, min_samples_leaf=3, max_features="sqrt", random_state=seed,
                             n_jobs=1).fit(x, y)
    return m.predict, {"n_estimators": 200, "min_samples_leaf": 3}


@unchanged_on_failure("cohort")
@doc_params()
def survival(
    cohort: Any,
    *,
    time: str = Keys.TIME,
    event: str = Keys.EVENT,
    method: str = _UNSET,
    cv: int = 5,
    seed: int | None = None,
    use_rep: str | None = f"X_{Keys.PREFIX}",
    n_pcs: int | None = None,
    tiles_key: str = f"{Keys.PREFIX}_{Keys.TILES}",
    epochs: int = 150,
    key_added: str = Keys.PREFIX,
    copy: bool = False,
    model: str = _UNSET,
) -> dict[str, Any] | Any:
    """Cross-validated survival prediction from slide embeddings (concordance index).

    Slides are split into ``cv`` folds stratified by event and shuffled with ``seed`` (the same folds
    for every model). In each fold the features are standardised (and optionally reduced to ``n_pcs``
    principal components) on the training slides, the model is fitted there and scores the held-out
    slides. Harrell's C is computed on every held-out fold; when more than 20 % of the slides are
    censored, Uno's IPCW C (``sksurv.metrics.concordance_index_ipcw``, censoring distribution from the
    training slides, truncated at their largest time) is reported beside it, since Harrell's C then
    depends on the censoring.

    Parameters
    ----------
    cohort
        AnnData with one row per slide (from :func:`stranker.tl.embed_slides`).
    time, event
        Columns of ``obs``: positive survival times and event indicators (1/True = event observed).
    method
        ``'coxnet'`` (elastic-net Cox, penalty chosen by inner 3-fold CV), ``'coxph'`` (ridge Cox,
        ``alpha=1``), ``'rsf'`` (random survival forest) or ``'attention'`` (gated-attention MIL on the
        tile embeddings, trained with the Cox partial likelihood).
    {doc_crossval}

    Returns
    -------
    Dict with ``c_index`` (mean Harrell's C over folds), ``c_index_sd``, ``c_index_folds``,
    ``c_index_pooled`` (Harrell's C of all out-of-fold risks), ``c_index_uno`` / ``c_index_uno_folds``
    (or ``None``), ``censoring`` (censored fraction), ``fold`` (fold of each slide), ``method``, ``params``.
    Written into ``cohort``: ``obs['{key_added}_risk']`` (out-of-fold risk, higher = shorter survival)
    and ``uns['{key_added}_survival'][method]`` (the dict).
    """
    from sksurv.metrics import concordance_index_ipcw
    from sksurv.util import Surv

    cohort = cohort.copy() if copy else cohort
    method = renamed("sr.tl.survival", "model", "method", model, method, "coxnet")
    if method not in SURVIVAL_METHODS:
        raise InputError(f"`method` must be one of {list(SURVIVAL_METHODS)}, got {method!r}.")
    seed = resolve_seed(seed)
    t, e = survival_target(cohort.obs, time, event)
    check_cv(len(t), cv, {"events": int(e.sum())}, n_pcs)
    fold = folds(e, cv, seed)
    censoring = float(1 - e.mean())
    use_uno = censoring > UNO_CENSORING
    if method == "attention":
        tile_bags = bags(cohort, tiles_key)
    else:
        x = features(cohort, use_rep)

    risk = np.empty(len(t))
    harrell, uno, params = [], [], []
    with one_blas_thread():
        for k in range(cv):
            tr, te = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
            if method == "attention":
                from ..model.mil import predict_mil, train_mil

                b_tr, b_te = standardise_bags([tile_bags[i] for i in tr], [tile_bags[i] for i in te])
                net = train_mil(b_tr, t[tr], task="cox", event=e[tr], epochs=epochs, seed=seed + k)
                risk[te] = predict_mil(net, b_te)[0][:, 0]
                params.append({"epochs": epochs})
            else:
                x_tr, x_te = transform(x[tr], x[te], n_pcs, seed)
                predict, p = _fit_survival(method, x_tr, t[tr], e[tr], seed)
                risk[te] = predict(x_te)
                params.append(p)
            harrell.append(_cindex(t[te], e[te], risk[te]))
            if use_uno:
                y_tr, y_te = Surv.from_arrays(e[tr], t[tr]), Surv.from_arrays(e[te], t[te])
                try:
                    uno.append(float(concordance_index_ipcw(y_tr, y_te, risk[te], tau=t[tr].max())[0]))
                except ValueError as err:  # no comparable pair below tau in this fold
                    logger.warning(f"Uno's C undefined in fold {k}: {err}")
                    uno.append(float("nan"))
    result = {
        "method": method,
        "c_index": float(np.mean(harrell)),
        "c_index_sd": float(np.std(harrell)),
        "c_index_folds": np.asarray(harrell),
        "c_index_pooled": _cindex(t, e, risk),
        "c_index_uno": float(np.nanmean(uno)) if use_uno else None,
        "c_index_uno_folds": np.asarray(uno) if use_uno else None,
        "censoring": censoring,
        "cv": int(cv),
        "seed": int(seed),
        "fold": fold,
        "params": {f"fold_{k}": p for k, p in enumerate(params)},  # dicts, not a list: h5ad-writable
    }
    uns_key = f"{key_added}_{Keys.SURVIVAL}"
    record = dict(cohort.uns.get(uns_key, {}))
    record[method] = {k: v for k, v in result.items() if v is not None}
    write_cohort(cohort, obs={f"{key_added}_{Keys.RISK}": risk}, uns={uns_key: record})
    logger.info(f"{method}: C-index {result['c_index']:.3f} ± {result['c_index_sd']:.3f} over {cv} folds")
    return cohort if copy else result


