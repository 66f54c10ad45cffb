"""sr.io.read_slide: pyramidal TIFF, OME-TIFF, OpenSlide; lazy reads, resolution, predict on a slide."""

import numpy as np
import pytest

import stranker as sr
from stranker._errors import InputError
from stranker.io import _slide
from stranker.section import as_sections

FAST = dict(
    epochs=1,
    batch_size=32,
    patch_px=64,
    image_size=32,
    backbone="test_resnet",
    pretrained=False,
    n_top_genes=30,
    genes="heg",
    tta=False,
)


def _pyramid(img, n):
    out = [img]
    for _ in range(n - 1):
        a = out[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        out.append(a[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3)).round().astype(np.uint8))
    return out


def write_tiff(path, img, *, mpp=None, levels=3, ome=False, subifds=True):
    """A tiled pyramidal TIFF: level 0 + SubIFDs (or one page per level), resolution tags in centimetres."""
    import tifffile

    pyr = _pyramid(img, levels)
    opts = dict(tile=(128, 128), photometric="rgb", compression="zlib")
    with tifffile.TiffWriter(path, ome=ome) as tw:
        for i, lv in enumerate(pyr):
            kw = dict(opts)
            if mpp is not None and not ome:
                kw.update(resolution=(1e4 / (mpp * 2**i),) * 2, resolutionunit="CENTIMETER")
            if i == 0:
                if subifds:
                    kw["subifds"] = levels - 1
                if ome:
                    kw["metadata"] = {
                        "axes": "YXS",
                        **({"PhysicalSizeX": mpp, "PhysicalSizeY": mpp} if mpp else {}),
                    }
            else:
                kw["subfiletype"] = 1
            tw.write(lv, **kw)
    return pyr


