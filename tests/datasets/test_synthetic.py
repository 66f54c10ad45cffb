import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from stranker.datasets._synthetic import synthetic

PROGRAMS = ["tumour", "stroma", "immune", "fat"]


@pytest.fixture(scope="module")
def sdatas():
    return synthetic(n_sections=4, n_spots=300, seed=0)


def _image(sdata) -> np.ndarray:
    return np.asarray(sdata["he"]["scale0"]["image"].values)


def _counts(sdata) -> np.ndarray:
    return sdata["table"].layers["counts"].toarray()


def test_deterministic_per_seed():
    a = synthetic(n_sections=2, n_spots=60, n_genes=50, seed=3)
    b = synthetic(n_sections=2, n_spots=60, n_genes=50, seed=3)
    c = synthetic(n_sections=2, n_spots=60, n_genes=50, seed=4)
    for sa, sb, sc in zip(a, b, c, strict=True):
        np.testing.assert_array_equal(_counts(sa), _counts(sb))
        np.testing.assert_array_equal(_image(sa), _image(sb))
        np.testing.assert_array_equal(sa["table"].obsm["programs"], sb["table"].obsm["programs"])
        assert not np.array_equal(_counts(sa), _counts(sc))
        assert not np.array_equal(_image(sa), _image(sc))
    # sections differ from each other
    assert not np.array_equal(_image(a[0]), _image(a[1]))


def test_elements_and_shapes(sdatas):
    from spatialdata.transformations import Identity, get_transformation

    assert len(sdatas) == 4
    for i, s in enumerate(sdatas):
        assert set(s.images) == {"he"}
        assert set(s.shapes) == {"spots"}
        assert set(s.tables) == {"table"}

        he = s["he"]
        assert list(he.keys()) == ["scale0", "scale1"]  # multiscale
        img = he["scale0"]["image"]
        assert img.dims == ("c", "y", "x")
        assert list(img.coords["c"].values) == ["r", "g", "b"]
        assert img.dtype == np.uint8
        assert isinstance(get_transformation(img, "global"), Identity)

        shapes = s["spots"]
        assert len(shapes) == 300
        np.testing.assert_allclose(shapes["radius"].to_numpy(), 16.0)
        assert isinstance(get_transformation(shapes, "global"), Identity)

        t = s["table"]
        assert t.shape == (300, 200)
        assert isinstance(t.X, sp.csr_matrix)
        assert t.X.dtype == np.float32
        assert t.layers["counts"] is not t.X
        assert (t.X != t.layers["counts"]).nnz == 0
        assert t.obs_names[5] == f"S{i}_0005"
        assert list(t.obs["spot_id"]) == list(shapes.index)
        assert list(t.obs_names) == list(shapes.index)
        for col in ("region", "section", "program"):
            assert isinstance(t.obs[col].dtype, pd.CategoricalDtype)
        assert set(t.obs["region"]) == {"spots"}
        assert set(t.obs["section"]) == {f"S{i}"}
        assert set(t.obs["program"]) <= set(PROGRAMS)
        attrs = t.uns["spatialdata_attrs"]
        assert attrs["region"] == "spots"
        assert attrs["region_key"] == "region"
        assert attrs["instance_key"] == "spot_id"

        xy = t.obsm["spatial"]
        assert xy.shape == (300, 2) and xy.dtype.kind == "f"
        np.testing.assert_allclose(np.column_stack([shapes.geometry.x, shapes.geometry.y]), xy)
        p = t.obsm["programs"]
        assert p.shape == (300, 4)
        np.testing.assert_allclose(p.sum(1), 1.0)
        assert (p >= 0).all()
        argmax = np.asarray(PROGRAMS)[p.argmax(1)]
        np.testing.assert_array_equal(argmax, t.obs["program"].astype(str).to_numpy())

        assert t.var_names.is_unique
        assert set(t.var["program"]) == set(PROGRAMS)
        meta = t.uns["synthetic"]
        assert meta["seed"] == 0 and meta["section"] == i
        assert meta["programs"] == PROGRAMS
        assert meta["microns_per_pixel"] == pytest.approx(100 / 32)

    # gene model shared by sections, layouts differ
    assert all(list(s["table"].var_names) == list(sdatas[0]["table"].var_names) for s in sdatas)
    assert not np.allclose(sdatas[0]["table"].obsm["programs"], sdatas[1]["table"].obsm["programs"])


