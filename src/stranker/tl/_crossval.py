"""Cross-validation shared by sr.tl.survival and sr.tl.classify: folds, slide features, fold-wise transforms.

Every model of a call sees the same folds (stratified by event or class, shuffled by ``seed``), and
every fitted transformation (standardisation, PCA, penalty choice) is learnt on the training part
of a fold only.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import numpy as np

from .._errors import InputError


def features(cohort: Any, use_rep: str | None) -> np.ndarray:
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


def bags(cohort: Any, tiles_key: str) -> list[np.ndarray]:
    tiles = cohort.uns.get(tiles_key, {})
    emb = tiles.get("embeddings") if isinstance(tiles, dict) else None
    if emb is None:
        raise InputError(
            f"`method='attention'` trains on the tile embeddings, but `uns[{tiles_key!r}]['embeddings']` is "
            "missing: run `sr.tl.embed_slides(..., keep_tiles=True)`."
        )
    missing = [i for i in cohort.obs_names if i not in emb]
    if missing:
        raise InputError(f"No tile embeddings in `uns[{tiles_key!r}]` for slides {missing[:5]}.")
    return [np.asarray(emb[i], dtype=np.float32) for i in cohort.obs_names]


@contextmanager
def one_blas_thread():
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


def check_cv(n: int, cv: int, counts: dict[str, int], n_pcs: int | None = None) -> None:
    """Refuse a fold count (or ``n_pcs``) that the slides cannot support, naming what to change."""
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


def transform(x_train: np.ndarray, x_test: np.ndarray, n_pcs: int | None, seed: int):
    """Standardise (and project on ``n_pcs`` principal components), fitted on the training part only."""
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    steps = [StandardScaler()]
    if n_pcs is not None:
        steps.append(PCA(n_components=min(int(n_pcs), *x_train.shape), random_state=seed))
    pipe = make_pipeline(*steps).fit(x_train)
    return pipe.transform(x_train), pipe.transform(x_test)


def standardise_bags(train: list[np.ndarray], test: list[np.ndarray]) -> tuple[list, list]:
    allt = np.concatenate(train)
    mu, sd = allt.mean(0), allt.std(0) + 1e-6
    return [(b - mu) / sd for b in train], [(b - mu) / sd for b in test]
