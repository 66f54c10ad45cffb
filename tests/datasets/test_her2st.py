"""sr.datasets.her2st: the real HER2+ sections, checked against the raw files read independently."""

import shutil
import signal
import time

import numpy as np
import pandas as pd
import pytest

import stranker as sr
from stranker._errors import InputError
from stranker.datasets import _her2st
from stranker.section import as_sections
from tests.conftest import her2st_dir, needs_her2st

FILES = ("C2.tsv.gz", "C2_selection.tsv", "C2.jpg")


@pytest.fixture(scope="module")
def c2():
    """C2 loaded once for the module (about 7 s)."""
    return sr.datasets.her2st("C2")


@pytest.fixture(scope="module")
def c2_raw():
    """C2's raw files read with pandas alone: counts of the selected spots (file order) and the spot table."""
    d = her2st_dir()
    counts = pd.read_csv(d / "C2.tsv.gz", sep="\t", index_col=0)
    sel = pd.read_csv(d / "C2_selection.tsv", sep="\t")
    sel = sel[sel["selected"] == 1]
    sel.index = sel["x"].astype(int).astype(str) + "x" + sel["y"].astype(int).astype(str)
    ids = [s for s in counts.index if s in set(sel.index)]
    return counts.loc[ids], sel.loc[ids]


def _dense(m):
    return m.toarray() if hasattr(m, "toarray") else np.asarray(m)


# --------------------------------------------------------------------------------------------
# the real section
# --------------------------------------------------------------------------------------------
@needs_her2st
def test_c2_layout_and_counts(c2, c2_raw):
    counts, sel = c2_raw
    assert set(c2.images) == {"he"}
    assert set(c2.shapes) == {"spots"}
    assert set(c2.tables) == {"table"}
    t = c2.tables["table"]
    assert t.n_obs == 187 == len(c2.shapes["spots"]) == len(counts)
    assert list(t.obs_names) == [f"C2_{s}" for s in counts.index]
    # raw counts, the same in X and layers['counts']
    x, lay = t.X, t.layers["counts"]
    assert x.shape == lay.shape == counts.shape
    assert (x != lay).nnz == 0 if hasattr(x, "nnz") else np.array_equal(x, lay)
    # a few spots and genes compared with the tsv read independently
    rng = np.random.default_rng(0)
    spots = list(counts.index[rng.choice(len(counts), 6, replace=False)])
    genes = ["ERBB2", "KRT19", "COL1A1"] + list(counts.columns[rng.choice(counts.shape[1], 5, replace=False)])
    genes = [g for g in genes if g in counts.columns]
    got = _dense(t[[f"C2_{s}" for s in spots], genes].X)
    np.testing.assert_array_equal(got, counts.loc[spots, genes].to_numpy(dtype=np.float32))
    assert got.sum() > 0
    # integer-valued, non-negative, and every column total matches
    np.testing.assert_array_equal(np.asarray(x.sum(0)).ravel(), counts.to_numpy().sum(0).astype(np.float32))


@needs_her2st
def test_c2_spot_centres_fall_on_tissue(c2, c2_raw):
    from stranker.section.patches import PatchReader

    _, sel = c2_raw
    sp = as_sections(c2)[0]
    np.testing.assert_allclose(sp.centers, sel[["pixel_x", "pixel_y"]].to_numpy(float))
    h, w = sp.image.shape
    assert (h, w) == (9911, 9274)
    assert (sp.centers >= 0).all() and (sp.centers[:, 0] < w).all() and (sp.centers[:, 1] < h).all()

    on = sr.pp.patches(c2, size=224, out_px=32).astype(float)
    assert on.shape == (187, 32, 32, 3)
    # background far from any spot: the four corners of the slide
    corners = np.array([[112, 112], [w - 113, 112], [112, h - 113], [w - 113, h - 113]], dtype=float)
    from scipy.spatial import cKDTree

    assert cKDTree(sp.centers).query(corners)[0].min() > 2000
    off = PatchReader(sp, 224, out_px=32).read(centers=corners)[:, 0].astype(float)
    on_mean, off_mean = on.mean(axis=(1, 2, 3)), off.mean(axis=(1, 2, 3))
    assert off_mean.min() > 220  # corners are near-white glass
    assert on_mean.mean() < off_mean.mean() - 50  # tissue under the spots is much darker
    assert np.median(on_mean) < off_mean.min() - 40
    # "white" pixels (all channels > 220) are rare under spots, common in the corners
    white = lambda p: (p > 220).all(-1).mean(axis=(1, 2))  # noqa: E731
    assert white(on).mean() < 0.3 < 0.7 < white(off).min()