def test_counts_are_nonnegative_integers(sdatas):
    for s in sdatas:
        X = _counts(s)
        assert (X >= 0).all()
        np.testing.assert_array_equal(X, np.round(X))
        assert X.sum(1).min() > 0


def test_spots_inside_image(sdatas):
    for s in sdatas:
        _, h, w = _image(s).shape
        xy = s["table"].obsm["spatial"]
        r = 16
        assert (xy[:, 0] - r >= 0).all() and (xy[:, 0] + r <= w).all()
        assert (xy[:, 1] - r >= 0).all() and (xy[:, 1] + r <= h).all()
        # margin of about one spacing around the lattice
        assert xy[:, 0].min() == pytest.approx(64) and xy[:, 1].min() == pytest.approx(64)
        assert w - xy[:, 0].max() >= 64 - 1 and h - xy[:, 1].max() >= 64 - 1


def test_other_sizes():
    s = synthetic(n_sections=1, n_spots=37, n_genes=13, patch_px=32, seed=1)[0]
    t = s["table"]
    assert t.shape == (37, 13)
    np.testing.assert_allclose(s["spots"]["radius"].to_numpy(), 8.0)
    assert t.uns["synthetic"]["microns_per_pixel"] == pytest.approx(100 / 16)
    _, h, w = _image(s).shape
    xy = t.obsm["spatial"]
    assert (xy >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()


def test_morphology_predicts_expression(sdatas):
    """Mean RGB of a 32 px patch, linear model fitted on sections 0-2, predicts markers on section 3."""
    half = 16

    def features(s):
        img = _image(s).astype(np.float64) / 255.0
        xy = np.round(s["table"].obsm["spatial"]).astype(int)
        f = np.stack([img[:, y - half : y + half, x - half : x + half].mean((1, 2)) for x, y in xy])
        return np.hstack([f, np.ones((len(f), 1))])

    def lognorm(s):
        X = _counts(s)
        return np.log1p(X / X.sum(1, keepdims=True) * 1e4)

    var = sdatas[0]["table"].var
    train_counts = np.vstack([_counts(s) for s in sdatas[:3]])
    markers = np.flatnonzero(var["marker"].to_numpy())
    top = markers[np.argsort(-train_counts[:, markers].mean(0))][:10]

    A = np.vstack([features(s) for s in sdatas[:3]])
    B = np.vstack([lognorm(s) for s in sdatas[:3]])[:, top]
    W, *_ = np.linalg.lstsq(A, B, rcond=None)
    pred = features(sdatas[3]) @ W
    truth = lognorm(sdatas[3])[:, top]
    r = [np.corrcoef(pred[:, j], truth[:, j])[0, 1] for j in range(len(top))]
    # measured: 0.64 for seed 0 (0.60-0.67 over seeds 0-3)
    assert np.mean(r) > 0.45, r


def test_synthetic_sections_and_slides_carry_their_resolution(sdatas):
    # their µm/px sat under uns['synthetic'] where no reader looks: a model fitted on them had no size
    from stranker.datasets import synthetic_cohort
    from stranker.section import as_sections

    sp = as_sections(sdatas[0])[0]
    assert sp.microns_per_pixel == pytest.approx(100 / 32)
    assert sp.diameter * sp.microns_per_pixel == pytest.approx(100.0)  # a spot is 100 µm wide
    slides, _ = synthetic_cohort(n_slides=2, size_px=128, patch_px=32)
    assert as_sections(slides[0], need_table=False)[0].microns_per_pixel == pytest.approx(100 / 16)
