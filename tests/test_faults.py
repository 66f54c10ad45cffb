"""Fault cases a careless or hostile user hits: a clear error (or warning), and the data left as it was."""


import numpy as np
import pytest
from shapely.geometry import Point

import stranker as sr
from stranker._errors import InputError

from .conftest import make_sdata

TINY = dict(epochs=1, batch_size=8, patch_px=32, image_size=32, backbone="test_resnet", seed=0,
            pretrained=False, genes=["G0", "G1", "G2", "G3", "G4"])


def _section(seed=1, counts=None, n=16):
    return make_sdata(n=n, seed=seed, counts=counts)[0]


def _state(sdata):
    """Everything a call could change in a section: element keys, and the table's every container."""
    t = sdata.tables["table"]

    def dense(m):
        return m.toarray() if hasattr(m, "toarray") else np.asarray(m)

    return (
        {k: sorted(getattr(sdata, k)) for k in ("images", "shapes", "tables")},
        dense(t.X).tobytes(), {k: dense(v).tobytes() for k, v in t.layers.items()},
        {k: np.asarray(v).tobytes() for k, v in t.obsm.items()}, sorted(t.uns),
        t.obs.to_dict("list"), t.var.to_dict("list"),
    )


@pytest.fixture(scope="module")
def model():
    return sr.tl.fit(_section(seed=0), **TINY)




# --------------------------------------------------------------------------------------------
# settings: refused before any data is read, with the name of the argument
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("option", "value", "match"), [
    ("epochs", 1.5, "`epochs` must be a whole number"),
    ("batch_size", 8.0, "`batch_size` must be a whole number"),
    ("lr", 0.0, "`lr` must be a positive number"),
    ("temperature", -1.0, "`temperature` must be a positive number"),
    ("dropout", 1.0, r"`dropout` must be in \[0, 1\)"),
])
def test_fit_refuses_settings_that_are_not_whole_or_positive(option, value, match):
    sdata = _section()
    before = _state(sdata)
    with pytest.raises(ValueError, match=match):
        sr.tl.fit(sdata, **{**TINY, option: value})
    assert _state(sdata) == before


def test_target_sum_must_be_positive():
    sdata = _section()
    before = _state(sdata)
    with pytest.raises(InputError, match="`target_sum` must be a positive number"):
        sr.tl.fit(sdata, target_sum=0, **TINY)
    with pytest.raises(InputError, match="`target_sum`"):
        sr.pp.normalize(sdata, target_sum=-1)
    assert _state(sdata) == before


# --------------------------------------------------------------------------------------------
# counts
# --------------------------------------------------------------------------------------------
def test_all_zero_counts_are_refused_not_trained_on():
    sdata = _section(counts=np.zeros((16, 5), np.float32))
    before = _state(sdata)
    with pytest.raises(InputError, match="all zero"):
        sr.tl.fit(sdata, **TINY)
    with pytest.raises(InputError, match="all zero"):
        sr.pp.normalize(sdata)
    assert _state(sdata) == before


def test_non_integer_counts_warn_that_they_look_normalised(stranker_log):
    counts = np.random.default_rng(0).poisson(3.0, (16, 5)).astype(np.float32)
    sr.pp.normalize(_section(counts=counts))
    assert "non-integer" not in stranker_log.text
    sr.pp.normalize(_section(counts=np.log1p(counts)))  # X already log-transformed: a common slip
    assert "non-integer values" in stranker_log.text and "layer=" in stranker_log.text


# --------------------------------------------------------------------------------------------
# spots
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("radius", [0.0, -3.0, np.nan])
def test_spots_without_a_size_are_refused(radius):
    sdata = _section()
    sdata.shapes["spots"]["radius"] = radius
    before = _state(sdata)
    with pytest.raises(InputError, match="zero, negative or missing size"):
        sr.tl.fit(sdata, **TINY)
    assert _state(sdata) == before


def test_nan_coordinates_are_named_as_such(model):
    sdata = _section()
    sdata.shapes["spots"].loc["s3", "geometry"] = Point(np.nan, np.nan)
    before = _state(sdata)
    with pytest.raises(InputError, match=r"NaN or infinite coordinates, e.g. \['s3'\]"):
        sr.tl.predict(model, sdata)
    assert _state(sdata) == before


def test_the_same_section_twice_is_refused():
    sdata = _section()
    before = _state(sdata)
    with pytest.raises(InputError, match="pass each training section once"):
        sr.tl.fit([sdata, sdata], **TINY)
    assert _state(sdata) == before


