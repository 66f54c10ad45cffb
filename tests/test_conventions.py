"""scverse conventions across the API: `key=` reads, `key_added=` writes, renamed arguments warn."""

import warnings

import numpy as np
import pytest

import stranker as sr


def _predicted(key="pred"):
    """A squidpy-layout AnnData with counts and the predictions a `sr.tl.predict(key_added=key)` leaves."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.uniform(2, 30, size=(30, 4))).astype(np.float32)
    a = ad.AnnData(counts, obs=pd.DataFrame(index=[f"s{i}" for i in range(30)]),
                   var=pd.DataFrame(index=[f"G{j}" for j in range(4)]))
    a.obsm["spatial"] = rng.uniform(0, 100, size=(30, 2))
    a.layers[key] = np.log1p(counts).astype(np.float32)
    a.layers[key][:, 3] = np.nan
    a.uns[key] = {"genes": ["G0", "G1", "G2"]}
    return a


def test_evaluate_reads_key_and_writes_key_added():
    a = _predicted("pred")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        m = sr.tl.evaluate(a, key="pred", key_added="score")
    assert m["n_genes"] == 3
    assert "score_pcc" in a.var and a.uns["score"]["metrics"]["n_genes"] == 3
    assert "metrics" not in a.uns["pred"]  # what was read is not written over
    sr.tl.evaluate(a, key="pred")  # key_added defaults to key
    assert "pred_pcc" in a.var and "metrics" in a.uns["pred"]


def test_evaluate_key_added_alone_still_reads_it_with_a_future_warning():
    a = _predicted("pred")
    with pytest.warns(FutureWarning, match="pass `key=`"):
        sr.tl.evaluate(a, key_added="pred")
    assert "pred_pcc" in a.var


def test_split_sections_seed_defaults_to_settings():
    items = list(range(12))
    before = sr.settings.seed
    try:
        sr.settings.seed = 5
        a = sr.pp.split_sections(items)
    finally:
        sr.settings.seed = before
    assert a == sr.pp.split_sections(items, seed=5)
    assert any(sr.pp.split_sections(items, seed=s) != a for s in (0, 1, 2))


def test_functions_that_draw_random_numbers_default_to_settings_seed():
    import inspect

    for fn in (sr.pp.split_sections, sr.tl.fit, sr.tl.embed_slides, sr.tl.survival, sr.tl.classify,
               sr.pl.embedding):
        assert inspect.signature(fn).parameters["seed"].default is None, fn.__name__
