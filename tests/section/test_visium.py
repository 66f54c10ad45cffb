"""Visium and Visium HD as spatialdata-io reads them: tiny raw Space Ranger outputs written here."""

import json

import numpy as np
import pytest

import stranker as sr
from stranker._errors import InputError
from stranker.section import as_sections

spatialdata_io = pytest.importorskip("spatialdata_io")

FAST = dict(
    epochs=1,
    batch_size=16,
    patch_px=64,
    image_size=32,
    backbone="test_resnet",
    pretrained=False,
    n_top_genes=20,
    genes="heg",
    tta=False,
)
GENES = [f"G{j}" for j in range(30)]


def _code(i):
    """A colour that names spot / bin i."""
    return np.array([30 + (i * 37) % 200, 40 + (i * 53) % 180, 90], dtype=np.uint8)


def _background(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(np.array([200, 120, 180]) + rng.normal(0, 15, (h, w, 3)), 0, 255).astype(np.uint8)


def _write_h5(path, counts, barcodes, *, chemistry="Spatial 3' v1", software="spaceranger-2.1.0",
              library="V1"):
    """A Space Ranger feature-barcode matrix (CSC: genes x barcodes) with the file attributes it writes."""
    import h5py
    import scipy.sparse as sps

    m = sps.csc_matrix(counts.T.astype(np.int32))
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        f.attrs["library_ids"] = np.array([library], dtype="S")
        f.attrs["original_gem_groups"] = np.array([1])
        f.attrs["chemistry_description"] = chemistry
        f.attrs["software_version"] = software
        g = f.create_group("matrix")
        g["barcodes"] = np.array(barcodes, dtype="S")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
        g["shape"] = np.array(m.shape, dtype=np.int32)
        ft = g.create_group("features")
        ft["id"] = np.array([f"ENSG{j:05d}" for j in range(len(GENES))], dtype="S")
        ft["name"] = np.array(GENES, dtype="S")
        ft["feature_type"] = np.array(["Gene Expression"] * len(GENES), dtype="S")
        ft["genome"] = np.array(["GRCh38"] * len(GENES), dtype="S")
        ft["_all_tag_keys"] = np.array([b"genome"])


def _save_png(path, img):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def _downscale(img, f):
    from PIL import Image

    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((round(w * f), round(h * f)), Image.BILINEAR))


def write_visium(root, *, mpp=1.0, n_side=6, spacing=100, hires=0.5, lowres=0.125, full=True, seed=0):
    """Space Ranger 2 output of a Visium section: spots 55 µm wide, each painted with its colour code."""
    import tifffile

    rng = np.random.default_rng(seed)
    d = 55.0 / mpp
    size = spacing * (n_side + 1)
    img = _background(size, size, seed)
    rows, cols = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    x = (cols.ravel() + 1) * spacing + (rows.ravel() % 2) * spacing / 2 - spacing / 4
    y = (rows.ravel() + 1) * spacing
    n = len(x)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        img[(yy - y[i]) ** 2 + (xx - x[i]) ** 2 <= (d / 5) ** 2] = _code(i)
    barcodes = [f"AAAC{i:04d}-1" for i in range(n)]
    # one off-tissue spot: in the positions file, not in the filtered matrix
    pos = {
        "barcode": barcodes + ["TTTT0000-1"],
        "in_tissue": [1] * n + [0],
        "array_row": list(rows.ravel()) + [99],
        "array_col": list(2 * cols.ravel() + rows.ravel() % 2) + [99],
        "pxl_row_in_fullres": list(y) + [5],
        "pxl_col_in_fullres": list(x) + [5],
    }
    import pandas as pd

    (root / "spatial").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(pos).to_csv(root / "spatial" / "tissue_positions.csv", index=False)
    (root / "spatial" / "scalefactors_json.json").write_text(
        json.dumps(
            {
                "tissue_hires_scalef": hires,
                "tissue_lowres_scalef": lowres,
                "spot_diameter_fullres": d,
                "fiducial_diameter_fullres": d * 1.6,
            }
        )
    )
    _write_h5(root / "filtered_feature_bc_matrix.h5", rng.poisson(5, (n, len(GENES))), barcodes)
    _save_png(root / "spatial" / "tissue_hires_image.png", _downscale(img, hires))
    _save_png(root / "spatial" / "tissue_lowres_image.png", _downscale(img, lowres))
    if full:
        tifffile.imwrite(root / "image.tif", img)
    return np.column_stack([x, y]), img


