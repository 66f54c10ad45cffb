"""sr.pp: normalize, select_genes, smooth, patches (synthetic data and small builders only)."""

import logging

import numpy as np
import pytest
import scipy.sparse as sps

import stranker as sr
from stranker._errors import InputError
from tests.conftest import make_sdata


def _dense(m):
    return m.toarray() if sps.issparse(m) else np.asarray(m)


def _lognorm(counts, target_sum=1e4):
    x = _dense(counts).astype(np.float64)
    tot = x.sum(1, keepdims=True)
    return np.log1p(np.divide(x * target_sum, tot, out=np.zeros_like(x), where=tot > 0))


def _state(sdata):
    """Everything of the table that a stranker function could add to or change."""
    t = sdata.tables["table"] if hasattr(sdata, "tables") else sdata
    return {
        "layers": sorted(t.layers),
        "var": list(t.var.columns),
        "obs": list(t.obs.columns),
        "obsm": sorted(t.obsm),
        "uns": sorted(t.uns),
        "X": _dense(t.X).copy(),
    }


def _same(a, b):
    assert {k: v for k, v in a.items() if k != "X"} == {k: v for k, v in b.items() if k != "X"}
    np.testing.assert_array_equal(a["X"], b["X"])


@pytest.fixture
def synth(synthetic_small):
    """A private deep copy of the session's synthetic sections (never write into the shared one)."""
    from spatialdata import deepcopy

    return [deepcopy(s) for s in synthetic_small]




# --------------------------------------------------------------------------------------------
# normalize
# --------------------------------------------------------------------------------------------
def _scanpy_lognorm(counts):
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(sps.csr_matrix(_dense(counts).astype(np.float32)))
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return _dense(a.X)


def test_normalize_equals_scanpy(synth):
    sd = synth[0]
    t = sd.tables["table"]
    expected = _scanpy_lognorm(t.X)
    assert sr.pp.normalize(sd) is None
    got = t.layers["lognorm"]
    assert got.dtype == np.float32 and got.shape == t.shape
    np.testing.assert_allclose(_dense(got), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_dense(got), _lognorm(t.layers["counts"]), rtol=1e-5, atol=1e-6)
    # X is left as it was (the raw counts)
    np.testing.assert_array_equal(_dense(t.X), _dense(t.layers["counts"]))


def test_normalize_from_layer_and_key_added():
    sd, _ = make_sdata(n=20, seed=3)
    t = sd.tables["table"]
    counts = _dense(t.layers["counts"]).copy()
    t.X = sps.csr_matrix(np.log1p(counts) * 3.3)  # X is something else (already transformed)
    sr.pp.normalize(sd, layer="counts", key_added="ln")
    assert "lognorm" not in t.layers
    np.testing.assert_allclose(_dense(t.layers["ln"]), _scanpy_lognorm(counts), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_dense(t.X), np.log1p(counts) * 3.3, rtol=1e-6)  # untouched


def test_normalize_target_sum():
    sd, _ = make_sdata(n=10, seed=4)
    t = sd.tables["table"]
    sr.pp.normalize(sd, target_sum=100.0)
    np.testing.assert_allclose(np.expm1(_dense(t.layers["lognorm"])).sum(1), 100.0, rtol=1e-4)
    before = _state(sd)
    with pytest.raises(InputError, match="target_sum"):
        sr.pp.normalize(sd, target_sum=0)
    _same(before, _state(sd))


def test_normalize_copy_leaves_original_untouched(synth):
    sd = synth[1]
    before = _state(sd)
    out = sr.pp.normalize(sd, copy=True)
    assert out is not sd and out.tables["table"] is not sd.tables["table"]
    _same(before, _state(sd))
    assert "lognorm" not in sd.tables["table"].layers
    np.testing.assert_allclose(
        _dense(out.tables["table"].layers["lognorm"]),
        _scanpy_lognorm(sd.tables["table"].X),
        rtol=1e-5,
        atol=1e-6,
    )
    # a list is copied item by item
    outs = sr.pp.normalize(synth[:2], copy=True)
    assert isinstance(outs, list) and len(outs) == 2
    assert all(o is not s for o, s in zip(outs, synth[:2], strict=True))
    assert all("lognorm" in o.tables["table"].layers for o in outs)
    assert all("lognorm" not in s.tables["table"].layers for s in synth[:2])