@needs_her2st
def test_c2_resolution_and_radius(c2, c2_raw):
    _, sel = c2_raw
    t = c2.tables["table"]
    mpp = t.uns["microns_per_pixel"]
    assert 0.5 <= mpp <= 1.0
    assert t.uns["section"] == "C2" and t.uns["patient"] == "C"  # reliability holds patients out by it
    # independent estimate: 200 µm centre-to-centre on the array grid
    pitch = np.mean([np.polyfit(sel["x"], sel["pixel_x"], 1)[0], np.polyfit(sel["y"], sel["pixel_y"], 1)[0]])
    np.testing.assert_allclose(mpp, 200.0 / pitch, rtol=0.02)
    np.testing.assert_allclose(c2.shapes["spots"]["radius"].to_numpy(), 50.0 / mpp, rtol=1e-9)
    sp = as_sections(c2)[0]
    np.testing.assert_allclose(sp.diameter, 100.0 / mpp, rtol=1e-9)
    assert sp.microns_per_pixel == pytest.approx(mpp)
    np.testing.assert_allclose(t.obsm["spatial"], sel[["pixel_x", "pixel_y"]].to_numpy(float))


@needs_her2st
def test_squidpy_anndata_from_raw_files_gives_identical_patches(c2, c2_raw):
    import anndata as ad
    import scipy.sparse as sps
    from PIL import Image

    counts, sel = c2_raw
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(her2st_dir() / "C2.jpg") as im:
            rgb = np.asarray(im.convert("RGB"))
    finally:
        Image.MAX_IMAGE_PIXELS = old
    obs = pd.DataFrame(index=list(counts.index))
    adata = ad.AnnData(sps.csr_matrix(counts.to_numpy(np.float32)), obs=obs)
    adata.var_names = list(counts.columns)
    adata.obsm["spatial"] = sel[["pixel_x", "pixel_y"]].to_numpy(float)
    adata.uns["spatial"] = {
        "C2": {
            "images": {"hires": rgb},
            "scalefactors": {
                "tissue_hires_scalef": 1.0,
                "tissue_lowres_scalef": 0.1,
                "spot_diameter_fullres": float(2 * c2.shapes["spots"]["radius"].iloc[0]),
            },
        }
    }
    # same spots in the same order
    assert [f"C2_{s}" for s in adata.obs_names] == list(c2.tables["table"].obs_names)
    a = sr.pp.patches(c2, size=224, out_px=112)
    b = sr.pp.patches(adata, size=224, out_px=112)
    assert a.shape == b.shape == (187, 112, 112, 3)
    np.testing.assert_array_equal(a, b)
    a2 = sr.pp.patches(c2, size=224, out_px=112, scales=(1, 2))
    b2 = sr.pp.patches(adata, size=224, out_px=112, scales=(1, 2))
    assert a2.shape == (187, 2, 112, 112, 3)
    np.testing.assert_array_equal(a2, b2)
    np.testing.assert_array_equal(a2[:, 0], a)
    # the patches really are the image around each spot: centre pixel of a full-size patch
    full = sr.pp.patches(adata, size=9)
    c = np.floor(adata.obsm["spatial"]).astype(int)  # pixel i spans [i, i + 1): the pixel holding the centre
    np.testing.assert_array_equal(full[:, 4, 4], rgb[c[:, 1], c[:, 0]])