def write_visium_hd(root, *, mpp=0.5, extent_um=192, seed=0):
    """Space Ranger 3 output of Visium HD: 2, 8 and 16 µm square bins; the 16 µm bins painted."""
    import h5py
    import pandas as pd
    import tifffile

    rng = np.random.default_rng(seed)
    size = int(round(extent_um / mpp))
    img = _background(size, size, seed)
    hires, lowres = 0.25, 0.05
    meta = {"hd_layout_json": json.dumps({"file_format": "1.0", "transform": [1, 0, 0, 0, 1, 0, 0, 0, 1]})}
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps(meta)
    centres = {}
    for b in (2, 8, 16):
        side = b / mpp
        k = int(extent_um // b)
        rows, cols = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
        x, y = (cols.ravel() + 0.5) * side, (rows.ravel() + 0.5) * side
        centres[b] = np.column_stack([x, y])
        if b == 16:
            for i in range(len(x)):
                img[
                    int(y[i] - side / 4) : int(y[i] + side / 4), int(x[i] - side / 4) : int(x[i] + side / 4)
                ] = _code(i)
        folder = root / "binned_outputs" / f"square_{b:03d}um"
        barcodes = [f"s_{b:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows.ravel(), cols.ravel(), strict=True)]
        _write_h5(
            folder / "filtered_feature_bc_matrix.h5", rng.poisson(0.2 * b, (len(x), len(GENES))), barcodes,
            chemistry="Visium HD v1", software="spaceranger-3.0.0", library="HD",
        )
        (folder / "spatial").mkdir(parents=True, exist_ok=True)
        (folder / "spatial" / "scalefactors_json.json").write_text(
            json.dumps(
                {
                    "tissue_hires_scalef": hires,
                    "tissue_lowres_scalef": lowres,
                    "spot_diameter_fullres": side,
                    "bin_size_um": float(b),
                    "microns_per_pixel": mpp,
                    "regist_target_img_scalef": hires,
                }
            )
        )
        pd.DataFrame(
            {
                "barcode": barcodes,
                "in_tissue": 1,
                "array_row": rows.ravel(),
                "array_col": cols.ravel(),
                "pxl_row_in_fullres": y,
                "pxl_col_in_fullres": x,
            }
        ).to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
    (root / "spatial").mkdir(exist_ok=True)
    (root / "spatial" / "scalefactors_json.json").write_text(
        json.dumps(
            {
                "tissue_hires_scalef": hires,
                "tissue_lowres_scalef": lowres,
                "spot_diameter_fullres": 8 / mpp,
                "bin_size_um": 8.0,
                "microns_per_pixel": mpp,
            }
        )
    )
    _save_png(root / "spatial" / "tissue_hires_image.png", _downscale(img, hires))
    _save_png(root / "spatial" / "tissue_lowres_image.png", _downscale(img, lowres))
    (root / "microscope_image").mkdir()
    tifffile.imwrite(root / "microscope_image" / "image.tif", img)
    return centres, img


def _centre_colour(sdata, **keys):
    """Mean colour of the 4x4 pixels at each spot centre, read through the adapter."""
    sp = as_sections(sdata, **keys)[0]
    patches = sr.pp.patches(sdata, size=4, **keys)
    return sp, patches.reshape(len(patches), -1, 3).mean(1)


@pytest.fixture(scope="module")
def visium_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("visium")
    xy, _ = write_visium(root)
    return root, xy


@pytest.fixture(scope="module")
def hd_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("visium_hd")
    centres, _ = write_visium_hd(root)
    return root, centres


def _read_visium(root, full):
    return spatialdata_io.visium(root, dataset_id="V1", fullres_image_file="image.tif" if full else None)


def _read_hd(root):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spatialdata_io.visium_hd(root, dataset_id="HD", load_segmentations_only=False)


@pytest.mark.parametrize("full", [True, False])
def test_visium_spots_images_and_resolution(visium_dir, full):
    root, xy = visium_dir
    sdata = _read_visium(root, full)
    assert {"V1_hires_image", "V1_lowres_image"} <= set(sdata.images) and "V1" in sdata.shapes
    sp, colours = _centre_colour(sdata)
    scale = 1.0 if full else 0.5  # without the full image the hires image (scalef 0.5) is used
    assert sp.keys.image_key == ("V1_full_image" if full else "V1_hires_image")
    np.testing.assert_allclose(sp.centers, xy * scale)
    assert sp.diameter == pytest.approx(55.0 * scale)
    assert sp.microns_per_pixel == pytest.approx(1.0 / scale)  # 55 µm spots
    codes = np.stack([_code(i) for i in range(sp.n_spots)]).astype(float)
    assert np.abs(colours - codes).max() < 12
    # an explicit image still wins, in its own pixels
    lo = as_sections(sdata, image_key="V1_lowres_image")[0]
    np.testing.assert_allclose(lo.centers, xy * 0.125)
    assert lo.microns_per_pixel == pytest.approx(8.0)


@pytest.fixture(scope="module")
def visium_model(visium_dir):
    root, _ = visium_dir
    sdata = _read_visium(root, True)
    model = sr.tl.fit(sdata, seed=0, **FAST)  # directly on what spatialdata-io returns
    return model, sdata


def test_fit_and_predict_on_visium_directly(visium_model, visium_dir):
    model, sdata = visium_model
    t = sdata.tables["table"]
    assert np.isfinite(t.layers["stranker"][:, t.var_names.get_indexer(model.genes)]).all()
    assert model.meta["spot_diameter_um"] == pytest.approx(55.0)
    other = _read_visium(visium_dir[0], False)  # same section, hires image only (2 µm/px)
    sr.tl.predict(model, other)
    rec = other.tables["table"].uns["stranker"]
    assert rec["resampling"]["factor"] == pytest.approx(0.5)
    assert rec["resampling"]["patch_px"] == pytest.approx(32.0)  # the 64 µm training patch at 2 µm/px


@pytest.mark.parametrize("bin_size", [8, 16])
def test_visium_hd_bins_by_size(hd_dir, bin_size):
    root, centres = hd_dir
    sdata = _read_hd(root)
    assert {"square_002um", "square_008um", "square_016um"} <= set(sdata.tables)
    sp = as_sections(sdata, bin_size=bin_size)[0]
    assert sp.keys.table_key == f"square_{bin_size:03d}um" and sp.keys.image_key == "HD_full_image"
    assert sp.keys.shapes_key == f"HD_square_{bin_size:03d}um"
    assert sdata.shapes[sp.keys.shapes_key].geometry.iloc[0].geom_type == "Polygon"  # squares
    np.testing.assert_allclose(sp.centers, centres[bin_size], atol=1e-6)  # polygon centroids
    assert sp.diameter == pytest.approx(bin_size / 0.5)  # side of the square
    assert sp.microns_per_pixel == pytest.approx(0.5)
    same = as_sections(sdata, table_key=f"square_{bin_size:03d}um")[0]
    np.testing.assert_array_equal(same.centers, sp.centers)
    if bin_size == 16:
        _, colours = _centre_colour(sdata, table_key="square_016um")
        codes = np.stack([_code(i) for i in range(sp.n_spots)]).astype(float)
        assert np.abs(colours - codes).max() < 1


def test_visium_hd_needs_a_bin_size(hd_dir):
    sdata = _read_hd(hd_dir[0])
    with pytest.raises(InputError, match=r"bin_size=.*\[2, 8, 16\]"):
        as_sections(sdata)
    with pytest.raises(InputError, match=r"no table 'square_032um'.*\[2, 8, 16\]"):
        as_sections(sdata, bin_size=32)
    with pytest.raises(InputError, match="not both"):
        as_sections(sdata, bin_size=8, table_key="square_008um")


def test_predict_on_visium_hd_bins(visium_model, hd_dir):
    model, _ = visium_model
    sdata = _read_hd(hd_dir[0])
    sr.tl.predict(model, sdata, bin_size=16)
    t = sdata.tables["square_016um"]
    assert t.obsm["X_stranker"].shape == (t.n_obs, model.config.embed_dim)
    assert np.isfinite(t.layers["stranker"][:, t.var_names.get_indexer(model.genes)]).all()
    res = t.uns["stranker"]["resampling"]
    assert res["factor"] == pytest.approx(2.0)  # trained at 1 µm/px, the HD image is 0.5 µm/px
    assert res["patch_px"] == pytest.approx(128.0)  # each bin is read with the model's 64 µm patch
    assert "stranker" not in sdata.tables["square_008um"].layers  # other bin sizes untouched
    # predictions vary from bin to bin (each bin has its own patch)
    assert np.asarray(t.layers["stranker"])[:, t.var_names.get_indexer(model.genes)].std(0).mean() > 0


def test_aggregate_hd_bins_into_pseudo_spots(hd_dir):
    sdata = _read_hd(hd_dir[0])
    sr.io.aggregate_bins(sdata, bin_size=8, size_um=32)
    assert "square_032um" in sdata.tables and "HD_square_032um" in sdata.shapes
    new, bins = sdata.tables["square_032um"], sdata.tables["square_008um"]
    # 192 µm of 8 µm bins = 24 x 24 bins -> 6 x 6 blocks of 4 x 4
    assert new.n_obs == 36 and (new.obs["n_bins"] == 16).all()
    np.testing.assert_allclose(np.asarray(new.X.sum()), np.asarray(bins.X.sum()))
    # the block in grid row 1, col 2 sums the bins with array_row 4..7 and array_col 8..11
    sel = (bins.obs["array_row"] // 4 == 1).to_numpy() & (bins.obs["array_col"] // 4 == 2).to_numpy()
    row = np.flatnonzero((new.obs["array_row"] == 1).to_numpy() & (new.obs["array_col"] == 2).to_numpy())[0]
    np.testing.assert_allclose(
        np.asarray(new.X[row].todense()).ravel(), np.asarray(bins.X[sel].sum(0)).ravel()
    )
    sp = as_sections(sdata, bin_size=32)[0]  # usable as spots like any HD bin size
    assert sp.diameter == pytest.approx(64.0) and sp.microns_per_pixel == pytest.approx(0.5)
    np.testing.assert_allclose(sp.centers[row], [(8 + 2) * 16, (4 + 2) * 16])  # centre of its 16 bins, px
    model = sr.tl.fit(sdata, bin_size=32, seed=0, **FAST)  # train at the pseudo-spot scale
    assert model.meta["spot_diameter_um"] == pytest.approx(32.0)
    assert np.isfinite(new.layers["stranker"][:, new.var_names.get_indexer(model.genes)]).all()
    assert sr.pp.patches(sdata, bin_size=32, size_um=32).shape[0] == new.n_obs


def test_aggregate_replaces_its_own_pseudo_spots_never_the_users(hd_dir):
    sdata = _read_hd(hd_dir[0])
    sr.io.aggregate_bins(sdata, bin_size=8, size_um=32)
    first = sdata.tables["square_032um"]
    sr.io.aggregate_bins(sdata, bin_size=8, size_um=32)  # again: the pseudo-spots stranker added are replaced
    again = sdata.tables["square_032um"]
    assert again is not first and "HD_square_032um" in sdata.shapes
    np.testing.assert_array_equal(again.X.toarray(), first.X.toarray())
    # an element of the user's under the name is never replaced: the message names `key_added=`
    sdata.shapes["HD_square_064um"] = sdata.shapes["HD_square_016um"].copy()
    sdata.tables["mine"] = sdata.tables["square_016um"].copy()

    def elements():
        return {k: {n: id(e) for n, e in getattr(sdata, k).items()} for k in ("shapes", "tables")}

    before = elements()
    cases = (({"size_um": 64}, "HD_square_064um"), ({"size_um": 32, "key_added": "mine"}, "mine"))
    for kwargs, name in cases:
        with pytest.raises(InputError, match=rf"'{name}', which stranker did not write.*`key_added=`"):
            sr.io.aggregate_bins(sdata, bin_size=8, **kwargs)
        assert elements() == before
    sr.io.aggregate_bins(sdata, bin_size=8, size_um=64, key_added="square_064um_mine")
    assert sdata.tables["square_064um_mine"].n_obs == 9 and "square_064um_mine_shapes" in sdata.shapes


def test_fit_refusing_a_users_element_says_how_to_fit_not_key_added(hd_dir):
    # fit has no `key_added` for its pseudo-spots: the message names what the user can do
    sdata = _read_hd(hd_dir[0])
    sdata.shapes["HD_square_032um"] = sdata.shapes["HD_square_016um"].copy()
    with pytest.raises(InputError, match=r"'HD_square_032um', which stranker did not write.*"
                       r"sr.io.aggregate_bins\(sdata, bin_size=8, size_um=32.*aggregate=False") as err:
        sr.tl.fit(sdata, bin_size=8, seed=0, **FAST)
    assert "Pass another `key_added=`" not in str(err.value)
    assert "square_032um" not in sdata.tables


def test_fit_on_hd_bins_sums_them_to_the_patch_width(hd_dir):
    # 8 µm bins under a 64 px patch at 0.5 µm/px (32 µm): fit trains on 4 x 4-bin pseudo-spots, whose
    # table it adds, exactly what sr.io.aggregate_bins makes
    sdata = _read_hd(hd_dir[0])
    bins = sdata.tables["square_008um"]
    model = sr.tl.fit(sdata, bin_size=8, seed=0, **FAST)
    assert "square_032um" in sdata.tables and "HD_square_032um" in sdata.shapes
    assert model.meta["n_spots"] == 36 and model.meta["spot_diameter_um"] == pytest.approx(32.0)
    new = sdata.tables["square_032um"]
    assert "stranker" in new.layers and "stranker" not in bins.layers  # results go to the table trained on
    ref = _read_hd(hd_dir[0])
    sr.io.aggregate_bins(ref, bin_size=8, size_um=32)
    np.testing.assert_array_equal(new.X.toarray(), ref.tables["square_032um"].X.toarray())
    # present already: reused, not added twice
    again = sr.tl.fit(sdata, bin_size=8, seed=0, **FAST)
    assert again.meta["n_spots"] == 36
    # aggregate=False: every bin against the patch centred on it
    flat = sr.tl.fit(_read_hd(hd_dir[0]), bin_size=8, aggregate=False, seed=0, **FAST)
    assert flat.meta["n_spots"] == bins.n_obs
    # a failed fit leaves the data as it was: no pseudo-spot table left behind
    fresh = _read_hd(hd_dir[0])
    with pytest.raises(InputError, match="NOT_A_GENE"):
        sr.tl.fit(fresh, bin_size=8, genes=["NOT_A_GENE"], seed=0,
                  **{k: v for k, v in FAST.items() if k != "genes"})
    assert "square_032um" not in fresh.tables and "HD_square_032um" not in fresh.shapes


def test_hd_bins_get_a_sparse_layer_beyond_the_dense_limit(hd_dir, monkeypatch):
    # every function that picks a table takes bin_size=; the 8 µm table of a real HD slide is far
    # too large for a dense layer over all genes, so beyond settings.max_dense_layer it is sparse
    from scipy import sparse

    sdata = _read_hd(hd_dir[0])
    sr.io.aggregate_bins(sdata, bin_size=8, size_um=32)
    model = sr.tl.fit(sdata, bin_size=32, seed=0, **FAST)
    monkeypatch.setattr(sr.settings, "max_dense_layer", 0)
    sr.tl.predict(model, sdata, bin_size=8)
    t = sdata.tables["square_008um"]
    assert sparse.issparse(t.layers["stranker"]) and t.uns["stranker"]["layer_format"] == "sparse"
    assert t.layers["stranker"].nnz == t.n_obs * len(model.genes)
    m = sr.tl.evaluate(sdata, bin_size=8)
    assert np.isfinite(m["pcc_all"]) and np.isfinite(t.var["stranker_pcc"][model.genes]).all()


# --- the scverse Visium readers, taken exactly (squidpy / scanpy AnnData and spatialdata-io SpatialData)


def _anndata_readers():
    """``squidpy.read.visium`` and ``scanpy.read_visium`` (while scanpy has it), by name."""
    readers = []
    try:
        import squidpy as sq

        readers.append(pytest.param(sq.read.visium, id="squidpy"))
    except ImportError:
        pass
    try:
        import scanpy as sc

        if hasattr(sc, "read_visium"):
            readers.append(pytest.param(sc.read_visium, id="scanpy"))
    except ImportError:
        pass
    return readers or [pytest.param(None, marks=pytest.mark.skip(reason="neither squidpy nor scanpy"))]


ANNDATA_READERS = _anndata_readers()


def _read_anndata(reader, root):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scanpy.read_visium is deprecated in favour of spatialdata-io
        return reader(root)


def _unknown_technology(adata):
    """The AnnData as a reader that does not name Space Ranger would give it (e.g. legacy ST)."""
    adata = adata.copy()
    lib = next(iter(adata.uns["spatial"]))
    adata.uns["spatial"][lib]["metadata"] = {"software_version": "st_pipeline-1.7.2"}
    return adata


@pytest.fixture(scope="module")
def visium_half_dir(tmp_path_factory):
    """The same layout scanned at 0.5 µm/px: spots 110 px wide."""
    root = tmp_path_factory.mktemp("visium_half")
    xy, _ = write_visium(root, mpp=0.5, spacing=200, n_side=4)
    return root, xy


@pytest.mark.parametrize("reader", ANNDATA_READERS)
def test_visium_anndata_scale_from_the_55um_spot(visium_dir, visium_half_dir, reader):
    # squidpy / scanpy keep Space Ranger's metadata: the 55 µm spot gives µm/px, as on spatialdata-io's
    for root, mpp in ((visium_dir[0], 1.0), (visium_half_dir[0], 0.5)):
        adata = _read_anndata(reader, root)
        assert adata.uns["spatial"]["V1"]["metadata"]["software_version"].startswith("spaceranger")
        sp = as_sections(adata)[0]
        assert sp.name == "V1" and sp.fullres_per_px == 1.0
        assert sp.microns_per_pixel == pytest.approx(mpp)
        assert "55 µm" in sp.mpp_source and "Space Ranger" in sp.mpp_source
    # size_um= is taken, and cuts what it cuts on spatialdata-io's full-resolution SpatialData
    adata = _read_anndata(reader, visium_dir[0])
    full = _read_visium(visium_dir[0], True)
    got = sr.pp.patches(adata, size_um=40, out_px=16).astype(float)
    ref = sr.pp.patches(full, size_um=40, out_px=16).astype(float)
    assert np.abs(got.mean((1, 2)) - ref.mean((1, 2))).max() < 2


@pytest.mark.parametrize("reader", ANNDATA_READERS)
def test_model_reads_visium_anndata_at_its_own_resolution(
    visium_model, visium_half_dir, reader, stranker_log
):
    # trained at 1 µm/px, the 0.5 µm/px section's 64 µm patch is 128 px wide, without a warning
    import logging

    model, _ = visium_model
    adata = _read_anndata(reader, visium_half_dir[0])
    sr.tl.predict(model, adata)
    res = adata.uns["stranker"]["resampling"]
    assert res["slide_microns_per_pixel"] == pytest.approx(0.5) and res["factor"] == pytest.approx(2.0)
    assert res["patch_px"] == pytest.approx(128.0)
    warnings = [r for r in stranker_log.records if r.levelno >= logging.WARNING]
    assert not [r for r in warnings if "resolution" in r.getMessage()]


@pytest.mark.parametrize("reader", ANNDATA_READERS)
def test_scale_of_unknown_technology_is_never_guessed_but_can_be_given(visium_dir, reader):
    adata = _unknown_technology(_read_anndata(reader, visium_dir[0]))
    sp = as_sections(adata)[0]
    assert sp.microns_per_pixel is None and sp.mpp_source is None  # not Space Ranger: 55 µm not assumed
    with pytest.raises(InputError, match="no known resolution.*spot_diameter_um="):
        sr.pp.patches(adata, size_um=40)
    # Visium HD chemistry: the spot is not 55 µm either
    hd = adata.copy()
    hd.uns["spatial"]["V1"]["metadata"] = {"software_version": "spaceranger-3.0.0",
                                           "chemistry_description": "Visium HD v1"}
    assert as_sections(hd)[0].microns_per_pixel is None
    # legacy ST: 100 µm spots (this section's 55 px spots are then 100/55 µm/px)
    st = as_sections(adata, spot_diameter_um=100)[0]
    assert st.microns_per_pixel == pytest.approx(100 / 55) and st.mpp_source == "spot_diameter_um="
    given = as_sections(adata, microns_per_pixel=0.8)[0]
    assert given.microns_per_pixel == pytest.approx(0.8) and given.mpp_source == "microns_per_pixel="
    # threaded through the public functions: the same patches as the Space Ranger AnnData's
    known = _read_anndata(reader, visium_dir[0])
    np.testing.assert_array_equal(
        sr.pp.patches(adata, size_um=40, spot_diameter_um=55), sr.pp.patches(known, size_um=40)
    )
    for bad in (0, -1.0, float("nan"), float("inf"), "55", True):
        with pytest.raises(InputError, match="spot_diameter_um=` must be a positive finite number"):
            as_sections(adata, spot_diameter_um=bad)
        with pytest.raises(InputError, match="microns_per_pixel=` must be a positive finite number"):
            sr.pp.patches(adata, size=40, microns_per_pixel=bad)
    with pytest.raises(InputError, match="at most one of `spot_diameter_um=` and `microns_per_pixel=`"):
        as_sections(adata, spot_diameter_um=55, microns_per_pixel=1.0)


def test_given_scale_reaches_fit_predict_and_embed(visium_model, visium_dir, stranker_log):
    model, _ = visium_model
    sq = pytest.importorskip("squidpy")
    adata = _unknown_technology(_read_anndata(sq.read.visium, visium_dir[0]))
    sr.tl.predict(model, adata, microns_per_pixel=0.5)  # said to be 0.5 µm/px: the 64 µm patch is 128 px
    assert adata.uns["stranker"]["resampling"]["patch_px"] == pytest.approx(128.0)
    assert "no known resolution" not in stranker_log.text
    emb = model.embed(adata, spot_diameter_um=55)
    assert emb.shape == (adata.n_obs, model.config.embed_dim)
    sr.pp.embed_patches(adata, "test_resnet", pretrained=False, size_um=40, image_size=32,
                        spot_diameter_um=55, key_added="X_test")
    assert adata.uns["X_test"]["patch_px"] == pytest.approx(40.0)
    with pytest.raises(InputError, match="spot_diameter_um=` must be"):
        sr.tl.fit(adata, spot_diameter_um=-1, seed=0, **FAST)


def test_unknown_resolution_warning_is_given_once_per_call(visium_model, visium_dir, stranker_log):
    import logging

    model, _ = visium_model
    sq = pytest.importorskip("squidpy")
    adata = _unknown_technology(_read_anndata(sq.read.visium, visium_dir[0]))

    def count():  # predict's scale check and the patch reader each say it; only one of them may
        said = ("no known resolution", "does not record its resolution")
        return sum(any(s in r.getMessage() for s in said)
                   for r in stranker_log.records if r.levelno >= logging.WARNING)

    sr.tl.predict(model, adata)  # scale checked, resampling recorded, patches read: one warning
    assert count() == 1
    model.predict(adata)
    assert count() == 2


def test_spatialdata_io_visium_sections_are_named_after_the_dataset(visium_dir, visium_model, hd_dir):
    root, _ = visium_dir
    model, sdata = visium_model
    assert as_sections(sdata)[0].name == "V1"  # the dataset id, not the table key 'table'
    assert sdata.tables["table"].uns["stranker"]["train_sections"] == ["V1"]
    two = [_read_visium(root, True), spatialdata_io.visium(root, dataset_id="V2")]
    assert [sp.name for sp in as_sections(two)] == ["V1", "V2"]  # was ['table', 'table_1']
    with pytest.raises(InputError, match="the table of section 'V2'"):
        as_sections(two)[1].expression(layer="absent")
    # the user's name still wins
    two[1].tables["table"].uns["section"] = "mine"
    assert as_sections(two[1])[0].name == "mine"
    # Visium HD bin tables are not generic: their names say the bin size
    assert as_sections(_read_hd(hd_dir[0]), bin_size=8)[0].name == "square_008um"


@pytest.mark.parametrize("reader", ANNDATA_READERS)
def test_size_in_pixels_is_full_resolution_pixels_on_every_reader(visium_dir, reader):
    from stranker.section.patches import PatchGeometry

    root, _ = visium_dir
    full, hires = _read_visium(root, True), _read_visium(root, False)
    adata = _read_anndata(reader, root)
    secs = {"full": as_sections(full)[0], "hires": as_sections(hires)[0], "anndata": as_sections(adata)[0]}
    assert {k: sp.fullres_per_px for k, sp in secs.items()} == {"full": 1.0, "hires": 2.0, "anndata": 1.0}
    assert as_sections(full, image_key="V1_lowres_image")[0].fullres_per_px == pytest.approx(8.0)
    # the same 40 px of tissue on all three (the hires image holds them in 20 of its pixels)
    means = {k: sr.pp.patches(x, size=40, out_px=16).astype(float).mean((1, 2))
             for k, x in (("full", full), ("hires", hires), ("anndata", adata))}
    assert np.abs(means["hires"] - means["full"]).max() < 2
    assert np.abs(means["anndata"] - means["full"]).max() < 2
    wider = sr.pp.patches(full, size=80, out_px=16).astype(float).mean((1, 2))
    assert np.abs(wider - means["full"]).max() > 10  # 40 hires px (the old reading) show other tissue
    # a model's patch_px too: the same 64 µm patch on either object of the folder
    geoms = [PatchGeometry.of([sp], 64, None, 32) for sp in secs.values()]
    assert [g.size_um for g in geoms] == pytest.approx([64.0, 64.0, 64.0])
    assert [g.size_px for g in geoms] == pytest.approx([64.0, 32.0, 64.0])  # level-0 pixels of each