def test_normalize_list_and_anndata(synth):
    import anndata as ad

    assert sr.pp.normalize(synth) is None
    for sd in synth:
        t = sd.tables["table"]
        np.testing.assert_allclose(_dense(t.layers["lognorm"]), _scanpy_lognorm(t.X), rtol=1e-5, atol=1e-6)
    # a plain AnnData with spot coordinates (no image needed)
    t = synth[0].tables["table"]
    a = ad.AnnData(_dense(t.X).copy(), obsm={"spatial": np.asarray(t.obsm["spatial"]).copy()})
    sr.pp.normalize(a)
    np.testing.assert_allclose(a.layers["lognorm"], _scanpy_lognorm(t.X), rtol=1e-5, atol=1e-6)
    b = sr.pp.normalize(a, copy=True, key_added="ln2")
    assert "ln2" in b.layers and "ln2" not in a.layers


@pytest.mark.parametrize("bad", ["nan", "inf", "negative"])
@pytest.mark.parametrize("layer", [None, "counts"])
def test_normalize_rejects_bad_counts(bad, layer):
    counts = np.random.default_rng(0).poisson(3.0, (12, 5)).astype(np.float32)
    counts[4, 2] = {"nan": np.nan, "inf": np.inf, "negative": -1.0}[bad]
    good, _ = make_sdata(seed=1)
    sd, _ = make_sdata(counts=counts)
    before, before_good = _state(sd), _state(good)
    where = "X" if layer is None else r"layers\['counts'\]"
    what = "negative" if bad == "negative" else "NaN or infinite"
    # the bad section second in a list: nothing is written anywhere
    with pytest.raises(InputError, match=rf"{where} of the table of section 'table_1' has 1 {what}"):
        sr.pp.normalize([good, sd], layer=layer)
    with pytest.raises(InputError, match=rf"{where} of the table of section 'table' has 1 {what}"):
        sr.pp.normalize(sd, layer=layer)
    _same(before, _state(sd))
    _same(before_good, _state(good))
    assert "lognorm" not in sd.tables["table"].layers and "lognorm" not in good.tables["table"].layers


def test_normalize_table_without_x():
    import anndata as ad
    import pandas as pd

    obs, var = pd.DataFrame(index=[f"s{i}" for i in range(5)]), pd.DataFrame(index=["a", "b", "c"])
    a = ad.AnnData(obs=obs, var=var)
    a.obsm["spatial"] = np.random.default_rng(0).random((5, 2))
    a.layers["counts"] = np.ones((5, 3), dtype=np.float32)
    assert a.X is None
    with pytest.raises(InputError, match="has no `X`; pass `layer=`"):
        sr.pp.normalize(a)
    assert sorted(a.layers) == ["counts"]
    sr.pp.normalize(a, layer="counts")
    np.testing.assert_allclose(a.layers["lognorm"], np.log1p(1e4 / 3), rtol=1e-6)


def test_normalize_missing_layer():
    sd, _ = make_sdata()
    before = _state(sd)
    with pytest.raises(InputError, match="'raw' not in the table of section 'table'"):
        sr.pp.normalize(sd, layer="raw")
    _same(before, _state(sd))


# --------------------------------------------------------------------------------------------
# select_genes
# --------------------------------------------------------------------------------------------
def test_heg_is_top_mean_lognorm_of_the_training_sections(synth):
    train = synth[:2]
    genes = sr.pp.select_genes(train, flavor="heg", n_top=15)
    x = np.concatenate([_lognorm(s.tables["table"].X) for s in train])
    names = np.asarray(train[0].tables["table"].var_names)
    mean = x.mean(0)
    order = np.argsort(-mean, kind="stable")
    assert np.sort(mean)[::-1][14] - np.sort(mean)[::-1][15] > 1e-4  # no tie at the cut
    assert set(genes) == set(names[order[:15]])
    assert genes == list(names[order[:15]])  # in decreasing mean
    # written into each training table
    for s in train:
        t = s.tables["table"]
        assert t.var["stranker_selected"].dtype == bool
        assert set(t.var_names[t.var["stranker_selected"].to_numpy()]) == set(genes)
        assert t.uns["stranker_selected"]["genes"] == genes
        assert t.uns["stranker_selected"]["flavor"] == "heg"
    # other sections are not touched
    assert "stranker_selected" not in synth[2].tables["table"].var
    # other training sections give another choice
    other = sr.pp.select_genes(synth[2:], flavor="heg", n_top=15)
    x2 = np.concatenate([_lognorm(s.tables["table"].X) for s in synth[2:]])
    assert set(other) == set(names[np.argsort(-x2.mean(0), kind="stable")[:15]])


