"""sr.pl: pictures are rendered and read back: spots on the tissue, right colours, right panels."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import stranker as sr  # noqa: E402
from stranker._errors import InputError  # noqa: E402
from stranker._expression import lognorm  # noqa: E402
from stranker._metrics import pearson_per_gene  # noqa: E402
from stranker.section import ImageHandle  # noqa: E402

FAST = dict(
    epochs=2, batch_size=32, patch_px=64, image_size=32, backbone="test_resnet", pretrained=False,
    n_top_genes=20, genes="heg"
)
TISSUE = np.array([90, 30, 120], dtype=np.uint8)  # dark purple disc under every spot
RADIUS, RING = 12.0, 26.0  # spot radius and tissue-disc radius, level-0 pixels
LIGHTEN = 0.35  # gene_map's default


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


# --------------------------------------------------------------------------------------------
# a crafted section: white glass, a tissue disc under each spot, known predictions
# --------------------------------------------------------------------------------------------
def _ring_data(kind: str):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sps

    rng = np.random.default_rng(0)
    g = np.array([80.0, 160.0, 240.0, 320.0])
    centers = np.array([(x, y) for y in g[:3] for x in g]).astype(float)  # 4 x 3 lattice, 80 px apart
    n, h, w = len(centers), 320, 400
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), 255, dtype=np.uint8)
    for x, y in centers:
        img[(xx - x) ** 2 + (yy - y) ** 2 <= RING**2] = TISSUE
    counts = rng.poisson(rng.uniform(2, 30, size=(n, 5))).astype(np.float32)
    genes = [f"G{j}" for j in range(5)]
    meas = lognorm(counts)
    pred = (0.5 * meas + rng.normal(0, 0.3, size=meas.shape)).astype(np.float32)
    pred[:, 4] = np.nan  # G4 was not modelled
    ids = [f"s{i}" for i in range(n)]
    if kind == "anndata":  # squidpy layout, image stored at half resolution
        a = ad.AnnData(sps.csr_matrix(counts), obs=pd.DataFrame(index=ids), var=pd.DataFrame(index=genes))
        a.obsm["spatial"] = centers
        a.uns["spatial"] = {
            "lib": {
                "images": {"hires": img[::2, ::2].copy()},
                "scalefactors": {"tissue_hires_scalef": 0.5, "spot_diameter_fullres": 2 * RADIUS},
            }
        }
        a.layers["stranker"] = pred
        return a, centers, meas, pred, a
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel

    obs = pd.DataFrame({"spot_id": ids, "region": pd.Categorical(["spots"] * n)}, index=ids)
    a = ad.AnnData(sps.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=genes))
    a.layers["stranker"] = pred
    table = TableModel.parse(a, region="spots", region_key="region", instance_key="spot_id")
    sdata = SpatialData(
        images={
            "he": Image2DModel.parse(np.moveaxis(img, -1, 0), dims=("c", "y", "x"), scale_factors=[2, 2])
        },
        shapes={
            "spots": ShapesModel.parse(centers, geometry=0, radius=np.full(n, RADIUS), index=pd.Index(ids))
        },
        tables={"table": table},
    )
    return sdata, centers, meas, pred, sdata.tables["table"]


def _pixels(fig):
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)


def _at(fig, buf, ax, xy):
    """RGB of the rendered figure at data coordinates ``xy`` of ``ax``."""
    d = ax.transData.transform(np.atleast_2d(xy))
    h = buf.shape[0]
    cols = np.round(d[:, 0] - 0.5).astype(int)
    rows = np.round(h - d[:, 1] - 0.5).astype(int)
    return buf[rows, cols]


@pytest.fixture
def read_levels(monkeypatch):
    levels = []
    orig = ImageHandle.read

    def spy(self, level, *args, **kwargs):
        levels.append(level)
        return orig(self, level, *args, **kwargs)

    monkeypatch.setattr(ImageHandle, "read", spy)
    return levels


@pytest.mark.parametrize("kind", ["spatialdata", "anndata"])
def test_gene_map_spots_land_on_the_tissue_in_their_colours(kind, read_levels):
    data, centers, meas, pred, _ = _ring_data(kind)
    fig = sr.pl.gene_map(data, ["G0", "G2"], show=False, max_px=100, cmap="viridis")
    axes = [a for a in fig.axes if a.get_title()]
    assert [a.get_title().split(" (")[0] for a in axes] == [
        "G0 measured",
        "G0 predicted",
        "G2 measured",
        "G2 predicted",
    ]
    assert len(fig.axes) == 6  # 4 panels + one colour bar per gene
    r = pearson_per_gene(pred[:, [0, 2]], meas[:, [0, 2]])
    assert axes[1].get_title() == f"G0 predicted (r = {r[0]:.2f})"
    assert axes[3].get_title() == f"G2 predicted (r = {r[1]:.2f})"
    if kind == "spatialdata":
        assert read_levels and 0 not in read_levels  # a thumbnail never reads full resolution
    buf = _pixels(fig)
    cmap = plt.get_cmap("viridis")
    ring = centers + np.array([(RADIUS + RING) / 2, 0.0])  # tissue between the spot's edge and the disc's
    glass = centers + np.array([40.0, 40.0])  # midway between four spots: bare glass
    light_tissue = TISSUE * (1 - LIGHTEN) + 255 * LIGHTEN
    for k, (a, vals) in enumerate(zip(axes, [meas[:, 0], pred[:, 0], meas[:, 2], pred[:, 2]], strict=True)):
        coll = a.collections[0]
        norm = coll.norm
        if k % 2 == 1:  # one colour scale per gene, shared by measured and predicted
            assert (norm.vmin, norm.vmax) == (
                axes[k - 1].collections[0].norm.vmin,
                axes[k - 1].collections[0].norm.vmax,
            )
        want = np.round(np.asarray(cmap(norm(vals)))[:, :3] * 255)
        got = _at(fig, buf, a, centers)
        assert np.abs(got - want).max() <= 3, f"panel {k}: spot colours {got[:3]} != colour map {want[:3]}"
        assert np.abs(_at(fig, buf, a, ring) - light_tissue).max(1).max() <= 30, "spot not on its tissue disc"
        assert (_at(fig, buf, a, glass[:-1]) >= 245).all(), "background is not the glass of the image"
    assert (
        len({round(a.collections[0].norm.vmax, 6) for a in axes}) == 2
    )  # the two genes have their own scale


def test_gene_map_separate_scales():
    data, _, meas, pred, _ = _ring_data("spatialdata")
    fig = sr.pl.gene_map(data, "G0", show=False, max_px=100, scale="separate", vmin="p0", vmax="p100")
    axes = [a for a in fig.axes if a.get_title()]
    m_norm, p_norm = (a.collections[0].norm for a in axes)
    assert (m_norm.vmin, m_norm.vmax) == pytest.approx((meas[:, 0].min(), meas[:, 0].max()))
    assert (p_norm.vmin, p_norm.vmax) == pytest.approx((pred[:, 0].min(), pred[:, 0].max()))
    assert len(fig.axes) == 4  # a colour bar each
    assert axes[1].get_title().startswith("G0 predicted (r = ")
    with pytest.raises(InputError, match="'shared' or 'separate'"):
        sr.pl.gene_map(data, "G0", show=False, scale="own")
    plt.close("all")


def test_gene_map_errors():
    data, *_ = _ring_data("spatialdata")
    with pytest.raises(InputError, match=r"no prediction for 1 gene\(s\), e.g. \['G4'\]"):
        sr.pl.gene_map(data, ["G0", "G4"], show=False)
    with pytest.raises(InputError, match="G9"):
        sr.pl.gene_map(data, "G9", show=False)
    with pytest.raises(InputError, match="Layer 'other' not in"):
        sr.pl.gene_map(data, "G0", layer="other", show=False)
    _, ax = plt.subplots()
    with pytest.raises(InputError, match="2 panel"):
        sr.pl.gene_map(data, "G0", ax=ax, show=False)


def test_gene_map_into_given_axes_and_save(tmp_path):
    data, *_ = _ring_data("spatialdata")
    fig, axes = plt.subplots(1, 2)
    out = sr.pl.gene_map(data, "G1", ax=axes, save=tmp_path / "m.pdf", show=False)
    assert out is fig and (tmp_path / "m.pdf").stat().st_size > 1000
    assert axes[0].get_title() == "G1 measured"


# --------------------------------------------------------------------------------------------
# on a fitted model
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted(synthetic_small):
    from spatialdata import deepcopy

    secs = [deepcopy(s) for s in synthetic_small]
    model = sr.tl.fit(secs[:3], seed=0, **FAST, w_rank=0.03, w_distill=0.03)  # every loss term drawn
    sr.tl.predict(model, secs[3])
    return model, secs


def test_gene_map_on_a_held_out_section(fitted, tmp_path):
    model, secs = fitted
    path = tmp_path / "x.png"
    fig = sr.pl.gene_map(secs[3], model.genes[:2], save=path, show=False)
    assert path.stat().st_size > 10_000
    img = plt.imread(path)[..., :3]
    assert img.std() > 0.05  # not blank
    white = (img > 0.97).all(-1).mean()
    assert white < 0.6, f"{white:.0%} of the picture is white"
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    assert titles[0] == f"{model.genes[0]} measured" and titles[1].startswith(
        f"{model.genes[0]} predicted (r = "
    )


def test_gene_map_of_an_image_only_slide_shows_predictions(fitted, read_levels):
    from spatialdata import SpatialData

    model, secs = fitted
    slide = SpatialData(images={"he": secs[3].images["he"]})
    slide.attrs["microns_per_pixel"] = {"he": secs[3].tables["table"].uns["microns_per_pixel"]}
    sr.tl.predict(model, slide)
    assert "stranker_table" in slide.tables
    read_levels.clear()
    fig = sr.pl.gene_map(slide, model.genes[:3], show=False, max_px=200, scalebar=False)
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    # genes the model does not call reliable are marked (its fixture's genes are)
    assert [t.removesuffix(" (unreliable)") for t in titles] == [f"{g} predicted" for g in model.genes[:3]]
    assert 0 not in read_levels  # the 736-px image is read at its half-resolution level
    buf = _pixels(fig)
    ax = next(a for a in fig.axes if a.get_title())
    table = slide.tables["stranker_table"]
    coll = ax.collections[0]
    want = np.round(np.asarray(coll.cmap(coll.norm(table.layers["stranker"][:, 0])))[:, :3] * 255)
    assert np.abs(_at(fig, buf, ax, table.obsm["spatial"]) - want).max() <= 3


def test_correlation_uses_evaluate_or_computes_the_same(fitted):
    model, secs = fitted
    test = secs[3]
    ax = sr.pl.correlation(test, show=False)
    computed = np.sort(ax.lines[0].get_ydata())
    sr.tl.evaluate(test)
    r = test.tables["table"].var["stranker_pcc"].to_numpy()
    r = r[np.isfinite(r)]
    np.testing.assert_allclose(computed, np.sort(r), atol=1e-5)
    test.tables["table"].var["stranker_pcc"] *= -1  # proves the stored values are the ones drawn
    ax = sr.pl.correlation(test, show=False, n_heg=5)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), np.sort(-r)[::-1], atol=1e-5)
    assert len(ax.collections[0].get_offsets()) == 5  # the 5 most expressed genes are marked
    test.tables["table"].var["stranker_pcc"] *= -1


def test_history_from_model_and_table(fitted):
    model, secs = fitted
    axes = sr.pl.history(model, show=False)
    terms = [a.get_title() for a in axes]
    assert set(terms) >= {"regression", "clip", "rank", "distill", "total"} and "lr" not in terms
    total = axes[terms.index("total")].lines[0].get_ydata()
    np.testing.assert_allclose(total, [h["total"] for h in model.history])
    axes2 = sr.pl.history(secs[0], show=False, terms=["total"])
    np.testing.assert_allclose(axes2[0].lines[0].get_ydata(), total)
    data, *_ = _ring_data("spatialdata")
    with pytest.raises(InputError, match="history"):
        sr.pl.history(data)  # no fit wrote here


@pytest.mark.slow  # computes a UMAP (numba compiles it first)
def test_embedding_umap_of_sections(fitted):
    _, secs = fitted
    before = set(secs[3].tables["table"].obsm)
    ax = sr.pl.embedding([secs[0], secs[3]], color="section", show=False)
    pts = ax.collections[0].get_offsets()
    assert len(pts) == secs[0].tables["table"].n_obs + secs[3].tables["table"].n_obs
    assert np.isfinite(np.asarray(pts)).all() and np.ptp(np.asarray(pts), 0).min() > 0
    assert set(secs[3].tables["table"].obsm) == before  # the user's table is not changed
    with pytest.raises(InputError, match="Cannot colour"):
        sr.pl.embedding(secs[3], color="nope", show=False)


def test_gene_map_scale_bar_in_microns(fitted):
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
    from spatialdata import deepcopy

    model, secs = fitted
    sdata = deepcopy(secs[3])
    table = sdata.tables["table"]
    mpp = table.uns.pop("microns_per_pixel")  # synthetic sections record it; without it, no bar
    fig = sr.pl.gene_map(sdata, model.genes[:1], show=False, max_px=100)
    assert not [a for ax in fig.axes for a in ax.artists if isinstance(a, AnchoredSizeBar)]  # µm/px unknown
    table.uns["microns_per_pixel"] = mpp
    fig = sr.pl.gene_map(sdata, model.genes[:1], show=False, max_px=100)
    first = [a for a in fig.axes if a.get_title()][0]
    (bar,) = [a for a in first.artists if isinstance(a, AnchoredSizeBar)]
    width_px = abs(np.diff(first.get_xlim())[0])
    assert 0.08 <= bar.stranker_um / mpp / width_px <= 0.2  # a round length (1, 2, 5 x 10^k) up to a fifth
    assert str(round(bar.stranker_um)) in bar.txt_label.get_text()
    assert not [a for a in fig.axes[1].artists if isinstance(a, AnchoredSizeBar)]  # on the first panel only
    fig = sr.pl.gene_map(sdata, model.genes[:1], show=False, max_px=100, scalebar=False)
    assert not [a for ax in fig.axes for a in ax.artists if isinstance(a, AnchoredSizeBar)]
    plt.close("all")


def test_predict_copy_returns_a_written_copy(fitted):
    model, secs = fitted
    table = secs[2].tables["table"]  # a training section: fit wrote in-sample results
    before = table.obsm["X_stranker"].copy()
    out = sr.tl.predict(model, secs[2], copy=True)
    assert out is not secs[2] and out.tables["table"].uns["stranker"]["in_sample"] is False
    assert secs[2].tables["table"].uns["stranker"]["in_sample"] is True
    np.testing.assert_array_equal(secs[2].tables["table"].obsm["X_stranker"], before)
    assert sr.tl.predict(model, out) is None


def test_embedding_reuses_an_existing_umap_and_saves_its_legend(fitted, tmp_path):
    from PIL import Image
    from spatialdata import deepcopy

    _, secs = fitted
    sdata = deepcopy(secs[3])
    table = sdata.tables["table"]
    coords = np.random.default_rng(0).standard_normal((table.n_obs, 2)).astype(np.float32)
    table.obsm["X_umap"] = coords  # as sc.pp.neighbors(use_rep='X_stranker'); sc.tl.umap() leave it
    table.uns["neighbors"] = {"params": {"use_rep": "X_stranker"}}
    table.uns["umap"] = {"params": {}}
    ax = sr.pl.embedding(sdata, color="section", show=False)
    np.testing.assert_allclose(np.asarray(ax.collections[0].get_offsets()), coords, rtol=1e-6)
    # `basis=` names the coordinates to draw; every section must hold them
    table.obsm["X_mine"] = coords[:, ::-1].copy()
    ax = sr.pl.embedding(sdata, basis="X_mine", color="section", show=False)
    np.testing.assert_allclose(np.asarray(ax.collections[0].get_offsets()), coords[:, ::-1], rtol=1e-6)
    with pytest.raises(InputError, match="X_nope"):
        sr.pl.embedding(sdata, basis="X_nope", show=False)
    # the legend sits right of the axes: the saved file holds it (a tight bounding box)
    table.obs["area"] = np.where(np.arange(table.n_obs) % 2, "a rather long region name", "another long one")
    ax = sr.pl.embedding(sdata, basis="X_mine", color="area", show=False, save=tmp_path / "e.png")
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    left = fig.get_tightbbox(renderer).x0 * fig.dpi  # the blank margin left of the axes
    assert legend.x1 - left > fig.bbox.x1  # drawn beyond the figure's own box
    assert Image.open(tmp_path / "e.png").size[0] >= legend.x1 - left
    plt.close("all")


def test_import_of_stranker_does_not_import_matplotlib():
    import subprocess
    import sys

    code = "import sys, stranker; print('matplotlib' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "False"