# --------------------------------------------------------------------------------------------
# key_added
# --------------------------------------------------------------------------------------------
def test_key_added_never_overwrites_the_users_own_data(model):
    sdata = _section()
    before = _state(sdata)
    with pytest.raises(InputError, match=r"would overwrite layers\['counts'\].*another `key_added=`"):
        sr.tl.predict(model, sdata, key_added="counts")
    sdata.tables["table"].uns["spatial"] = {"lib": {}}
    before = _state(sdata)
    with pytest.raises(InputError, match=r"uns\['spatial'\]"):
        sr.tl.fit(sdata, key_added="spatial", **TINY)
    for bad in ("", 5):
        with pytest.raises(InputError, match="`key_added` must be a non-empty string"):
            sr.tl.predict(model, sdata, key_added=bad)
    assert _state(sdata) == before


def test_key_added_replaces_an_earlier_stranker_result(model):
    sdata = _section()
    sr.tl.predict(model, sdata)
    sr.tl.predict(model, sdata)  # run again: the previous result is replaced
    assert sdata.tables["table"].uns["stranker"]["in_sample"] is False


def test_predict_replaces_the_elements_it_added_never_the_users(model):
    import anndata as ad
    import geopandas as gpd
    from shapely.geometry import Polygon
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel

    def elements(sdata):
        return {k: {n: id(e) for n, e in getattr(sdata, k).items()} for k in ("images", "shapes", "tables")}

    # spots without a table: predict adds the table 'stranker_table' annotating them
    s = _section()
    sdata = SpatialData(images={"he": s.images["he"]},
                        shapes={"spots": s.shapes["spots"], "more": s.shapes["spots"].iloc[:8].copy()})
    sr.tl.predict(model, sdata, shapes_key="spots")
    first = sdata.tables["stranker_table"]
    sr.tl.predict(model, sdata, shapes_key="more")  # a table an earlier predict added is replaced
    assert sdata.tables["stranker_table"] is not first and sdata.tables["stranker_table"].n_obs == 8
    sdata.tables["stranker_table"] = TableModel.parse(ad.AnnData(np.zeros((2, 1))))  # now the user's own
    before = elements(sdata)
    with pytest.raises(InputError, match=r"'stranker_table', which stranker did not write.*`key_added=`"):
        sr.tl.predict(model, sdata, shapes_key="spots")
    assert elements(sdata) == before
    # an image-only slide: predict adds tiles 'stranker_tiles', never over an element of the user's
    tissue = np.random.default_rng(0).integers(60, 200, (3, 128, 128), dtype=np.uint8)
    outline = ShapesModel.parse(gpd.GeoDataFrame(geometry=[Polygon([(0, 0), (0, 9), (9, 9)])]))
    slide = SpatialData(images={"he": Image2DModel.parse(tissue, dims=("c", "y", "x"))},
                        shapes={"stranker_tiles": outline})
    before = elements(slide)
    with pytest.raises(InputError, match=r"'stranker_tiles', which stranker did not write.*`key_added=`"):
        sr.tl.predict(model, slide, tile_px=16)
    assert elements(slide) == before
    sr.tl.predict(model, slide, tile_px=16, key_added="pred")
    assert "pred_tiles" in slide.shapes and "pred_table" in slide.tables
    # predicting again lays the tiles anew (its own earlier tiles are not read as spots): tile_px counts
    n16 = slide.tables["pred_table"].n_obs
    sr.tl.predict(model, slide, tile_px=32, key_added="pred")
    assert 2 * slide.shapes["pred_tiles"]["radius"].iloc[0] == pytest.approx(32)
    assert slide.tables["pred_table"].n_obs < n16


# --------------------------------------------------------------------------------------------
# evaluate / survival arguments
# --------------------------------------------------------------------------------------------
def test_evaluate_refuses_empty_genes_and_bad_n_heg(model):
    sdata = _section()
    sr.tl.predict(model, sdata)
    before = _state(sdata)
    with pytest.raises(InputError, match="`genes` is empty"):
        sr.tl.evaluate(sdata, genes=[])
    for n_heg in (0, -1, 2.5):
        with pytest.raises(InputError, match="`n_heg` must be a whole number"):
            sr.tl.evaluate(sdata, n_heg=n_heg)
    with pytest.raises(InputError, match="`target_sum`"):
        sr.tl.evaluate(sdata, target_sum=0)
    assert _state(sdata) == before