def _two_sections(n=40):
    """Section A expresses G0-G4 strongly, section B G5-G9; both share G0-G9 plus background genes."""
    rng = np.random.default_rng(7)
    genes = [f"G{j}" for j in range(20)]
    a = rng.poisson(2.0, (n, 20)).astype(np.float32)
    b = rng.poisson(2.0, (n, 20)).astype(np.float32)
    a[:, :5] += rng.poisson(40.0, (n, 5))
    b[:, 5:10] += rng.poisson(40.0, (n, 5))
    sa, _ = make_sdata(n=n, counts=a, genes=genes, seed=1)
    sb, _ = make_sdata(n=n, counts=b, genes=genes, seed=2)
    return sa, sb


def test_heg_depends_only_on_the_sections_given():
    sa, sb = _two_sections()
    assert set(sr.pp.select_genes(sa, flavor="heg", n_top=5)) == {f"G{j}" for j in range(5)}
    assert set(sr.pp.select_genes(sb, flavor="heg", n_top=5)) == {f"G{j}" for j in range(5, 10)}
    assert set(sr.pp.select_genes([sa, sb], flavor="heg", n_top=10)) == {f"G{j}" for j in range(10)}


def _different_gene_sets(n=60):
    rng = np.random.default_rng(11)
    ga = [f"G{j}" for j in range(0, 40)]
    gb = [f"G{j}" for j in range(10, 50)]
    rate_a = rng.lognormal(1.0, 1.0, 40)
    rate_b = rng.lognormal(1.0, 1.0, 40)
    ca = rng.negative_binomial(2, 2 / (2 + rate_a), (n, 40)).astype(np.float32)
    cb = rng.negative_binomial(2, 2 / (2 + rate_b), (n, 40)).astype(np.float32)
    sa, _ = make_sdata(n=n, counts=ca, genes=ga, seed=1, h=400, w=400)
    sb, _ = make_sdata(n=n, counts=cb, genes=gb, seed=2, h=400, w=400)
    return sa, sb


@pytest.mark.parametrize("flavor", ["hvg", "heg"])
def test_hvg_heg_use_genes_present_everywhere(flavor, stranker_log):
    sa, sb = _different_gene_sets()
    genes = sr.pp.select_genes([sa, sb], flavor=flavor, n_top=8, key_added="sel")
    assert len(genes) == 8 == len(set(genes))
    common = {f"G{j}" for j in range(10, 40)}
    assert set(genes) <= common
    for s in (sa, sb):
        t = s.tables["table"]
        assert t.var["sel"].dtype == bool
        assert list(t.var_names[t.var["sel"].to_numpy()]) == [g for g in t.var_names if g in set(genes)]
        assert t.uns["sel"]["genes"] == genes
        assert t.uns["sel"]["flavor"] == flavor
        assert "stranker_selected" not in t.var
    assert any("20 genes not present in every section" in r.getMessage() for r in stranker_log.records)


def test_hvg_matches_scanpy_on_one_section(synth):
    import anndata as ad
    import scanpy as sc

    sd = synth[0]
    genes = sr.pp.select_genes(sd, flavor="hvg", n_top=20)
    a = ad.AnnData(_lognorm(sd.tables["table"].X).astype(np.float32))
    a.var_names = list(sd.tables["table"].var_names)
    sc.pp.highly_variable_genes(a, flavor="seurat", n_top_genes=20)
    assert set(genes) == set(a.var_names[a.var["highly_variable"].to_numpy()])


def test_explicit_list_with_missing_gene():
    sa, sb = _different_gene_sets(n=12)
    before = (_state(sa), _state(sb))
    with pytest.raises(InputError, match="G45") as err:
        sr.pp.select_genes([sa, sb], flavor=["G12", "G45", "G20"])
    assert "on_missing='drop'" in str(err.value)
    assert "1 of 3" in str(err.value)
    _same(before[0], _state(sa))
    _same(before[1], _state(sb))


def test_explicit_list_drop_missing(stranker_log):
    sa, sb = _different_gene_sets(n=12)
    genes = sr.pp.select_genes([sa, sb], flavor=["G12", "G45", "G3", "G20", "G12"], on_missing="drop")
    assert genes == ["G12", "G20"]
    warn = [r for r in stranker_log.records if r.levelno == logging.WARNING]
    assert len(warn) == 1
    assert "Dropping 2 of 4 genes" in warn[0].getMessage()
    assert "G45" in warn[0].getMessage() and "G3" in warn[0].getMessage()
    for s in (sa, sb):
        t = s.tables["table"]
        assert list(t.var_names[t.var["stranker_selected"].to_numpy()]) == ["G12", "G20"]


