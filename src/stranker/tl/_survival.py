"""sr.tl.survival and sr.tl.classify: cross-validated slide-level prediction from slide embeddings.

Every model of a call sees the same folds (stratified by event or class, shuffled by ``seed``), and
every fitted transformation (standardisation, PCA, penalty choice) is learnt on the training part
of a fold only. Results go to ``uns`` under the model's name, so several models sit side by side.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import numpy as np

from .._constants import Keys
from .._settings import logger
from .._spots import InputError
from .._undo import unchanged_on_failure
from .._write import write_cohort

#: Uno's IPCW concordance is reported beside Harrell's when more than this fraction is censored.
UNO_CENSORING = 0.2

SURVIVAL_MODELS = ("coxnet", "coxph", "rsf", "attention")
CLASSIFY_MODELS = ("logistic", "attention")


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def survival_target(obs: Any, time: str, event: str) -> tuple[np.ndarray, np.ndarray]:
    """Return checked ``(time, event)`` arrays from two columns of ``obs``."""
    import pandas as pd

    for col, what in ((time, "time"), (event, "event")):
        if col not in obs.columns:
            raise InputError(
                f"Column {col!r} (`{what}=`) not found in `obs`; columns: {list(obs.columns)}. Pass the "
                "survival table as `obs=` to `sr.tl.embed_slides`, or add the column."
            )
    t = pd.to_numeric(obs[time], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(t).all():
        bad = list(obs.index[~np.isfinite(t)][:5])
        raise InputError(
            f"`obs[{time!r}]` has missing or non-numeric times for slides {bad}: drop or fill them."
        )
    if (t <= 0).any():
        bad = list(obs.index[t <= 0][:5])
        raise InputError(f"`obs[{time!r}]` must be positive survival times; slides {bad} have times <= 0.")
    e_raw = obs[event]
    if e_raw.isna().any():
        bad = list(obs.index[e_raw.isna().to_numpy()][:5])
        raise InputError(f"`obs[{event!r}]` has missing event indicators for slides {bad}.")
    e_num = pd.to_numeric(e_raw.astype(object).map(lambda v: int(v) if isinstance(v, bool | np.bool_) else v),
                          errors="coerce").to_numpy(dtype=float)
    if not np.isin(e_num, (0.0, 1.0)).all():
        raise InputError(
            f"`obs[{event!r}]` must be event indicators (True/False or 1/0: 1 = event observed, "
            f"0 = censored), got values {sorted(set(map(str, e_raw.unique())))[:5]}."
        )
    e = e_num.astype(bool)
    if not e.any():
        raise InputError(f"`obs[{event!r}]` holds no event: a concordance index needs observed events.")
    return t, e


def _features(cohort: Any, use_rep: str | None) -> np.ndarray:
    if use_rep is None:
        x = cohort.X
    elif use_rep in cohort.obsm:
        x = cohort.obsm[use_rep]
    else:
        raise InputError(
            f"`obsm[{use_rep!r}]` not found; available: {list(cohort.obsm)}. Run `sr.tl.embed_slides` first, "
            "or pass `use_rep=None` to use `X`."
        )
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise InputError(f"The slide features ({use_rep or 'X'}) hold NaN or infinite values.")
    return x


def _bags(cohort: Any, tiles_key: str) -> list[np.ndarray]:
    tiles = cohort.uns.get(tiles_key, {})
    emb = tiles.get("embeddings") if isinstance(tiles, dict) else None
    if emb is None:
        raise InputError(
            f"`model='attention'` trains on the tile embeddings, but `uns[{tiles_key!r}]['embeddings']` is "
            "missing: run `sr.tl.embed_slides(..., keep_tiles=True)`."
        )
    missing = [i for i in cohort.obs_names if i not in emb]
    if missing:
        raise InputError(f"No tile embeddings in `uns[{tiles_key!r}]` for slides {missing[:5]}.")
    return [np.asarray(emb[i], dtype=np.float32) for i in cohort.obs_names]


@contextmanager
def _one_blas_thread():
    """Single-threaded BLAS: the problems here are tiny, and BLAS threads only contend on a busy machine."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def folds(strata: np.ndarray, cv: int, seed: int) -> np.ndarray:
    """Fold number of every sample: stratified, shuffled with ``seed``."""
    from sklearn.model_selection import StratifiedKFold

    out = np.empty(len(strata), dtype=int)
    skf = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(skf.split(np.zeros(len(strata)), strata)):
        out[test] = k
    return out