def tissue_image(h=1536, w=2048, seed=0):
    """White glass with a textured pink/purple ellipse of 'tissue'."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - h / 2) / (0.38 * h)) ** 2 + ((xx - w / 2) / (0.4 * w)) ** 2 < 1
    img = np.full((h, w, 3), 242, dtype=np.uint8)
    tissue = np.array([200, 120, 180]) + rng.normal(0, 20, (h, w, 3))
    img[inside] = np.clip(tissue[inside], 0, 255).astype(np.uint8)
    return img


@pytest.fixture(scope="module")
def slide_img():
    return tissue_image()


@pytest.fixture(scope="module")
def tiff_path(tmp_path_factory, slide_img):
    p = tmp_path_factory.mktemp("slides") / "slide.tif"
    write_tiff(p, slide_img, mpp=0.5, levels=4)
    return p


def _levels(sdata, key="he"):
    im = sdata.images[key]
    return [im[k]["image"] for k in sorted(im.keys(), key=lambda k: int(k[5:]))]


def test_pyramidal_tiff_levels_pixels_and_mpp(tiff_path, slide_img):
    sdata = sr.io.read_slide(tiff_path)
    lv = _levels(sdata)
    pyr = _pyramid(slide_img, 4)
    assert [tuple(a.shape) for a in lv] == [(3, *p.shape[:2]) for p in pyr]
    assert all(type(a.data).__name__ == "Array" for a in lv)  # dask, nothing read yet
    np.testing.assert_array_equal(
        np.moveaxis(lv[2].data[:, 50:90, 100:170].compute(), 0, -1), pyr[2][50:90, 100:170]
    )
    sp = as_sections(sdata, need_table=False)[0]
    assert sp.microns_per_pixel == pytest.approx(0.5)
    assert sp.image.scales == [1.0, 2.0, 4.0, 8.0]
    assert sdata.attrs["microns_per_pixel"] == {"he": 0.5}
    # the SpatialData is a valid spatialdata object (it can be written)
    from spatialdata.models import Image2DModel

    Image2DModel().validate(sdata.images["he"])


def test_reading_a_patch_reads_only_its_chunks(tiff_path, monkeypatch):
    sdata = sr.io.read_slide(tiff_path)
    calls = []
    real = _slide._Level.__getitem__

    def counting(self, key):
        out = real(self, key)
        calls.append((self.name, out.shape))
        return out

    monkeypatch.setattr(_slide._Level, "__getitem__", counting)
    sp = as_sections(sdata, need_table=False)[0]
    win = sp.image.read(0, 700, 764, 900, 964)  # a 64 px patch of level 0 (1536 x 2048)
    assert win.shape == (64, 64, 3)
    assert len(calls) == 1 and calls[0][0].endswith("[0]")
    assert np.prod(calls[0][1]) <= 3 * _slide._CHUNK**2 < 3 * 1536 * 2048
    # a patch across a chunk border reads the (at most four) chunks it touches
    calls.clear()
    sp.image.read(0, 1000, 1100, 1000, 1100)
    assert len(calls) == 4


def test_strided_reads_keep_every_step_th_pixel(tiff_path, slide_img):
    # tissue detection subsamples a level with a step; every chunk must honour it (it once read the
    # full-resolution window instead: wrong mask scale and the whole level in memory)
    lv = _levels(sr.io.read_slide(tiff_path))[0].data
    for step in (2, 3, 5):
        got = lv[:, 7::step, ::step].compute()
        np.testing.assert_array_equal(np.moveaxis(got, 0, -1), slide_img[7::step, ::step])
    np.testing.assert_array_equal(np.moveaxis(lv[:, ::-3, :].compute(), 0, -1), slide_img[::-3])


def test_tissue_grid_on_a_subsampled_level_finds_the_tissue(tmp_path, monkeypatch):
    # detection reads at most _DETECT_PX pixels: force a stride of 4 and check the tiles against the
    # drawn ellipse, tile by tile
    from stranker.tl import _predict

    img = tissue_image(1024, 1024, seed=3)
    p = tmp_path / "one_level.tif"
    write_tiff(p, img, mpp=1.0, levels=1)
    monkeypatch.setattr(_predict, "_DETECT_PX", 256 * 256)
    sp = as_sections(sr.io.read_slide(p), need_table=False)[0]
    assert _predict._detection_level(sp, 32.0) == (0, 4)
    centres = _predict.tissue_grid(sp, 32.0)
    h = w = 1024
    inside = ((centres[:, 1] - h / 2) / (0.38 * h)) ** 2 + ((centres[:, 0] - w / 2) / (0.4 * w)) ** 2
    expected = np.pi * 0.38 * 0.4 * h * w / 32**2  # tiles whose area is mostly inside the ellipse
    assert abs(len(centres) - expected) < 0.08 * expected
    assert inside.max() < 1.15  # every kept tile lies on (or at the rim of) the tissue


def test_ome_tiff_physical_size(tmp_path, slide_img):
    p = tmp_path / "s.ome.tif"
    pyr = write_tiff(p, slide_img[:512, :768], mpp=0.25, levels=2, ome=True)
    sdata = sr.io.read_slide(p)
    lv = _levels(sdata)
    assert len(lv) == 2 and tuple(lv[1].shape) == (3, *pyr[1].shape[:2])
    np.testing.assert_array_equal(np.moveaxis(lv[1].data.compute(), 0, -1), pyr[1])
    assert as_sections(sdata, need_table=False)[0].microns_per_pixel == pytest.approx(0.25)
    assert sdata.images["he"].attrs["microns_per_pixel"] == pytest.approx(0.25)


def test_openslide_backend_reads_the_same_pixels(tmp_path, slide_img):
    pytest.importorskip("openslide")
    p = tmp_path / "pages.tif"  # one page per level: OpenSlide's generic tiled TIFF
    write_tiff(p, slide_img[:768, :1024], mpp=0.5, levels=3, subifds=False)
    a = sr.io.read_slide(p, backend="openslide")
    b = sr.io.read_slide(p, backend="tifffile")
    assert as_sections(a, need_table=False)[0].microns_per_pixel == pytest.approx(0.5)
    for la, lb in zip(_levels(a), _levels(b), strict=True):
        assert la.shape == lb.shape
        np.testing.assert_array_equal(
            la.data[:, 30:200, 40:300].compute(), lb.data[:, 30:200, 40:300].compute()
        )


def test_unknown_resolution_needs_mpp(tmp_path, slide_img):
    p = tmp_path / "nores.tif"
    write_tiff(p, slide_img[:256, :256], mpp=None, levels=1)
    with pytest.raises(InputError, match="pass `mpp=`"):
        sr.io.read_slide(p)
    sdata = sr.io.read_slide(p, mpp=0.3)
    assert as_sections(sdata, need_table=False)[0].microns_per_pixel == pytest.approx(0.3)
    with pytest.raises(InputError, match="positive"):
        sr.io.read_slide(p, mpp=-1)


def test_missing_openslide_names_the_fix(tmp_path, monkeypatch):
    import sys

    p = tmp_path / "x.svs"
    p.write_bytes(b"not a slide")
    monkeypatch.setitem(sys.modules, "openslide", None)  # import fails as if not installed
    with pytest.raises(InputError, match=r"stranker\[wsi\]"):
        sr.io.read_slide(p)
    with pytest.raises(FileNotFoundError):
        sr.io.read_slide(tmp_path / "missing.svs")


# --------------------------------------------------------------------------------------------
# predict on a whole slide
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_and_section(synthetic_small):
    from spatialdata import deepcopy

    secs = [deepcopy(s) for s in synthetic_small]
    mpp = secs[0].tables["table"].uns["synthetic"]["microns_per_pixel"]
    for s in secs:
        s.tables["table"].uns["microns_per_pixel"] = mpp
    model = sr.tl.fit(secs[:1], seed=0, **FAST)
    img = np.moveaxis(np.asarray(secs[3].images["he"]["scale0"]["image"].values), 0, -1)
    return model, img, mpp


def _match(um_a, um_b):
    """Pairs of rows of two tile tables at the same place (micrometres, rounded)."""
    key = {tuple(np.round(u).astype(int)): i for i, u in enumerate(um_a)}
    return np.asarray(
        [(key[k], j) for j, u in enumerate(um_b) if (k := tuple(np.round(u).astype(int))) in key]
    )


def _r(a, b):
    return float(np.corrcoef((a - a.mean(0)).ravel(), (b - b.mean(0)).ravel())[0, 1])


def test_predict_on_a_slide_at_another_resolution(model_and_section, tmp_path, monkeypatch):
    """The same tissue scanned at the model's resolution and at twice it gives the same predictions."""
    model, img, mpp = model_and_section
    native, fine = tmp_path / "native.tif", tmp_path / "fine.tif"
    write_tiff(native, img, mpp=mpp, levels=2)
    write_tiff(fine, np.repeat(np.repeat(img, 2, 0), 2, 1), mpp=mpp / 2, levels=3)  # a 2x finer scan

    reads = []
    real = _slide._Level.__getitem__
    monkeypatch.setattr(
        _slide._Level, "__getitem__", lambda self, key: reads.append(self.name) or real(self, key)
    )
    out = {}
    for name, path in (("native", native), ("fine", fine)):
        sdata = sr.io.read_slide(path)
        reads.clear()
        sr.tl.predict(model, sdata)
        t = sdata.tables["stranker_table"]
        out[name] = (sdata, t, t.uns["stranker"]["resampling"], list(reads))
    (sn, tn, rn, _), (sf, tf, rf, reads_fine) = out["native"], out["fine"]
    assert rn["factor"] == pytest.approx(1.0) and rf["factor"] == pytest.approx(2.0)
    assert rf["slide_microns_per_pixel"] == pytest.approx(mpp / 2)
    assert rf["model_microns_per_pixel"] == pytest.approx(mpp)
    # the finer slide is read from level 1 (patches of 128 px shown at 32 px), never at full resolution
    assert rf["level"] == 1 and reads_fine and not any(r.endswith("[0]") for r in reads_fine)
    # tiles are the training spot size (100 µm) and patches the training patch size, in pixels of each slide
    assert rf["patch_px"] == pytest.approx(2 * rn["patch_px"])
    assert 2 * sn.shapes["stranker_tiles"]["radius"].iloc[0] == pytest.approx(100 / mpp)
    assert 2 * sf.shapes["stranker_tiles"]["radius"].iloc[0] == pytest.approx(200 / mpp)
    assert np.isfinite(tf.layers["stranker"]).all() and tf.X is None
    assert tf.obsm["X_stranker"].shape == (tf.n_obs, model.config.embed_dim)
    # same places in micrometres -> nearly the same predictions
    pairs = _match(np.asarray(tn.obsm["spatial"]) * mpp, np.asarray(tf.obsm["spatial"]) * mpp / 2)
    assert tn.n_obs > 40 and len(pairs) > 0.8 * min(tn.n_obs, tf.n_obs)
    a, b = tn.layers["stranker"][pairs[:, 0]], tf.layers["stranker"][pairs[:, 1]]
    r = _r(a, b)
    assert r > 0.9, r
    # control: the fine slide declared at the native resolution is read at the wrong scale
    wrong = sr.io.read_slide(fine, mpp=mpp)
    sr.tl.predict(model, wrong, tile_px=200 / mpp)
    tw = wrong.tables["stranker_table"]
    pw = _match(np.asarray(tn.obsm["spatial"]) * mpp, np.asarray(tw.obsm["spatial"]) * mpp / 2)
    r_wrong = _r(tn.layers["stranker"][pw[:, 0]], tw.layers["stranker"][pw[:, 1]])
    assert r_wrong < r - 0.05, (r, r_wrong)