def test_explicit_list_all_present():
    sa, sb = _different_gene_sets(n=12)
    assert sr.pp.select_genes([sa, sb], flavor=["G30", "G11"]) == ["G30", "G11"]


@pytest.mark.parametrize("flavor", ["hvg", "heg", ["G0", "G1"]])
def test_no_genes_in_common(flavor):
    sa, _ = make_sdata(genes=["G0", "G1", "G2", "G3", "G4"], seed=1)
    sb, _ = make_sdata(genes=["H0", "H1", "H2", "H3", "H4"], seed=2)
    before = (_state(sa), _state(sb))
    with pytest.raises(InputError, match="(?i)no genes in common"):
        sr.pp.select_genes([sa, sb], flavor=flavor, on_missing="drop")
    _same(before[0], _state(sa))
    _same(before[1], _state(sb))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"flavor": "top"}, "`flavor` must be"),
        ({"flavor": "heg", "n_top": 0}, "`n_top` must be at least 1"),
        ({"flavor": ["G0"], "on_missing": "ignore"}, "`on_missing` must be"),
        ({"flavor": []}, "gene list is empty"),
    ],
)
def test_select_genes_bad_arguments(kwargs, match):
    sd, _ = make_sdata()
    before = _state(sd)
    with pytest.raises(InputError, match=match):
        sr.pp.select_genes(sd, **kwargs)
    _same(before, _state(sd))


def test_select_genes_rejects_bad_counts():
    counts = np.random.default_rng(0).poisson(3.0, (12, 5)).astype(np.float32)
    counts[0, 0] = np.nan
    sd, _ = make_sdata(counts=counts)
    before = _state(sd)
    with pytest.raises(InputError, match="NaN"):
        sr.pp.select_genes(sd, flavor="heg", n_top=2)
    _same(before, _state(sd))


# --------------------------------------------------------------------------------------------
# smooth
# --------------------------------------------------------------------------------------------
def _knn_mean(xy, x, k, include_self=True):
    from scipy.spatial import cKDTree

    d, idx = cKDTree(xy).query(xy, k=k + 1)
    assert (idx[:, 0] == np.arange(len(xy))).all()
    assert (d[:, k] > 0).all()
    out = np.empty_like(x, dtype=np.float64)
    for i in range(len(xy)):
        nb = idx[i] if include_self else idx[i, 1:]
        out[i] = x[nb].mean(0)
    return out


def _no_tie_at(xy, k):
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=k + 2)
    return (d[:, k + 1] - d[:, k] > 1e-6).all()


@pytest.mark.parametrize("n_neighs", [1, 4, 6])
def test_smooth_is_the_mean_over_self_and_nearest_neighbours(n_neighs):
    sd, px = make_sdata(n=40, h=300, w=300, seed=5)
    assert _no_tie_at(px, n_neighs)
    sr.pp.normalize(sd)
    t = sd.tables["table"]
    sr.pp.smooth(sd, n_neighs=n_neighs)
    assert t.layers["smoothed"].shape == t.shape
    expected = _knn_mean(px, _dense(t.layers["lognorm"]).astype(np.float64), n_neighs)
    np.testing.assert_allclose(_dense(t.layers["smoothed"]), expected, rtol=1e-5, atol=1e-6)
    # without the spot itself, from X, into another layer
    sr.pp.smooth(sd, layer=None, n_neighs=n_neighs, include_self=False, key_added="sm_x")
    expected = _knn_mean(px, _dense(t.X).astype(np.float64), n_neighs, include_self=False)
    np.testing.assert_allclose(_dense(t.layers["sm_x"]), expected, rtol=1e-5, atol=1e-5)


def test_smooth_sections_separately():
    s1, p1 = make_sdata(n=30, h=300, w=300, seed=6)
    s2, p2 = make_sdata(n=25, h=300, w=300, seed=8)
    assert _no_tie_at(p1, 3) and _no_tie_at(p2, 3)
    sr.pp.normalize([s1, s2])
    sr.pp.smooth([s1, s2], n_neighs=3)
    for sd, px in ((s1, p1), (s2, p2)):
        t = sd.tables["table"]
        expected = _knn_mean(px, _dense(t.layers["lognorm"]).astype(np.float64), 3)
        np.testing.assert_allclose(_dense(t.layers["smoothed"]), expected, rtol=1e-5, atol=1e-6)


