"""sr.tl.classify: cross-validated slide classification from slide embeddings (AUC, balanced accuracy).

Results go to ``uns`` under the method's name, so several methods sit side by side.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._constants import Keys
from .._deprecate import _UNSET, renamed
from .._docs import doc_params
from .._errors import InputError
from .._settings import logger, resolve_seed
from ..write import unchanged_on_failure, write_cohort
from ._crossval import bags, check_cv, features, folds, one_blas_thread, standardise_bags, transform

CLASSIFY_METHODS = ("logistic", "attention")


def labels(obs: Any, label: str) -> tuple[np.ndarray, np.ndarray]:
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
@doc_params()
def classify(
    cohort: Any,
    *,
    label: str = Keys.LABEL,
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
    """Cross-validated slide classification from slide embeddings (AUC, balanced accuracy).

    Folds are stratified by class and shuffled with ``seed``. In each fold the features are
    standardised (optionally reduced to ``n_pcs`` principal components) on the training slides.

    Parameters
    ----------
    cohort
        AnnData with one row per slide (from :func:`stranker.tl.embed_slides`).
    label
        Column of ``obs`` with the classes.
    method
        ``'logistic'`` (L2 logistic regression, strength chosen by inner 3-fold CV) or ``'attention'``
        (gated-attention MIL on the tile embeddings, cross-entropy).
    {doc_crossval}

    Returns
    -------
    Dict with ``auc`` (mean over folds; one-vs-rest macro average for more than two classes),
    ``auc_sd``, ``auc_folds``, ``auc_pooled`` (on all out-of-fold probabilities), ``balanced_accuracy``
    (out-of-fold), ``classes``, ``fold``, ``method``. Written into ``cohort``: ``obs['{key_added}_pred']``
    (out-of-fold class), ``obsm['{key_added}_proba']`` (out-of-fold probabilities, columns = ``classes``)
    and ``uns['{key_added}_classify'][method]`` (the dict).
    """
    import pandas as pd
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    cohort = cohort.copy() if copy else cohort
    method = renamed("sr.tl.classify", "model", "method", model, method, "logistic")
    if method not in CLASSIFY_METHODS:
        raise InputError(f"`method` must be one of {list(CLASSIFY_METHODS)}, got {method!r}.")
    seed = resolve_seed(seed)
    classes, y = labels(cohort.obs, label)
    check_cv(len(y), cv, {str(c): int((y == j).sum()) for j, c in enumerate(classes)}, n_pcs)
    fold = folds(y, cv, seed)
    if method == "attention":
        tile_bags = bags(cohort, tiles_key)
    else:
        x = features(cohort, use_rep)

    def auc(yt: np.ndarray, p: np.ndarray) -> float:
        if len(classes) == 2:
            return float(roc_auc_score(yt == 1, p[:, 1]))
        return float(roc_auc_score(yt, p, multi_class="ovr", labels=np.arange(len(classes))))

    proba = np.zeros((len(y), len(classes)))
    aucs = []
    with one_blas_thread():
        for k in range(cv):
            tr, te = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
            if method == "attention":
                import torch

                from ..model.mil import predict_mil, train_mil

                b_tr, b_te = standardise_bags([tile_bags[i] for i in tr], [tile_bags[i] for i in te])
                net = train_mil(b_tr, y[tr], task="ce", n_classes=len(classes), epochs=epochs, seed=seed + k)
                proba[te] = torch.softmax(torch.from_numpy(predict_mil(net, b_te)[0]), 1).numpy()
            else:
                x_tr, x_te = transform(x[tr], x[te], n_pcs, seed)
                clf = _fit_logistic(x_tr, y[tr], seed)
                proba[te] = clf.predict_proba(x_te)
            aucs.append(auc(y[te], proba[te]))
    pred = proba.argmax(1)
    result = {
        "method": method,
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
    record[method] = result
    write_cohort(
        cohort,
        obs={f"{key_added}_{Keys.PRED}": pd.Categorical(classes[pred], categories=list(classes))},
        obsm={f"{key_added}_{Keys.PROBA}": proba},
        uns={uns_key: record},
    )
    logger.info(f"{method}: AUC {result['auc']:.3f} ± {result['auc_sd']:.3f} over {cv} folds")
    return cohort if copy else result


