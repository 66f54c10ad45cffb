"""Never guess a scale or a pixel range: µm/px checked wherever it enters, pixel ranges from the data."""

import json
import shutil
import struct

import numpy as np
import pytest

import stranker as sr
from stranker._errors import InputError
from stranker.section import as_sections

from ..conftest import make_sdata

TINY = dict(epochs=1, batch_size=8, patch_px=32, image_size=32, backbone="test_resnet", seed=0,
            pretrained=False, genes=["G0", "G1", "G2", "G3", "G4"])


def _rgb(h=96, w=128, seed=0):
    """A textured RGB uint8 image: light background, darker blobs, values spanning 30-250."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 235, dtype=np.uint8)
    img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = [150, 60, 160]
    img += rng.integers(0, 15, img.shape).astype(np.uint8)
    img[:8, :8] = 30
    return img


def _write_tiff(path, img, **kw):
    import tifffile

    tifffile.imwrite(path, img, photometric="rgb", **kw)


def _strip_resolution_tags(path):
    """Rename XResolution, YResolution and ResolutionUnit to private tags: a TIFF with none of them."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        offsets = [(t.code, t.offset) for t in tif.pages[0].tags.values() if t.code in (282, 283, 296)]
        order = "<" if tif.byteorder == "<" else ">"
    data = bytearray(path.read_bytes())
    for code, off in offsets:
        assert struct.unpack_from(order + "H", data, off)[0] == code
        struct.pack_into(order + "H", data, off, 65000 + code - 282)
    path.write_bytes(bytes(data))
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].tags.get(282) is None and tif.pages[0].tags.get(296) is None


# --------------------------------------------------------------------------------------------
# 1. TIFF resolution tags that are no microscope's scale
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tags",
    [dict(resolution=(1, 1), resolutionunit="INCH"), dict(resolution=(72, 72), resolutionunit="INCH"),
     dict(resolution=(96, 96), resolutionunit="INCH"), dict(resolution=(300, 300), resolutionunit="INCH"),
     dict(resolution=(1, 1), resolutionunit="CENTIMETER"),
     dict(resolution=(72 / 2.54, 72 / 2.54), resolutionunit="CENTIMETER"), None],
    ids=["1dpi", "72dpi", "96dpi", "300dpi", "1_per_cm", "72dpi_in_cm", "no_tags"],
)
def test_screen_default_resolution_tags_are_refused_with_the_mpp_remedy(tmp_path, tags):
    p = tmp_path / "a.tif"
    _write_tiff(p, _rgb(), **(tags or dict(resolution=(1, 1), resolutionunit="INCH")))
    if tags is None:
        _strip_resolution_tags(p)  # TIFF's default then: 1 pixel per inch, 25 400 µm/px
    with pytest.raises(InputError, match=r"records no microscope resolution.*0\.05–20 µm/px.*mpp="):
        sr.io.read_slide(p)
    sdata = sr.io.read_slide(p, mpp=0.5)  # the remedy
    assert as_sections(sdata, need_table=False)[0].microns_per_pixel == pytest.approx(0.5)