@pytest.mark.parametrize(
    "convert",
    [lambda a: a.astype(np.uint16) * 257, lambda a: a.astype(np.float32) / 255,
     lambda a: a.astype(np.float32)],
    ids=["uint16", "float01", "float0255"],
)
def test_slides_of_any_dtype_read_as_their_uint8_values(tmp_path, convert):
    # one conversion for every reader: a 16-bit or float TIFF reads like its 8-bit original, and a
    # window of a 0-255 float slide holding only values <= 1 stays dark
    img = tissue_image(256, 320)
    img[:32, :32] = [0, 1, 1]
    write_tiff(tmp_path / "a.tif", convert(img), mpp=0.5, levels=1)
    sp = as_sections(sr.io.read_slide(tmp_path / "a.tif"), need_table=False)[0]
    np.testing.assert_array_equal(sp.image.read(0, 0, 256, 0, 320), img)
    np.testing.assert_array_equal(sp.image.read(0, 0, 32, 0, 32), img[:32, :32])


def _without_scale(model):
    """The same model as if fitted on data that recorded no µm/px."""
    import copy

    m = copy.copy(model)
    m.meta = {**model.meta, "spot_diameter_um": None, "patch_um": None, "microns_per_pixel": None}
    return m


def test_model_and_slide_of_which_only_one_knows_its_scale(model_and_section, tiff_path, stranker_log):
    # a model of unknown scale used to tile a 0.5 µm/px slide in training pixels without a word
    import logging

    from stranker.tl._predict import model_mpp

    model, img, mpp = model_and_section
    assert model_mpp(model) == pytest.approx(mpp)
    blind = _without_scale(model)
    slide = sr.io.read_slide(tiff_path)
    with pytest.raises(InputError, match="tile_px="):
        sr.tl.predict(blind, slide)
    assert not slide.tables and not slide.shapes
    # with tile_px the user decides the tile size; the patches are still read in pixels: warned
    sr.tl.predict(blind, slide, tile_px=64)
    warned = [r.getMessage() for r in stranker_log.records if r.levelno == logging.WARNING]
    assert any("does not know its physical scale" in w for w in warned)
    # the reverse: a model of known scale on a slide that does not record its resolution
    unknown = sr.io.read_slide(tiff_path)
    unknown.attrs.pop("microns_per_pixel")
    unknown.images["he"].attrs.pop("microns_per_pixel")
    with pytest.raises(InputError, match="mpp="):
        sr.tl.predict(model, unknown)
    assert not unknown.tables and not unknown.shapes