@pytest.mark.parametrize("task", ["survival", "classify"])
def test_n_pcs_must_be_positive(task):
    import anndata as ad

    rng = np.random.default_rng(0)
    cohort = ad.AnnData(rng.normal(size=(20, 4)).astype(np.float32))
    cohort.obs["time"] = rng.uniform(1, 100, 20)
    cohort.obs["event"] = np.tile([0, 1], 10)
    cohort.obs["label"] = np.tile(["a", "b"], 10)
    with pytest.raises(InputError, match="`n_pcs` must be a whole number >= 1"):
        getattr(sr.tl, task)(cohort, cv=2, use_rep=None, n_pcs=0)
    assert "stranker_risk" not in cohort.obs and "stranker_pred" not in cohort.obs


# --------------------------------------------------------------------------------------------
# a failure while writing (one section written, the next fails) leaves every object as it was
# --------------------------------------------------------------------------------------------
def _fail_on_call(monkeypatch, module, n):
    """Make ``module.write_results`` raise on its ``n``-th call (the earlier ones write)."""
    real = module.write_results
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt("interrupted while writing")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "write_results", flaky)
    return calls


def test_predict_interrupted_mid_write_leaves_every_section_unchanged(model, monkeypatch):
    import stranker.write.predictions as fit_module  # write_outputs' module: the one writer of model outputs

    secs = [_section(seed=1), _section(seed=2)]
    before = [_state(s) for s in secs]
    calls = _fail_on_call(monkeypatch, fit_module, 2)  # section 1 written, section 2 interrupted
    with pytest.raises(KeyboardInterrupt):
        sr.tl.predict(model, secs)
    assert len(calls) == 2
    assert [_state(s) for s in secs] == before


def test_fit_interrupted_mid_write_leaves_every_section_unchanged(monkeypatch):
    import stranker.write.predictions as fit_module  # write_outputs' module: the one writer of model outputs

    secs = [_section(seed=1), _section(seed=2)]
    before = [_state(s) for s in secs]
    _fail_on_call(monkeypatch, fit_module, 2)
    with pytest.raises(KeyboardInterrupt):
        sr.tl.fit(secs, **TINY)
    assert [_state(s) for s in secs] == before


def test_evaluate_interrupted_mid_write_leaves_every_section_unchanged(model, monkeypatch):
    import stranker.tl._evaluate as evaluate_module

    secs = [_section(seed=1), _section(seed=2)]
    sr.tl.predict(model, secs)
    before = [_state(s) for s in secs]
    _fail_on_call(monkeypatch, evaluate_module, 2)
    with pytest.raises(KeyboardInterrupt):
        sr.tl.evaluate(secs)
    assert [_state(s) for s in secs] == before


def test_predict_on_a_slide_interrupted_after_adding_tiles_removes_them(model, monkeypatch):
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    import stranker.write.predictions as fit_module  # write_outputs' module: the one writer of model outputs

    tissue = np.random.default_rng(0).integers(60, 200, (3, 128, 128), dtype=np.uint8)  # stained everywhere
    sdata = SpatialData(images={"he": Image2DModel.parse(tissue, dims=("c", "y", "x"))})
    elements = {k: sorted(getattr(sdata, k)) for k in ("images", "shapes", "tables")}
    _fail_on_call(monkeypatch, fit_module, 1)
    with pytest.raises(KeyboardInterrupt):
        sr.tl.predict(model, sdata, tile_px=16)
    assert {k: sorted(getattr(sdata, k)) for k in ("images", "shapes", "tables")} == elements


# --------------------------------------------------------------------------------------------
# a model on data of another shape; squidpy-layout AnnData with a misplaced image or scale
# --------------------------------------------------------------------------------------------
def test_predict_refuses_features_of_another_width_or_with_nan():
    train = _section(seed=0)
    train.tables["table"].obsm["feat"] = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    m = sr.tl.fit(train, image_features="feat", **TINY)
    for feats, match in ((np.ones((16, 12), np.float32), r"shape \(16, 12\).*trained on 8 features"),
                         (np.full((16, 8), np.nan, np.float32), "NaN or infinite")):
        sdata = _section()
        sdata.tables["table"].obsm["feat"] = feats
        before = _state(sdata)
        with pytest.raises(InputError, match=match):
            sr.tl.predict(m, sdata)
        assert _state(sdata) == before


def _squidpy_adata():
    adata = _section().tables["table"].copy()
    adata.obsm["spatial"] = np.random.default_rng(0).uniform(20, 180, (16, 2))
    adata.uns["spatial"] = {"lib": {
        "images": {"hires": np.full((200, 240, 3), 120, np.uint8)},
        "scalefactors": {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 16.0},
    }}
    return adata