# --------------------------------------------------------------------------------------------
# verification of the files
# --------------------------------------------------------------------------------------------
def _copy_c2(dst):
    for f in FILES:
        shutil.copy(her2st_dir() / f, dst / f)
        (dst / f).chmod(0o644)


@needs_her2st
@pytest.mark.parametrize("how", ["flip", "append"])
@pytest.mark.parametrize("route", ["argument", "env"])
def test_tampered_file_fails_the_hash_check(tmp_path, monkeypatch, how, route):
    _copy_c2(tmp_path)
    target = tmp_path / "C2_selection.tsv"
    data = bytearray(target.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data += b"30\t30\t30.0\t30.0\t100.0\t100.0\t1\n"
    target.write_bytes(bytes(data))
    before = {f: (tmp_path / f).read_bytes() for f in FILES}
    if route == "env":
        monkeypatch.setenv("STRANKER_DATA_DIR", str(tmp_path))
        monkeypatch.setattr(sr.settings, "_data_dir", None)
        call = lambda: sr.datasets.her2st("C2")  # noqa: E731
    else:
        call = lambda: sr.datasets.her2st("C2", data_dir=tmp_path)  # noqa: E731
    with pytest.raises(_her2st.HashMismatchError) as err:
        call()
    assert isinstance(err.value, InputError)
    msg = str(err.value)
    assert "SHA-256" in msg
    assert "C2_selection.tsv" in msg
    assert str(tmp_path) in msg
    # nothing was deleted, replaced or added
    assert {f: (tmp_path / f).read_bytes() for f in FILES} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)


@needs_her2st
def test_untampered_copy_loads(tmp_path, c2):
    from PIL import Image

    _copy_c2(tmp_path)
    max_pixels = Image.MAX_IMAGE_PIXELS
    other = sr.datasets.her2st("C2", data_dir=tmp_path)
    assert Image.MAX_IMAGE_PIXELS == max_pixels  # PIL's decompression-bomb guard is restored
    t0, t1 = c2.tables["table"], other.tables["table"]
    assert list(t0.obs_names) == list(t1.obs_names)
    assert (t0.X != t1.X).nnz == 0


# --------------------------------------------------------------------------------------------
# errors that need no data
# --------------------------------------------------------------------------------------------
def test_sections_list():
    secs = sr.datasets.her2st_sections()
    assert secs == ["A1", "B4", "C2", "C3", "C4", "C5", "C6"]


def test_unknown_section(tmp_path):
    with pytest.raises(InputError, match=r"'Z9' is not in the HER2\+ dataset") as err:
        sr.datasets.her2st("Z9", data_dir=tmp_path)
    msg = str(err.value)
    for s in ("A1", "B4", "C2", "H3"):
        assert repr(s) in msg
    assert not any(tmp_path.iterdir())


def test_section_without_image(tmp_path):
    with pytest.raises(InputError, match="'A2' has no H&E image") as err:
        sr.datasets.her2st("A2", data_dir=tmp_path)
    assert str(["A1", "B4", "C2", "C3", "C4", "C5", "C6"]) in str(err.value)
    assert not any(tmp_path.iterdir())


@pytest.fixture
def _alarm():
    """Fail instead of hanging if a download attempt blocks."""

    def boom(*_):
        raise TimeoutError("the download attempt hung")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.usefixtures("_alarm")
def test_missing_file_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(_her2st, "BASE_URL", "http://127.0.0.1:9/")
    t = time.perf_counter()
    with pytest.raises(InputError) as err:
        sr.datasets.her2st("C2", data_dir=tmp_path)
    assert time.perf_counter() - t < 20
    assert not isinstance(err.value, _her2st.HashMismatchError)
    msg = str(err.value)
    assert f"C2.tsv.gz is not in {tmp_path}" in msg
    assert "could not be downloaded from http://127.0.0.1:9/data/ST-cnts/C2.tsv.gz" in msg
    assert "STRANKER_DATA_DIR" in msg
    assert not any(p.name.startswith("C2") for p in tmp_path.iterdir())