def test_a_truncated_or_damaged_tiff_is_one_clear_error_naming_the_file(tmp_path):
    # it used to surface as imagecodecs' DeflateError (plus asyncio noise) at the first read
    img = tissue_image(512, 640)
    write_tiff(tmp_path / "whole.tif", img, mpp=0.5, levels=2)
    data = (tmp_path / "whole.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.tif is truncated"):
        sr.io.read_slide(tmp_path / "cut.tif")
    # damaged tile data (same length): the read names the file and the region
    bad = bytearray(data)
    for off in range(20000, len(bad) // 2, 997):
        bad[off] ^= 0xFF
    (tmp_path / "bad.tif").write_bytes(bytes(bad))
    sp = as_sections(sr.io.read_slide(tmp_path / "bad.tif"), need_table=False)[0]
    with pytest.raises(InputError, match=r"bad\.tif\[0\]: cannot decode"):
        sp.image.read(0, 0, 512, 0, 640)


def test_reader_threads_predict_the_same_on_a_slide(model_and_section, tiff_path):
    # tiles of a slide read by 0, 1 or 3 threads, in batches of 8: the same outputs, in the same order
    from stranker.tl._predict import spots_or_tiles

    model, _, _ = model_and_section
    sp = as_sections(sr.io.read_slide(tiff_path), need_table=False)[0]
    tiles, kind, _ = spots_or_tiles(sp, model, None, log=lambda *_: None)
    assert kind == "tiles" and tiles.n_spots > 16
    outs = [model.infer(tiles, batch_size=8, num_workers=w, device="cpu") for w in (0, 1, 3)]
    for emb, pred in outs[1:]:
        np.testing.assert_array_equal(emb, outs[0][0])
        np.testing.assert_array_equal(pred, outs[0][1])
    # through sr.tl.predict: the default (reader threads) writes what num_workers=0 writes
    a, b = sr.io.read_slide(tiff_path), sr.io.read_slide(tiff_path)
    sr.tl.predict(model, a, num_workers=0)
    sr.tl.predict(model, b)
    np.testing.assert_array_equal(a.tables["stranker_table"].layers["stranker"],
                                  b.tables["stranker_table"].layers["stranker"])
    # a bad number is refused before anything is read or written
    c = sr.io.read_slide(tiff_path)
    with pytest.raises(InputError, match="num_workers"):
        sr.tl.predict(model, c, num_workers=-1)
    assert not c.tables and not c.shapes