@pytest.mark.parametrize(("spoil", "match"), [
    (lambda a: a.uns["spatial"]["lib"]["images"].update(hires=np.zeros((3, 200, 240), np.uint8)),
     r"stores \(y, x, channels\).*np.moveaxis"),
    (lambda a: a.uns["spatial"]["lib"]["scalefactors"].update(tissue_hires_scalef=0.0),
     "tissue_hires_scalef.*must be a positive number"),
    (lambda a: a.obsm.__setitem__("spatial", a.obsm["spatial"][:, :1]), r"expected \(n_spots, 2\)"),
])
def test_squidpy_layout_mistakes_are_named(model, spoil, match):
    adata = _squidpy_adata()
    spoil(adata)
    with pytest.raises(InputError, match=match):
        sr.tl.predict(model, adata)
    assert "stranker" not in adata.layers


def test_patches_need_at_least_one_scale():
    with pytest.raises(InputError, match="`scales` must be positive"):
        sr.pp.patches(_section(), size=32, scales=[])


def test_cli_fit_refuses_a_store_given_twice(tmp_path, capsys):
    from stranker._cli import main

    store = str(tmp_path / "a.zarr")
    assert main(["fit", store, f"{tmp_path}/./a.zarr", "--out", str(tmp_path / "m")]) == 2
    assert "given more than once" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_select_genes_interrupted_mid_write_leaves_every_section_unchanged(monkeypatch):
    import stranker.pp._genes as genes_module

    secs = [_section(seed=1), _section(seed=2)]
    before = [_state(s) for s in secs]
    _fail_on_call(monkeypatch, genes_module, 2)
    with pytest.raises(KeyboardInterrupt):
        sr.pp.select_genes(secs, flavor="heg", n_top=3)
    assert [_state(s) for s in secs] == before


def test_survival_interrupted_mid_write_leaves_the_cohort_unchanged(monkeypatch):
    import anndata as ad

    import stranker.tl._survival as survival_module
    from stranker.write import write_cohort

    rng = np.random.default_rng(0)
    cohort = ad.AnnData(rng.normal(size=(20, 4)).astype(np.float32))
    cohort.obs["time"] = rng.uniform(1, 100, 20)
    cohort.obs["event"] = np.tile([0, 1], 10)
    obs_before, uns_before = cohort.obs.copy(), dict(cohort.uns)

    def obs_then_interrupt(adata, *, obs=None, obsm=None, uns=None):
        write_cohort(adata, obs=obs)
        raise KeyboardInterrupt("interrupted between obs and uns")

    monkeypatch.setattr(survival_module, "write_cohort", obs_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        sr.tl.survival(cohort, cv=2, use_rep=None, model="coxph")
    assert cohort.obs.equals(obs_before) and dict(cohort.uns) == uns_before


def test_evaluate_refuses_a_section_of_one_spot(model):
    one = _section(n=1)
    sr.tl.predict(model, one)
    before = _state(one)
    with pytest.raises(InputError, match="fewer than 2 spots"):
        sr.tl.evaluate([_section(), one], genes=["G0", "G1"], layer="counts")
    assert _state(one) == before


def test_aggregate_bins_refuses_a_min_fraction_beyond_one(tmp_path):
    pytest.importorskip("spatialdata_io")
    from tests.section.test_visium import _read_hd, write_visium_hd

    write_visium_hd(tmp_path)
    sdata = _read_hd(tmp_path)
    tables = sorted(sdata.tables)
    with pytest.raises(InputError, match=r"`min_fraction`.*must be in \(0, 1\]"):
        sr.io.aggregate_bins(sdata, bin_size=8, size_um=32, min_fraction=2)
    assert sorted(sdata.tables) == tables


def test_read_hest_patches_names_a_missing_or_foreign_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="HEST patch file .* does not exist"):
        sr.io.read_hest_patches(tmp_path / "nope.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(InputError, match="is not a HEST patch file"):
        sr.io.read_hest_patches(tmp_path / "junk.h5")


def test_embed_patches_never_overwrites_the_spot_coordinates():
    adata = _squidpy_adata()
    xy = adata.obsm["spatial"].copy()
    with pytest.raises(InputError, match="would overwrite the spot coordinates"):
        sr.pp.embed_patches(adata, "test_resnet", size=32, image_size=32, key_added="spatial",
                            pretrained=False)
    np.testing.assert_array_equal(adata.obsm["spatial"], xy)