def test_smooth_needs_lognorm():
    sd, _ = make_sdata()
    before = _state(sd)
    with pytest.raises(InputError, match=r"'lognorm' not in the table .*`sr\.pp\.normalize`"):
        sr.pp.smooth(sd)
    _same(before, _state(sd))
    with pytest.raises(InputError, match="`n_neighs` must be at least 1"):
        sr.pp.smooth(sd, layer="counts", n_neighs=0)
    _same(before, _state(sd))


def test_smooth_missing_layer_in_one_section_of_a_list():
    s1, _ = make_sdata(seed=1)
    s2, _ = make_sdata(seed=2)
    sr.pp.normalize(s1)
    before = (_state(s1), _state(s2))
    with pytest.raises(InputError, match="sr.pp.normalize"):
        sr.pp.smooth([s1, s2])
    _same(before[0], _state(s1))
    _same(before[1], _state(s2))


def test_smooth_rejects_nan():
    sd, _ = make_sdata()
    t = sd.tables["table"]
    bad = _dense(t.X).astype(np.float32)
    bad[2, 1] = np.nan
    t.layers["lognorm"] = bad
    before = _state(sd)
    with pytest.raises(InputError, match="NaN"):
        sr.pp.smooth(sd)
    _same(before, _state(sd))


def test_smooth_copy():
    sd, px = make_sdata(n=20, seed=9)
    sr.pp.normalize(sd)
    before = _state(sd)
    out = sr.pp.smooth(sd, n_neighs=3, copy=True)
    _same(before, _state(sd))
    assert "smoothed" not in sd.tables["table"].layers
    assert out is not sd and "smoothed" in out.tables["table"].layers
    assert sr.pp.smooth(sd, n_neighs=3) is None
    np.testing.assert_array_equal(_dense(sd.tables["table"].layers["smoothed"]),
                                  _dense(out.tables["table"].layers["smoothed"]))


# --------------------------------------------------------------------------------------------
# patches: sizes and arguments
# --------------------------------------------------------------------------------------------
def test_size_um_needs_a_known_resolution():
    sd, _ = make_sdata()
    before = _state(sd)
    with pytest.raises(InputError, match="no known resolution.*microns_per_pixel"):
        sr.pp.patches(sd, size=None, size_um=10)
    _same(before, _state(sd))


@pytest.mark.parametrize("mpp", [0.5, 2.0])
def test_size_um_equals_size_in_pixels(mpp):
    sd, _ = make_sdata()
    sd.tables["table"].uns["microns_per_pixel"] = mpp
    before = _state(sd)
    px = 24.0
    a = sr.pp.patches(sd, size_um=px * mpp)
    b = sr.pp.patches(sd, size=px)
    assert a.shape == (12, 24, 24, 3)
    np.testing.assert_array_equal(a, b)
    a = sr.pp.patches(sd, size=None, size_um=px * mpp, scales=(1, 2), out_px=8)
    b = sr.pp.patches(sd, size=px, scales=(1, 2), out_px=8)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match="exactly one of"):
        sr.pp.patches(sd, size=px, size_um=px * mpp)
    assert sr.pp.patches(sd, out_px=8).shape == (12, 8, 8, 3)  # neither: 224 px
    _same(before, _state(sd))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"on_outside": "clip"}, "`on_outside` must be 'raise' or 'pad'"),
        ({"size": 0}, "`size` must be a positive number"),
        ({"size": -5}, "`size` must be a positive number"),
        ({"size": float("nan")}, "`size` must be a positive number"),
        ({"size": 20, "size_um": 10}, "exactly one of `size`"),
        ({"scales": (1, 0)}, "`scales` must be positive"),
        ({"out_px": 2}, "`out_px` must be at least 4"),
    ],
)
def test_patches_bad_arguments(kwargs, match):
    sd, _ = make_sdata()
    sd.tables["table"].uns["microns_per_pixel"] = 0.5
    before = _state(sd)
    with pytest.raises(InputError, match=match):
        sr.pp.patches(sd, **kwargs)
    _same(before, _state(sd))


@pytest.mark.parametrize("size_um", [0.0, -5.0, float("nan")])
def test_patches_non_positive_size_um(size_um):
    sd, _ = make_sdata()
    sd.tables["table"].uns["microns_per_pixel"] = 0.5
    before = _state(sd)
    with pytest.raises(InputError, match="`size_um` must be a positive"):
        sr.pp.patches(sd, size=None, size_um=size_um, out_px=8)
    _same(before, _state(sd))