def _check_cv(n: int, cv: int, counts: dict[str, int], n_pcs: int | None = None) -> None:
    whole = isinstance(n_pcs, int | np.integer) and not isinstance(n_pcs, bool)
    if n_pcs is not None and not (whole and n_pcs >= 1):
        raise InputError(f"`n_pcs` must be a whole number >= 1 or None (no reduction), got {n_pcs!r}.")
    if not isinstance(cv, int | np.integer) or cv < 2:
        raise InputError(f"`cv` must be an integer >= 2, got {cv!r}.")
    if n < 2 * cv:
        raise InputError(
            f"{n} slides are too few for cv={cv}: need at least {2 * cv} (two per fold), or lower `cv`."
        )
    small = {k: v for k, v in counts.items() if v < cv}
    if small:
        raise InputError(
            f"cv={cv} stratified folds need at least {cv} slides of each stratum; got {small}. Lower `cv`."
        )


def _transform(x_train: np.ndarray, x_test: np.ndarray, n_pcs: int | None, seed: int):
    """Standardise (and project on ``n_pcs`` principal components), fitted on the training part only."""
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    steps = [StandardScaler()]
    if n_pcs is not None:
        steps.append(PCA(n_components=min(int(n_pcs), *x_train.shape), random_state=seed))
    pipe = make_pipeline(*steps).fit(x_train)
    return pipe.transform(x_train), pipe.transform(x_test)


def _standardise_bags(train: list[np.ndarray], test: list[np.ndarray]) -> tuple[list, list]:
    allt = np.concatenate(train)
    mu, sd = allt.mean(0), allt.std(0) + 1e-6
    return [(b - mu) / sd for b in train], [(b - mu) / sd for b in test]


