"""sr.pl.reliability and the reliability options of sr.pl.gene_map: rendered, the drawn values read back."""

import logging

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import LineCollection, PathCollection  # noqa: E402

import stranker as sr  # noqa: E402
from stranker._errors import InputError  # noqa: E402
from stranker._expression import lognorm  # noqa: E402
from stranker._metrics import pearson_per_gene  # noqa: E402
from tests.conftest import make_sdata  # noqa: E402

GENES = ["G0", "G1", "G2", "G3", "G4"]
TINY = dict(batch_size=8, patch_px=32, image_size=32, backbone="test_resnet", seed=0, pretrained=False,
            genes=GENES)


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def predicted():
    """A model fitted with reliability on three sections, and a new section it predicted (with intervals)."""
    model = sr.tl.fit([make_sdata(n=24, seed=s)[0] for s in range(3)], epochs=2, **TINY)
    assert model.reliability is not None
    test = make_sdata(n=16, seed=7)[0]
    sr.tl.predict(model, test)
    return model, test


def _copy(sdata):
    from spatialdata import deepcopy

    return deepcopy(sdata)


def _points(axis):
    return [c for c in axis.collections if isinstance(c, PathCollection)]


def _rendered(path):
    assert path.stat().st_size > 5_000
    img = plt.imread(path)[..., :3]
    assert img.std() > 0.05  # not blank
    return img


def _flag(sdata, reliable):
    """Call the given genes reliable and the others not (as a model could)."""
    table = sdata.tables["table"]
    table.var["stranker_reliable"] = np.isin(table.var_names, reliable)
    return table


# --------------------------------------------------------------------------------------------
# sr.pl.reliability
# --------------------------------------------------------------------------------------------
def test_reliability_of_a_model_ranks_the_estimates_with_their_intervals(predicted, tmp_path):
    model, _ = predicted
    path = tmp_path / "rel.png"
    axes = sr.pl.reliability(model, show=False, save=path)
    _rendered(path)
    assert len(axes) == 1
    (axis,) = axes
    table = model.reliability
    order = np.argsort(-table["cv_pcc"].to_numpy(), kind="stable")
    reliable, other = _points(axis)
    y = np.full(len(order), np.nan)
    for pts in (reliable, other):
        off = np.asarray(pts.get_offsets())
        y[off[:, 0].astype(int) - 1] = off[:, 1]  # x is the rank
    np.testing.assert_allclose(y, table["cv_pcc"].to_numpy()[order])
    assert len(reliable.get_offsets()) == int(table["reliable"].sum())
    (bars,) = [c for c in axis.collections if isinstance(c, LineCollection)]
    segs = np.array([s[:, 1] for s in bars.get_segments()])
    np.testing.assert_allclose(segs[:, 0], table["cv_pcc_lo"].to_numpy()[order])
    np.testing.assert_allclose(segs[:, 1], table["cv_pcc_hi"].to_numpy()[order])
    assert f"of {len(GENES)} reliable" in axis.get_title()
    assert "90% interval" in [t.get_text() for t in axis.get_legend().get_texts()]


def test_reliability_of_a_section_against_measured_r(predicted, tmp_path):
    model, test = predicted
    sdata = _copy(test)
    table = _flag(sdata, ["G1", "G3"])
    path = tmp_path / "rel2.png"
    axes = sr.pl.reliability(sdata, show=False, save=path)
    _rendered(path)
    assert len(axes) == 2
    (reliable, _), (pts,) = _points(axes[0]), _points(axes[1])
    assert len(reliable.get_offsets()) == 2  # the section's reliable calls are drawn
    off = np.asarray(pts.get_offsets())
    np.testing.assert_allclose(off[:, 0], table.var["stranker_cv_pcc"].to_numpy())
    meas = lognorm(table.X.toarray())
    r = pearson_per_gene(table.layers["stranker"], meas)
    np.testing.assert_allclose(off[:, 1], r, atol=1e-5)
    filled = pts.get_facecolors()[:, 3] > 0
    np.testing.assert_array_equal(filled, np.isin(GENES, ["G1", "G3"]))
    identity = [ln for ln in axes[1].lines if np.array_equal(ln.get_xdata(), ln.get_ydata())]
    assert identity and "on table" in axes[1].get_title()
    # the r that sr.tl.evaluate wrote is the one drawn
    sr.tl.evaluate(sdata)
    table.var["stranker_pcc"] *= -1
    off = np.asarray(_points(sr.pl.reliability(sdata, show=False)[1])[0].get_offsets())
    np.testing.assert_allclose(off[:, 1], -r, atol=1e-5)


def test_reliability_panels_into_given_axes_and_without_measurements(predicted):
    model, test = predicted
    fig, given = plt.subplots(1, 2)
    assert sr.pl.reliability(test, ax=given, show=False) == list(given)
    assert len(sr.pl.reliability(test, measured_expression=False, show=False)) == 1
    with pytest.raises(InputError, match="2 panel"):
        sr.pl.reliability(test, ax=given[0], show=False)
    with pytest.raises(InputError, match="needs a section with measurements"):
        sr.pl.reliability(model, measured_expression=True, show=False)