@needs_her2st
@pytest.mark.usefixtures("_alarm")
def test_one_missing_file_offline(tmp_path, monkeypatch):
    """The counts and spot file are there, the image is not: the message names the image."""
    monkeypatch.setattr(_her2st, "BASE_URL", "http://127.0.0.1:9/")
    _copy_c2(tmp_path)
    (tmp_path / "C2.jpg").unlink()
    with pytest.raises(InputError, match=rf"C2\.jpg is not in {tmp_path}"):
        sr.datasets.her2st("C2", data_dir=tmp_path)


def test_bad_url_is_not_reported_as_a_hash_mismatch(tmp_path, monkeypatch):
    """pooch raises ValueError for an unusable URL too: that is a download failure, not a SHA-256 failure."""
    monkeypatch.setattr(_her2st, "BASE_URL", "no-protocol/")
    with pytest.raises(InputError) as err:
        sr.datasets.her2st("C2", data_dir=tmp_path)
    assert not isinstance(err.value, _her2st.HashMismatchError)
    assert "could not be downloaded" in str(err.value)
    assert "SHA-256" not in str(err.value)


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """A local HTTP server standing in for the upstream repository; BASE_URL points at it."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    root = tmp_path / "upstream"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(_her2st, "BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/")
    yield root
    server.shutdown()
    server.server_close()


@pytest.mark.usefixtures("_alarm")
def test_download_with_wrong_content_fails_the_hash_check(tmp_path, http_root):
    (http_root / "data" / "ST-cnts").mkdir(parents=True)
    (http_root / "data" / "ST-cnts" / "C2.tsv.gz").write_bytes(b"not the published file")
    cache = tmp_path / "cache"
    with pytest.raises(_her2st.HashMismatchError, match=r"C2\.tsv\.gz fails its SHA-256 check"):
        sr.datasets.her2st("C2", data_dir=cache)
    assert not (cache / "C2.tsv.gz").exists()  # the bad download is not kept


@needs_her2st
@pytest.mark.usefixtures("_alarm")
def test_download_of_a_missing_file(tmp_path, http_root):
    upstream, digest = _her2st._registry()["C2"]["spots"]
    (http_root / upstream).parent.mkdir(parents=True)
    shutil.copy(her2st_dir() / "C2_selection.tsv", http_root / upstream)
    cache = tmp_path / "cache"
    got = _her2st._fetch("C2_selection.tsv", upstream, digest, cache)
    assert got == cache / "C2_selection.tsv"
    assert got.read_bytes() == (her2st_dir() / "C2_selection.tsv").read_bytes()
    # a second call finds it in the cache (the server is no longer needed)
    (http_root / upstream).unlink()
    assert _her2st._fetch("C2_selection.tsv", upstream, digest, cache) == got


# --------------------------------------------------------------------------------------------
# A1: patient A, the viewer's lower-resolution rendering
# --------------------------------------------------------------------------------------------
needs_a1 = pytest.mark.skipif(
    not all((her2st_dir() / f).exists() for f in ("A1.png", "A1.tsv.gz", "A1_selection.tsv")),
    reason="A1.png, A1.tsv.gz, A1_selection.tsv not found in STRANKER_DATA_DIR",
)


@pytest.mark.her2st
@needs_a1
def test_a1_loads_in_the_png_frame_at_its_own_resolution():
    from PIL import Image

    a1 = sr.datasets.her2st("A1")
    t = a1.tables["table"]
    d = her2st_dir()
    sel = pd.read_csv(d / "A1_selection.tsv", sep="\t")
    counts = pd.read_csv(d / "A1.tsv.gz", sep="\t", index_col=0)
    assert t.n_obs == 346 == len(set(counts.index) & set(sel["x"].astype(str) + "x" + sel["y"].astype(str)))
    with Image.open(d / "A1.png") as im:
        w, h = im.size
        rgb = np.asarray(im.convert("RGB"))
    assert a1.images["he"]["scale0"]["image"].shape == (3, h, w)
    # spot centres: the original scan's frame (6954 px wide) scaled onto the 2000 px PNG
    sel.index = sel["x"].astype(str) + "x" + sel["y"].astype(str)
    ids = [i.split("_", 1)[1] for i in t.obs_names]
    scan_xy = sel.loc[ids, ["pixel_x", "pixel_y"]].to_numpy(float)
    np.testing.assert_allclose(t.obsm["spatial"], scan_xy * 2000 / 6954)
    # µm/px, independently: 200 µm over the median distance between array neighbours, in PNG pixels
    xy = dict(zip(zip(sel["x"], sel["y"], strict=True), sel[["pixel_x", "pixel_y"]].to_numpy() * 2000 / 6954,
                  strict=True))
    gaps = [np.hypot(*(xy[(x + dx, y + dy)] - p)) for (x, y), p in xy.items() for dx, dy in ((1, 0), (0, 1))
            if (x + dx, y + dy) in xy]
    mpp = t.uns["microns_per_pixel"]
    np.testing.assert_allclose(mpp, 200.0 / np.median(gaps), rtol=0.01)
    assert 3.0 < mpp < 3.4  # against about 0.69 on C2-C5
    assert t.uns["patient"] == "A"
    sp = as_sections(a1)[0]
    assert sp.microns_per_pixel == pytest.approx(mpp)
    np.testing.assert_allclose(sp.diameter, 100.0 / mpp, rtol=1e-9)
    # every spot lands on tissue, not on the blacked-out background
    c = np.round(t.obsm["spatial"]).astype(int)
    assert (rgb[c[:, 1], c[:, 0]].sum(1) > 60).all()
    # the blacked-out glass is white again, as in a scan; tissue pixels are as in the PNG
    img = np.moveaxis(np.asarray(a1.images["he"]["scale0"]["image"]), 0, -1)
    black = rgb.max(-1) < 8
    assert black.mean() > 0.5 and (img[black] == 255).all()
    np.testing.assert_array_equal(img[~black], rgb[~black])


@pytest.mark.her2st
@needs_a1
def test_a1_patches_cover_the_same_tissue_width_as_c2():
    """A model fitted on C2 reads A1 patches of the same micrometres, resampled to the same pixels."""
    from stranker.tl._predict import resampling

    a1, c2 = sr.datasets.her2st("A1"), sr.datasets.her2st("C2")
    model = sr.tl.fit(c2, genes=list(c2.tables["table"].var_names[:8]), epochs=1, backbone="test_resnet",
                      image_size=32, pretrained=False, w_clip=0.0, w_rank=0.0, w_distill=0.0, predict="head",
                      tta=False)
    r = resampling(as_sections(a1)[0], model)
    mpp_a1, mpp_c2 = a1.tables["table"].uns["microns_per_pixel"], c2.tables["table"].uns["microns_per_pixel"]
    assert r["patch_px"] * mpp_a1 == pytest.approx(224 * mpp_c2, rel=1e-6)
    pred = model.predict(a1)
    assert np.asarray(pred if isinstance(pred, np.ndarray) else pred[0]).shape == (346, 8)


@pytest.mark.her2st
def test_a1_tampered_png_fails_the_hash_check(tmp_path):
    d = her2st_dir()
    if not (d / "A1.tsv.gz").exists():
        pytest.skip("A1 not in STRANKER_DATA_DIR")
    for f in ("A1.tsv.gz", "A1_selection.tsv"):
        shutil.copy(d / f, tmp_path / f)
    (tmp_path / "A1.png").write_bytes((d / "A1.png").read_bytes()[:-10])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(_her2st.HashMismatchError, match="A1.png"):
        sr.datasets.her2st("A1", data_dir=tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