# --------------------------------------------------------------------------------------------
# survival models
# --------------------------------------------------------------------------------------------
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
def survival(
    cohort: Any,
    *,
    time: str = Keys.TIME,
    event: str = Keys.EVENT,
    model: str = "coxnet",
    cv: int = 5,
    seed: int = 0,
    use_rep: str | None = f"X_{Keys.PREFIX}",
    n_pcs: int | None = None,
    tiles_key: str = f"{Keys.PREFIX}_{Keys.TILES}",
    epochs: int = 150,
    key_added: str = Keys.PREFIX,
) -> dict[str, Any]:
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
    model
        ``'coxnet'`` (elastic-net Cox, penalty chosen by inner 3-fold CV), ``'coxph'`` (ridge Cox,
        ``alpha=1``), ``'rsf'`` (random survival forest) or ``'attention'`` (gated-attention MIL on the
        tile embeddings, trained with the Cox partial likelihood).
    cv
        Number of folds.
    seed
        Seed of the folds and of the models.
    use_rep
        ``obsm`` key of the slide features (``None``: ``X``). Unused by ``'attention'``.
    n_pcs
        Reduce the standardised features to this many principal components within each fold.
    tiles_key
        ``uns`` key of the tile embeddings (for ``'attention'``).
    epochs
        Training steps of the attention network.
    key_added
        Prefix of the written keys.

    Returns
    -------
    Dict with ``c_index`` (mean Harrell's C over folds), ``c_index_sd``, ``c_index_folds``,
    ``c_index_pooled`` (Harrell's C of all out-of-fold risks), ``c_index_uno`` / ``c_index_uno_folds``
    (or ``None``), ``censoring`` (censored fraction), ``fold`` (fold of each slide), ``model``, ``params``.
    Written into ``cohort``: ``obs['{key_added}_risk']`` (out-of-fold risk, higher = shorter survival)
    and ``uns['{key_added}_survival'][model]`` (the dict).
    """
    from sksurv.metrics import concordance_index_ipcw
    from sksurv.util import Surv

    if model not in SURVIVAL_MODELS:
        raise InputError(f"`model` must be one of {list(SURVIVAL_MODELS)}, got {model!r}.")
    t, e = survival_target(cohort.obs, time, event)
    _check_cv(len(t), cv, {"events": int(e.sum())}, n_pcs)
    fold = folds(e, cv, seed)
    censoring = float(1 - e.mean())
    use_uno = censoring > UNO_CENSORING
    if model == "attention":
        bags = _bags(cohort, tiles_key)
    else:
        x = _features(cohort, use_rep)

    risk = np.empty(len(t))
    harrell, uno, params = [], [], []
    with _one_blas_thread():
        for k in range(cv):
            tr, te = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
            if model == "attention":
                from ..model.mil import predict_mil, train_mil

                b_tr, b_te = _standardise_bags([bags[i] for i in tr], [bags[i] for i in te])
                net = train_mil(b_tr, t[tr], task="cox", event=e[tr], epochs=epochs, seed=seed + k)
                risk[te] = predict_mil(net, b_te)[0][:, 0]
                params.append({"epochs": epochs})
            else:
                x_tr, x_te = _transform(x[tr], x[te], n_pcs, seed)
                predict, p = _fit_survival(model, x_tr, t[tr], e[tr], seed)
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
        "model": model,
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
    record[model] = {k: v for k, v in result.items() if v is not None}
    write_cohort(cohort, obs={f"{key_added}_{Keys.RISK}": risk}, uns={uns_key: record})
    logger.info(f"{model}: C-index {result['c_index']:.3f} ± {result['c_index_sd']:.3f} over {cv} folds")
    return result


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------
def _labels(obs: Any, label: str) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    if label not in obs.columns:
        raise InputError(f"Column {label!r} (`label=`) not found in `obs`; columns: {list(obs.columns)}.")
    col = obs[label]
    if col.isna().any():
        bad = list(obs.index[col.isna().to_numpy()][:5])
        raise InputError(f"`obs[{label!r}]` has missing labels for slides {bad}: drop or fill them.")
    values = col.astype(str).to_numpy()
    if isinstance(col.dtype, pd.CategoricalDtype):  # keep the categories' order (e.g. low < high)
        present = set(values)
        classes = np.asarray([str(c) for c in col.cat.categories if str(c) in present])
    else:
        classes = np.unique(values)
    codes = pd.Index(classes).get_indexer(values)
    if len(classes) < 2:
        raise InputError(
            f"`obs[{label!r}]` holds a single class {list(classes)}: classification needs two or more."
        )
    return classes, codes


def _fit_logistic(x: np.ndarray, y: np.ndarray, seed: int):
    """L2 logistic regression; the strength ``C`` is chosen by inner 3-fold CV (log-loss)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    cs = np.logspace(-3, 1, 9)
    n_inner = int(min(3, np.bincount(y).min()))
    inner = folds(y, n_inner, seed)
    loss = np.zeros(len(cs))
    for k in range(n_inner):
        tr, te = inner != k, inner == k
        for j, c in enumerate(cs):
            m = LogisticRegression(C=c, max_iter=500).fit(x[tr], y[tr])
            loss[j] += log_loss(y[te], m.predict_proba(x[te]), labels=np.arange(y.max() + 1))
    return LogisticRegression(C=float(cs[int(np.argmin(loss))]), max_iter=500).fit(x, y)


@unchanged_on_failure("cohort")
def classify(
    cohort: Any,
    *,
    label: str = Keys.LABEL,
    model: str = "logistic",
    cv: int = 5,
    seed: int = 0,
    use_rep: str | None = f"X_{Keys.PREFIX}",
    n_pcs: int | None = None,
    tiles_key: str = f"{Keys.PREFIX}_{Keys.TILES}",
    epochs: int = 150,
    key_added: str = Keys.PREFIX,
) -> dict[str, Any]:
    """Cross-validated slide classification from slide embeddings (AUC, balanced accuracy).

    Folds are stratified by class and shuffled with ``seed``. In each fold the features are
    standardised (optionally reduced to ``n_pcs`` principal components) on the training slides.

    Parameters
    ----------
    cohort
        AnnData with one row per slide (from :func:`stranker.tl.embed_slides`).
    label
        Column of ``obs`` with the classes.
    model
        ``'logistic'`` (L2 logistic regression, strength chosen by inner 3-fold CV) or ``'attention'``
        (gated-attention MIL on the tile embeddings, cross-entropy).
    cv
        Number of folds.
    seed
        Seed of the folds and of the models.
    use_rep
        ``obsm`` key of the slide features (``None``: ``X``). Unused by ``'attention'``.
    n_pcs
        Reduce the standardised features to this many principal components within each fold.
    tiles_key
        ``uns`` key of the tile embeddings (for ``'attention'``).
    epochs
        Training steps of the attention network.
    key_added
        Prefix of the written keys.

    Returns
    -------
    Dict with ``auc`` (mean over folds; one-vs-rest macro average for more than two classes),
    ``auc_sd``, ``auc_folds``, ``auc_pooled`` (on all out-of-fold probabilities), ``balanced_accuracy``
    (out-of-fold), ``classes``, ``fold``, ``model``. Written into ``cohort``: ``obs['{key_added}_pred']``
    (out-of-fold class), ``obsm['{key_added}_proba']`` (out-of-fold probabilities, columns = ``classes``)
    and ``uns['{key_added}_classify'][model]`` (the dict).
    """
    import pandas as pd
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    if model not in CLASSIFY_MODELS:
        raise InputError(f"`model` must be one of {list(CLASSIFY_MODELS)}, got {model!r}.")
    classes, y = _labels(cohort.obs, label)
    _check_cv(len(y), cv, {str(c): int((y == j).sum()) for j, c in enumerate(classes)}, n_pcs)
    fold = folds(y, cv, seed)
    if model == "attention":
        bags = _bags(cohort, tiles_key)
    else:
        x = _features(cohort, use_rep)

    def auc(yt: np.ndarray, p: np.ndarray) -> float:
        if len(classes) == 2:
            return float(roc_auc_score(yt == 1, p[:, 1]))
        return float(roc_auc_score(yt, p, multi_class="ovr", labels=np.arange(len(classes))))

    proba = np.zeros((len(y), len(classes)))
    aucs = []
    with _one_blas_thread():
        for k in range(cv):
            tr, te = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
            if model == "attention":
                import torch

                from ..model.mil import predict_mil, train_mil

                b_tr, b_te = _standardise_bags([bags[i] for i in tr], [bags[i] for i in te])
                net = train_mil(b_tr, y[tr], task="ce", n_classes=len(classes), epochs=epochs, seed=seed + k)
                proba[te] = torch.softmax(torch.from_numpy(predict_mil(net, b_te)[0]), 1).numpy()
            else:
                x_tr, x_te = _transform(x[tr], x[te], n_pcs, seed)
                clf = _fit_logistic(x_tr, y[tr], seed)
                proba[te] = clf.predict_proba(x_te)
            aucs.append(auc(y[te], proba[te]))
    pred = proba.argmax(1)
    result = {
        "model": model,
        "auc": float(np.mean(aucs)),
        "auc_sd": float(np.std(aucs)),
        "auc_folds": np.asarray(aucs),
        "auc_pooled": auc(y, proba),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "classes": list(map(str, classes)),
        "cv": int(cv),
        "seed": int(seed),
        "fold": fold,
    }
    uns_key = f"{key_added}_{Keys.CLASSIFY}"
    record = dict(cohort.uns.get(uns_key, {}))
    record[model] = result
    write_cohort(
        cohort,
        obs={f"{key_added}_{Keys.PRED}": pd.Categorical(classes[pred], categories=list(classes))},
        obsm={f"{key_added}_{Keys.PROBA}": proba},
        uns={uns_key: record},
    )
    logger.info(f"{model}: AUC {result['auc']:.3f} ± {result['auc_sd']:.3f} over {cv} folds")
    return result


# --------------------------------------------------------------------------------------------
# attention pooling on the whole cohort (sr.tl.embed_slides(pooling='attention'))
# --------------------------------------------------------------------------------------------
def fit_mil_all(bags: list[np.ndarray], meta: Any, label: Any, *, seed: int, epochs: int = 150):
    """Train the attention MIL on every slide against ``label``; pooled vectors and attention weights."""
    from ..model.mil import predict_mil, train_mil

    std, _ = _standardise_bags(bags, [])
    if isinstance(label, tuple | list):
        if len(label) != 2:
            raise InputError(f"A survival `label` is a pair (time, event) of columns, got {label!r}.")
        t, e = survival_target(meta, label[0], label[1])
        net = train_mil(std, t, task="cox", event=e, epochs=epochs, seed=seed)
    else:
        classes, y = _labels(meta, label)
        net = train_mil(std, y, task="ce", n_classes=len(classes), epochs=epochs, seed=seed)
    _, attention, pooled = predict_mil(net, std)
    return pooled, attention