def test_microscope_resolution_tags_are_read(tmp_path):
    p = tmp_path / "a.tif"
    _write_tiff(p, _rgb(), resolution=(4e4, 4e4), resolutionunit="CENTIMETER")  # 0.25 µm/px
    sp = as_sections(sr.io.read_slide(p), need_table=False)[0]
    assert sp.microns_per_pixel == pytest.approx(0.25)
    _write_tiff(p, _rgb(), resolution=(50800, 50800), resolutionunit="INCH")  # 0.5 µm/px in dpi
    assert as_sections(sr.io.read_slide(p), need_table=False)[0].microns_per_pixel == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# 2. every µm/px checked where it enters
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bad", "match"),
    [(-0.5, "positive finite"), (0, "positive finite"), (float("nan"), "positive finite"),
     (float("inf"), "positive finite"), (True, "positive finite"), ("0.5", r"a string: pass the number"),
     (100.0, r"outside the range .*0\.05–20"), (0.001, r"outside the range")],
)
def test_read_slide_mpp_argument_is_checked(tmp_path, bad, match):
    p = tmp_path / "a.tif"
    _write_tiff(p, _rgb(), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with pytest.raises(InputError, match=match):
        sr.io.read_slide(p, mpp=bad)


@pytest.mark.parametrize("bad", [-0.5, 0.0, float("nan"), float("inf"), "abc", 100.0])
@pytest.mark.parametrize("where", ["table_uns", "image_attrs", "sdata_attrs"])
def test_a_recorded_mpp_that_is_no_scale_is_refused(bad, where):
    sdata, _ = make_sdata(n=8)
    if where == "table_uns":
        sdata.tables["table"].uns["microns_per_pixel"] = bad
    elif where == "image_attrs":
        sdata.images["he"].attrs["microns_per_pixel"] = bad
    else:
        sdata.attrs["microns_per_pixel"] = {"he": bad}
    with pytest.raises(InputError, match=r"µm per pixel.*microns_per_pixel="):
        as_sections(sdata)
    # the argument is the remedy: it is used instead of the record
    assert as_sections(sdata, microns_per_pixel=0.5)[0].microns_per_pixel == pytest.approx(0.5)


def test_anndata_uns_mpp_outside_the_microscope_range_is_refused():
    sdata, px = make_sdata(n=8)
    adata = sdata.tables["table"].copy()
    adata.obsm["spatial"] = px
    img = np.moveaxis(np.asarray(sdata.images["he"].data), 0, -1)
    sf = {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": 16.0}
    adata.uns["spatial"] = {"lib": {"images": {"hires": img}, "scalefactors": sf}}
    adata.uns["microns_per_pixel"] = 352.8  # 72 dpi
    with pytest.raises(InputError, match=r"uns\['microns_per_pixel'\] is 352\.8 µm per pixel, outside"):
        as_sections(adata)


@pytest.mark.parametrize("bad", [100.0, 0.001])
def test_microns_per_pixel_argument_outside_the_range_is_refused(bad):
    sdata, _ = make_sdata(n=8)
    with pytest.raises(InputError, match=r"`microns_per_pixel=` is .* outside the range .*0\.05–20"):
        as_sections(sdata, microns_per_pixel=bad)


# --------------------------------------------------------------------------------------------
# 3. pixel ranges decided from the data, never silently black
# --------------------------------------------------------------------------------------------
def _with_image(img_cyx):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    sdata, _ = make_sdata(n=8)
    tr = get_transformation(sdata.images["he"], get_all=True)
    sdata.images["he"] = Image2DModel.parse(img_cyx, dims=("c", "y", "x"), c_coords=["r", "g", "b"],
                                            transformations=tr)
    return sdata


def _read_all(sdata):
    sp = as_sections(sdata)[0]
    h, w = sp.image.shape
    return sp.image.read(0, 0, h, 0, w)


@pytest.mark.parametrize(
    "convert",
    [lambda a: a.astype(np.int16), lambda a: a.astype(np.int32), lambda a: a.astype(np.uint16),
     lambda a: np.rint(a.astype(np.float64) * 4095 / 255).astype(np.uint16)],
    ids=["int16_0_255", "int32_0_255", "uint16_0_255", "uint16_12bit"],
)
def test_integer_images_not_spanning_their_dtype_read_as_their_values(convert):
    ref = np.asarray(make_sdata(n=8)[0].images["he"].data)
    got = _read_all(_with_image(convert(ref)))
    np.testing.assert_array_equal(got, np.moveaxis(ref, 0, -1))


def test_integer_tiff_not_spanning_its_dtype_reads_as_its_values(tmp_path):
    img = _rgb()
    for dtype, scale in ((np.uint16, 1.0), (np.int32, 1.0), (np.uint16, 4095 / 255)):
        p = tmp_path / "a.tif"
        _write_tiff(p, np.rint(img * scale).astype(dtype), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
        sp = as_sections(sr.io.read_slide(p), need_table=False)[0]
        np.testing.assert_array_equal(sp.image.read(0, 0, img.shape[0], 0, img.shape[1]), img)


def test_images_that_cannot_be_read_are_refused(tmp_path):
    ref = np.asarray(make_sdata(n=8)[0].images["he"].data)
    stray = ref.astype(np.float32) / 255
    stray[0, 5, 5] = 1.02  # a 0-1 image with one value above 1 (was: read as 0-255, all black)
    with pytest.raises(InputError, match=r"1 of .* exceed 1, up to 1\.02.*np\.clip"):
        _read_all(_with_image(stray))
    with pytest.raises(InputError, match="all NaN"):
        _read_all(_with_image(np.full(ref.shape, np.nan, dtype=np.float32)))
    with pytest.raises(InputError, match="constant"):
        _read_all(_with_image(np.full(ref.shape, 200, dtype=np.int16)))
    hot = ref.astype(np.uint16)
    hot[1, 7, 7] = 4000  # 8-bit data with one hot pixel (was: read as 12-bit, dark)
    with pytest.raises(InputError, match="exceed 255"):
        _read_all(_with_image(hot))
    # a TIFF alike: refused when it is opened
    img = _rgb().astype(np.float32) / 255
    img[3, 3] = 1.5
    p = tmp_path / "f.tif"
    _write_tiff(p, img, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with pytest.raises(InputError, match=r"exceed 1, up to 1\.5"):
        sr.io.read_slide(p)


# --------------------------------------------------------------------------------------------
# 4. training on sections of different resolution, one of which records none
# --------------------------------------------------------------------------------------------
def _sections(mpps):
    out = []
    for i, m in enumerate(mpps):
        s = make_sdata(n=16, seed=i)[0]
        if m is not None:
            s.tables["table"].uns["microns_per_pixel"] = m
        out.append(s)
    return out


def test_training_on_mixed_resolutions_with_one_unknown_is_refused():
    with pytest.raises(InputError, match=r"record no µm/px while the others are at different resolutions"):
        sr.tl.fit(_sections([0.5, 1.0, None]), **TINY)


def test_training_with_one_unknown_at_the_others_resolution_warns(stranker_log):
    from stranker.section.patches import PatchGeometry

    geo = PatchGeometry.of(as_sections(_sections([0.5, 0.5, None])), 32, None, 32)
    assert geo.size_um is None and geo.size_px == 32
    assert "record no µm/px: their patches are read 32 px wide" in stranker_log.text


# --------------------------------------------------------------------------------------------
# 5. HEST and Visium HD: clear errors
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hest_fine(tmp_path_factory):
    root = tmp_path_factory.mktemp("hest_scales")
    sr.datasets.synthetic_hest(root, n_samples=1, n_spots=40, mpp=0.5)
    return root


def _copy(root, tmp_path):
    out = tmp_path / "h"
    shutil.copytree(root, out)
    return out


def _set_meta(root, **kw):
    p = root / "metadata" / "SYN0.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **kw}))


def test_hest_patch_coords_that_are_centres_are_named(hest_fine, tmp_path):
    import anndata as ad
    import h5py

    root = _copy(hest_fine, tmp_path)
    centres = ad.read_h5ad(root / "st" / "SYN0.h5ad").obsm["spatial"]
    with h5py.File(root / "patches" / "SYN0.h5", "r+") as f:
        f["coords"][...] = np.asarray(centres)[: len(f["coords"])]  # was: TypeError formatting None
    with pytest.raises(InputError, match=r"SYN0\.h5: the patches' coords lie 0 px from their spots' centres"):
        sr.io.read_hest(root, "SYN0")
    assert as_sections(sr.io.read_hest(root, "SYN0", patches=False))[0].microns_per_pixel == 0.5


def test_hest_truncated_expression_file_is_named(hest_fine, tmp_path):
    root = _copy(hest_fine, tmp_path)
    p = root / "st" / "SYN0.h5ad"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(InputError, match=r"SYN0\.h5ad cannot be read as an AnnData .*truncated"):
        sr.io.read_hest(root, "SYN0")


def test_hest_metadata_pixel_size_is_checked(hest_fine, tmp_path, stranker_log):
    root = _copy(hest_fine, tmp_path)
    # far from the patches' 0.5 µm/px (was: a warning, then a mosaic 8x too large)
    _set_meta(root, pixel_size_um_estimated=4.0)
    with pytest.raises(InputError, match=r"imply 0\.49.* µm/px.*says 4: 8.*x apart.*patches=False"):
        sr.io.read_hest(root, "SYN0", image="patches")
    # a few percent apart: a warning, the metadata's is used
    _set_meta(root, pixel_size_um_estimated=0.55)
    assert as_sections(sr.io.read_hest(root, "SYN0"))[0].microns_per_pixel == pytest.approx(0.55)
    assert "imply 0.49" in stranker_log.text and "says 0.55; using the latter" in stranker_log.text
    # present but no scale: refused, never passed over for the embedded value (was: silently)
    for bad in (-0.5, 0, "abc", 300.0):
        _set_meta(root, pixel_size_um_estimated=bad)
        with pytest.raises(InputError, match=r"'pixel_size_um_estimated'"):
            sr.io.read_hest(root, "SYN0")
    _set_meta(root, pixel_size_um_estimated=None)  # absent: the embedded value, with a warning
    assert as_sections(sr.io.read_hest(root, "SYN0"))[0].microns_per_pixel == pytest.approx(0.5)


@pytest.fixture(scope="module")
def hd_root(tmp_path_factory):
    pytest.importorskip("spatialdata_io")
    from ..section.test_visium import write_visium_hd

    root = tmp_path_factory.mktemp("hd_scales")
    write_visium_hd(root)
    return root


def _hd(root):
    from ..section.test_visium import _read_hd

    return _read_hd(root)


def test_aggregate_bins_refuses_a_grid_of_step_two(hd_root):
    sdata = _hd(hd_root)
    obs = sdata.tables["square_008um"].obs
    obs["array_row"] *= 2
    obs["array_col"] *= 2
    with pytest.raises(InputError, match=r"obs\['array_row'\] advances by 2 between neighbouring bins"):
        sr.io.aggregate_bins(sdata, bin_size=8, size_um=32)
    assert "square_032um" not in sdata.tables


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -32.0, "32"])
def test_aggregate_bins_refuses_a_size_that_is_no_width(hd_root, bad):
    sdata = _hd(hd_root)
    with pytest.raises(InputError, match=r"`size_um=` must be a positive finite number"):
        sr.io.aggregate_bins(sdata, bin_size=8, size_um=bad)


def test_aggregate_bins_refuses_a_size_wider_than_the_section(hd_root):
    sdata = _hd(hd_root)
    with pytest.raises(InputError, match=r"is wider than the section: its bins span 24 x 24"):
        sr.io.aggregate_bins(sdata, bin_size=8, size_um=1e9)
    assert set(sdata.tables) == set(_hd(hd_root).tables)
