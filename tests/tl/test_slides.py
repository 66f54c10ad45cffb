"""sr.datasets.synthetic_cohort and sr.tl.embed_slides (fixtures `slide_model`, `slide_cohort`: conftest)."""


import numpy as np
import pandas as pd
import pytest

import stranker as sr
from stranker._errors import InputError
from stranker.section import as_sections
from stranker.tl._predict import tissue_grid


def test_synthetic_cohort_is_image_only_and_follows_its_law(slide_cohort):
    from sksurv.metrics import concordance_index_censored

    slides, clinical, _ = slide_cohort
    assert len(slides) == len(clinical) == 60
    for s, sid in zip(slides[:5], clinical.index[:5], strict=True):
        assert list(s.images) == ["he"] and not s.tables and not s.shapes
        assert s.attrs["slide_id"] == sid
    assert list(clinical.columns) == ["time", "event", "label", "fraction", "risk"]
    assert (clinical["time"] > 0).all() and clinical["event"].dtype == bool
    assert 0.15 < 1 - clinical["event"].mean() < 0.45  # ~30 % censored
    assert clinical["label"].value_counts().min() == 30
    # risk is a monotone function of the painted fraction; high-label slides have more of it
    assert pd.Series(clinical["risk"]).corr(clinical["fraction"], method="spearman") == pytest.approx(1.0)
    by_label = clinical.groupby("label", observed=True)["fraction"].mean()
    assert by_label["high"] > by_label["low"] + 0.15
    oracle = concordance_index_censored(clinical["event"].to_numpy(), clinical["time"].to_numpy(),
                                        clinical["risk"].to_numpy())[0]
    assert oracle > 0.7
    # deterministic in the seed
    again, clin2 = sr.datasets.synthetic_cohort(3, size_px=128, seed=4)
    other, clin3 = sr.datasets.synthetic_cohort(3, size_px=128, seed=4)
    np.testing.assert_array_equal(again[1].images["he"].values, other[1].images["he"].values)
    pd.testing.assert_frame_equal(clin2, clin3)


def test_embed_slides_pools_streamed_tiles(slide_cohort):
    slides, clinical, cohort = slide_cohort
    assert list(cohort.obs_names) == list(clinical.index)
    assert {"time", "event", "label"} <= set(cohort.obs.columns)
    n = cohort.obs["stranker_n_tiles"].to_numpy()
    assert (n >= 3).all() and np.median(n) > 15  # fat is nearly white: the tissue detector may drop it
    bags = cohort.uns["stranker_tiles"]["embeddings"]
    np.testing.assert_array_equal(n, [len(bags[i]) for i in cohort.obs_names])
    means = np.stack([bags[i].mean(0) for i in cohort.obs_names])
    np.testing.assert_allclose(cohort.obsm["X_stranker"], means, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cohort.X, cohort.obsm["X_stranker"])
    # slides are read, never written
    assert not slides[0].tables and not slides[0].shapes


def test_embed_slides_uses_the_tiling_of_predict(slide_model, slide_cohort):
    from spatialdata import deepcopy

    slides, _, cohort = slide_cohort
    s = deepcopy(slides[0])
    sr.tl.predict(slide_model, s)
    tiles = s.tables["stranker_table"]
    sid = cohort.obs_names[0]
    np.testing.assert_allclose(cohort.uns["stranker_tiles"]["centers"][sid], tiles.obsm["spatial"], atol=1e-3)
    np.testing.assert_allclose(cohort.uns["stranker_tiles"]["embeddings"][sid], tiles.obsm["X_stranker"],
                               rtol=1e-4, atol=1e-5)
    sp = as_sections(slides[0], need_table=False)[0]
    n_grid = len(tissue_grid(sp, slide_model.meta["spot_diameter_px"]))
    assert n_grid == cohort.obs["stranker_n_tiles"].iloc[0]


def test_embed_slides_with_spots_and_ids_from_obs(slide_model, synthetic_small):
    sec = synthetic_small[3]
    obs = pd.DataFrame({"grade": [2]}, index=["caseA"])
    out = sr.tl.embed_slides(slide_model, sec, obs=obs)
    assert list(out.obs_names) == ["caseA"] and out.obs["grade"].iloc[0] == 2
    assert out.obs["stranker_n_tiles"].iloc[0] == sec.tables["table"].n_obs
    np.testing.assert_allclose(out.X[0], slide_model.embed(sec).mean(0), rtol=1e-4, atol=1e-5)
    assert "stranker_tiles" not in out.uns


def test_embed_slides_bad_input(slide_model, slide_cohort):
    slides, clinical, _ = slide_cohort
    few = slides[:3]
    with pytest.raises(InputError, match="no row in `obs`"):
        sr.tl.embed_slides(slide_model, few, obs=clinical.set_axis([f"X{i}" for i in range(60)]))
    with pytest.raises(InputError, match="pooling"):
        sr.tl.embed_slides(slide_model, few, pooling="max")
    with pytest.raises(InputError, match="label"):
        sr.tl.embed_slides(slide_model, few, pooling="attention")
    bare = [s.__class__(images=dict(s.images)) for s in few]  # no slide ids: obs rows must be in slide order
    for b, s in zip(bare, few, strict=True):
        b.attrs["microns_per_pixel"] = s.attrs["microns_per_pixel"]
    with pytest.raises(InputError, match="rows for 3 slides"):
        sr.tl.embed_slides(slide_model, bare, obs=clinical)
    out = sr.tl.embed_slides(slide_model, bare, obs=clinical.iloc[:3])
    assert list(out.obs_names) == list(clinical.index[:3])
    bare[1].attrs["slide_id"] = "P000"
    with pytest.raises(InputError, match="slide_id"):
        sr.tl.embed_slides(slide_model, bare)


def test_attention_pooling_trains_against_a_label(slide_cohort, slide_model):
    slides, clinical, _ = slide_cohort
    out = sr.tl.embed_slides(slide_model, slides[:12], obs=clinical, pooling="attention", label="label")
    att = out.uns["stranker_tiles"]["attention"]
    for sid in out.obs_names:
        assert len(att[sid]) == out.obs.loc[sid, "stranker_n_tiles"]
        assert att[sid].sum() == pytest.approx(1.0, abs=1e-5) and (att[sid] >= 0).all()
    assert out.obsm["X_stranker"].shape == (12, 64)
    surv = sr.tl.embed_slides(slide_model, slides[:12], obs=clinical, pooling="attention",
                              label=("time", "event"))
    assert np.isfinite(surv.X).all()


def test_cohort_with_tiles_round_trips_through_h5ad(slide_cohort, tmp_path):
    import anndata as ad

    _, _, cohort = slide_cohort
    cohort.write_h5ad(tmp_path / "c.h5ad")
    back = ad.read_h5ad(tmp_path / "c.h5ad")
    sid = cohort.obs_names[3]
    np.testing.assert_array_equal(back.uns["stranker_tiles"]["embeddings"][sid],
                                  cohort.uns["stranker_tiles"]["embeddings"][sid])



def test_embed_slides_leaves_the_logger_level_alone(slide_model, slide_cohort):
    # it used to raise the global 'stranker' logger level while embedding a cohort
    import logging

    slides, _, _ = slide_cohort
    log = logging.getLogger("stranker")
    before = log.level
    seen = []
    real = type(slide_model).infer

    class Spy(type(slide_model)):
        def infer(self, *a, **k):
            seen.append(log.level)
            return real(self, *a, **k)

    spy = object.__new__(Spy)
    spy.__dict__.update(slide_model.__dict__)
    sr.tl.embed_slides(spy, slides[:2])
    assert seen == [before, before] and log.level == before