def test_reliability_refuses_a_model_or_section_without_estimates(predicted):
    _, test = predicted
    model = sr.tl.fit(make_sdata(n=16, seed=0)[0], epochs=1, reliability=False, **TINY)
    assert model.reliability is None
    with pytest.raises(InputError, match="The model has no reliability estimate: it was fitted with "
                                         "reliability=False"):
        sr.pl.reliability(model, show=False)
    sdata = _copy(test)
    sr.tl.predict(model, sdata)  # the old model writes over the predictions, without the estimates
    table = sdata.tables["table"]
    table.var = table.var.drop(columns=[c for c in table.var if c.startswith("stranker_")])
    with pytest.raises(InputError, match=r"No reliability estimate in section 'table' \(`var` lacks "
                                         r"\['stranker_cv_pcc'.*not estimated"):
        sr.pl.reliability(sdata, show=False)


# --------------------------------------------------------------------------------------------
# sr.pl.gene_map: unreliable genes marked or left out, interval width beside the prediction
# --------------------------------------------------------------------------------------------
def _titles(fig):
    return [a.get_title() for a in fig.axes if a.get_title()]


def test_gene_map_marks_unreliable_genes(predicted):
    _, test = predicted
    sdata = _copy(test)
    _flag(sdata, ["G0"])
    titles = _titles(sr.pl.gene_map(sdata, ["G0", "G1"], show=False, max_px=100))
    assert titles[0] == "G0 measured" and titles[2] == "G1 measured"
    assert titles[1].startswith("G0 predicted (r = ") and "unreliable" not in titles[1]
    assert titles[3].startswith("G1 predicted (r = ") and titles[3].endswith(", unreliable)")
    titles = _titles(sr.pl.gene_map(sdata, ["G0", "G1"], measured_expression=False, show=False, max_px=100))
    assert titles == ["G0 predicted", "G1 predicted (unreliable)"]


def test_gene_map_reliable_only_leaves_out_the_others_with_a_log_line(predicted, caplog):
    _, test = predicted
    sdata = _copy(test)
    _flag(sdata, ["G0", "G2"])
    log = logging.getLogger("stranker")
    log.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="stranker")
    try:
        fig = sr.pl.gene_map(sdata, ["G0", "G1", "G2", "G3"], reliable_only=True, show=False, max_px=100)
    finally:
        log.removeHandler(caplog.handler)
    assert [t.split(" (")[0] for t in _titles(fig)] == ["G0 measured", "G0 predicted", "G2 measured",
                                                        "G2 predicted"]
    (line,) = [r.getMessage() for r in caplog.records if "reliable" in r.getMessage()]
    assert "['G1', 'G3']" in line
    with pytest.raises(InputError, match="None of the genes"):
        sr.pl.gene_map(sdata, ["G1", "G3"], reliable_only=True, show=False)
    sdata.tables["table"].var = sdata.tables["table"].var.drop(columns="stranker_reliable")
    with pytest.raises(InputError, match="`reliable_only=True` needs `var\\['stranker_reliable'\\]`"):
        sr.pl.gene_map(sdata, "G0", reliable_only=True, show=False)
    fig = sr.pl.gene_map(sdata, ["G0", "G1"], show=False, max_px=100)  # nothing to mark without it
    assert not [t for t in _titles(fig) if "unreliable" in t]


def test_gene_map_shows_the_interval_width_beside_the_prediction(predicted, tmp_path):
    _, test = predicted
    sdata = _copy(test)
    table = sdata.tables["table"]
    width = table.layers["stranker_upper"] - table.layers["stranker_lower"]
    path = tmp_path / "map.png"
    fig = sr.pl.gene_map(sdata, ["G0", "G2"], show_interval=True, show=False, save=path, max_px=100)
    _rendered(path)
    axes = [a for a in fig.axes if a.get_title()]
    assert [a.get_title().split(" (")[0] for a in axes] == [
        "G0 measured", "G0 predicted", "G0 interval width",
        "G2 measured", "G2 predicted", "G2 interval width",
    ]
    assert len(fig.axes) == 6 + 4  # a colour bar per gene (shared) and per width panel
    for a, j in ((axes[2], 0), (axes[5], 2)):
        coll = a.collections[0]
        np.testing.assert_allclose(coll.get_array(), width[:, j], rtol=1e-6)
        assert coll.cmap.name == "magma"
    assert all(a.get_position().y0 == pytest.approx(axes[0].get_position().y0) for a in axes[:3])  # one row
    titles = _titles(sr.pl.gene_map(sdata, ["G0", "G2"], show_interval=True, measured_expression=False,
                                    show=False, max_px=100))
    assert [t.split(" (")[0] for t in titles] == ["G0 predicted", "G0 interval width", "G2 predicted",
                                                  "G2 interval width"]
    del table.layers["stranker_upper"]
    with pytest.raises(InputError, match="`show_interval=True` needs layers \\['stranker_upper'\\]"):
        sr.pl.gene_map(sdata, "G0", show_interval=True, show=False)
