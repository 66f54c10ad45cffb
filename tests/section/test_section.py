import numpy as np
import pytest

import stranker as sr
from stranker._errors import InputError
from stranker.section import as_sections
from tests.conftest import make_sdata


@pytest.mark.parametrize(
    ("image_scale", "shapes_scale", "multiscale"), [(1, 1, False), (2.0, 0.5, False), (0.5, 3.0, True)]
)
def test_spot_centres_follow_transformations(image_scale, shapes_scale, multiscale):
    sdata, px = make_sdata(image_scale=image_scale, shapes_scale=shapes_scale, multiscale=multiscale)
    sp = as_sections(sdata)[0]
    np.testing.assert_allclose(sp.centers, px, atol=1e-6)
    np.testing.assert_allclose(sp.diameter, 16.0, rtol=1e-6)
    # the pixel at the centre of every patch carries the spot's colour code
    p = sr.pp.patches(sdata, size=9)
    assert p.shape == (12, 9, 9, 3)
    np.testing.assert_array_equal(p[:, 4, 4, 0], (np.arange(12) * 10) % 256)
    np.testing.assert_array_equal(p[:, 4, 4, 1], 200)


def test_multiscale_levels_map_to_the_same_spot():
    from spatialdata.models import Image2DModel

    sdata, px = make_sdata(h=400, w=400)
    yy, xx = np.mgrid[0:400, 0:400]
    ramp = np.stack([xx * 255 / 399, yy * 255 / 399, np.full_like(xx, 128)]).astype(np.uint8)
    sdata.images["he"] = Image2DModel.parse(ramp, dims=("c", "y", "x"), scale_factors=[2, 2])
    sp = as_sections(sdata)[0]
    assert sp.image.scales == [1.0, 2.0, 4.0]
    # a 32 px patch shrunk to 4 px is read from level 2 (4x coarser) and stays centred on the spot
    assert sp.image.level_for(32 / 4) == 2
    p = sr.pp.patches(sdata, size=32, out_px=4).astype(float)
    np.testing.assert_allclose(p[..., 0].mean(axis=(1, 2)), px[:, 0] * 255 / 399, atol=2.5)
    np.testing.assert_allclose(p[..., 1].mean(axis=(1, 2)), px[:, 1] * 255 / 399, atol=2.5)


def test_anndata_squidpy_layout_gives_identical_patches():
    sdata, px = make_sdata()
    table = sdata.tables["table"].copy()
    img = np.moveaxis(np.asarray(sdata.images["he"].data), 0, -1)
    table.obsm["spatial"] = px.copy()
    table.uns["spatial"] = {
        "lib": {"images": {"hires": img}, "scalefactors": {
            "tissue_hires_scalef": 1.0, "tissue_lowres_scalef": 0.1, "spot_diameter_fullres": 16.0}}
    }
    a = sr.pp.patches(sdata, size=15, scales=(1, 2))
    b = sr.pp.patches(table, size=15, scales=(1, 2))
    np.testing.assert_array_equal(a, b)


def test_anndata_hires_scalefactor_is_honoured():
    sdata, px = make_sdata(h=200, w=240)
    full = np.moveaxis(np.asarray(sdata.images["he"].data), 0, -1)
    table = sdata.tables["table"].copy()
    # full-resolution coordinates are twice the pixel coordinates of the stored 'hires' image
    table.obsm["spatial"] = px * 2
    table.uns["spatial"] = {"lib": {"images": {"hires": full}, "scalefactors": {
        "tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.05, "spot_diameter_fullres": 32.0}}}
    sp = as_sections(table)[0]
    assert sp.image.shape == (400, 480)
    p = sr.pp.patches(table, size=18, out_px=9)
    np.testing.assert_array_equal(p[:, 4, 4, 1], 200)


def test_list_input_gives_one_view_per_section():
    s1, _ = make_sdata(seed=1)
    s2, _ = make_sdata(seed=2, n=7)
    secs = as_sections([s1, s2])
    assert [s.n_spots for s in secs] == [12, 7]
    out = sr.pp.patches([s1, s2], size=5)
    assert [o.shape[0] for o in out] == [12, 7]


def test_missing_image_is_reported():
    sdata, _ = make_sdata()
    del sdata.images["he"]
    with pytest.raises(InputError, match="no image element"):
        sr.pp.patches(sdata)


def test_several_images_need_image_key():
    sdata, _ = make_sdata(extra_images=1)
    with pytest.raises(InputError, match=r"several images \['he', 'he2'\].*image_key"):
        as_sections(sdata)
    assert as_sections(sdata, image_key="he2")[0].keys.image_key == "he2"
    with pytest.raises(InputError, match="'nope' not found"):
        as_sections(sdata, image_key="nope")


def test_not_a_spatial_object():
    with pytest.raises(InputError, match="stranker takes a SpatialData"):
        as_sections(np.zeros(3))


def test_anndata_without_spatial_is_reported():
    import anndata as ad

    with pytest.raises(InputError, match=r"obsm\['spatial'\]"):
        as_sections(ad.AnnData(np.zeros((3, 2))))


def test_spots_outside_the_image():
    sdata, px = make_sdata()
    shapes = sdata.shapes["spots"]
    shapes.geometry = shapes.geometry.translate(xoff=1000)
    with pytest.raises(InputError, match="12 of 12 spots .* lie outside its image"):
        sr.pp.patches(sdata, size=9)
    p = sr.pp.patches(sdata, size=9, on_outside="pad")
    assert (p == 255).all()


def test_border_spots_are_padded():
    sdata, px = make_sdata()
    p = sr.pp.patches(sdata, size=100)
    assert p.shape == (12, 100, 100, 3)
    assert (p == 255).any()  # spots within 20 px of the border get white padding


def _replace_image(sdata, img):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    tr = get_transformation(sdata.images["he"], get_all=True)
    sdata.images["he"] = Image2DModel.parse(img, dims=("c", "y", "x"), c_coords=["r", "g", "b"],
                                            transformations=tr)
    return sdata


@pytest.mark.parametrize(
    "convert",
    [
        lambda a: a.astype(np.uint16) * 257,  # 16-bit: used to clip to white
        lambda a: a.astype(np.uint32) * 16843009,  # 32-bit: 255 * 16843009 == 2**32 - 1
        lambda a: a.astype(np.float32) / 255,  # float 0-1
        lambda a: a.astype(np.float64),  # float 0-255
    ],
    ids=["uint16", "uint32", "float01", "float0255"],
)
def test_images_of_any_dtype_read_as_their_uint8_values(convert):
    sdata, _ = make_sdata()
    img = np.asarray(sdata.images["he"].data)
    img[:, :40, :40] = np.array([0, 1, 1], dtype=np.uint8)[:, None, None]  # a near-black corner
    sdata = _replace_image(sdata, img)
    ref = sr.pp.patches(sdata, size=16)
    other = _replace_image(make_sdata()[0], convert(img))
    np.testing.assert_array_equal(sr.pp.patches(other, size=16), ref)
    # a window that holds only values <= 1 of a 0-255 float image is dark, not white
    sp = as_sections(other)[0]
    np.testing.assert_array_equal(sp.image.read(0, 0, 40, 0, 40), img[:, :40, :40].transpose(1, 2, 0))


def test_to_uint8_scales_by_the_dtype_range():
    from stranker._pixels import float_range, to_uint8

    assert to_uint8(np.array([0, 257 * 100, 65535], dtype=np.uint16)).tolist() == [0, 100, 255]
    assert to_uint8(np.array([-5, 0, 32767], dtype=np.int16)).tolist() == [0, 0, 255]
    assert to_uint8(np.array([False, True])).tolist() == [0, 255]
    assert to_uint8(np.array([0.0, 0.5, 1.0, np.nan]), 1.0).tolist() == [0, 128, 255, 0]
    assert to_uint8(np.array([0.0, 1.0, 255.0]), 255.0).tolist() == [0, 1, 255]
    assert float_range(np.array([0.0, 0.9])) == 1.0 and float_range(np.array([0.0, 3.0])) == 255.0
    with pytest.raises(ValueError, match="float_max"):
        to_uint8(np.zeros(3, dtype=np.float32))


def _two_libraries():
    """One AnnData holding two libraries (spots 0-5 on image A, 6-11 on image B), squidpy layout."""
    sdata, px = make_sdata()
    table = sdata.tables["table"].copy()
    img = np.moveaxis(np.asarray(sdata.images["he"].data), 0, -1)
    table.obsm["spatial"] = px.copy()
    sf = {"tissue_hires_scalef": 1.0, "tissue_lowres_scalef": 0.1, "spot_diameter_fullres": 16.0}
    table.uns["spatial"] = {"A": {"images": {"hires": img}, "scalefactors": sf},
                            "B": {"images": {"hires": 255 - img}, "scalefactors": sf}}
    table.obs["sample"] = ["A"] * 6 + ["B"] * 6
    return table


def test_several_libraries_without_a_key_are_refused():
    # without obs['library_id'] every row used to be paired with the chosen library's image
    table = _two_libraries()
    before = table.copy()
    with pytest.raises(InputError, match="library_key="):
        sr.pp.patches(table, size=9, library_id="A")
    with pytest.raises(InputError, match="not a column"):
        sr.pp.patches(table, size=9, library_id="A", library_key="batch")
    assert table.obs.equals(before.obs) and set(table.uns) == set(before.uns)


def test_library_key_picks_each_library_s_rows():
    table = _two_libraries()
    a = as_sections(table, library_id="A", library_key="sample")[0]
    b = as_sections(table, library_id="B", library_key="sample")[0]
    np.testing.assert_array_equal(a.rows, np.arange(6))
    np.testing.assert_array_equal(b.rows, np.arange(6, 12))
    pa = sr.pp.patches(table, size=9, library_id="A", library_key="sample")
    pb = sr.pp.patches(table, size=9, library_id="B", library_key="sample")
    assert len(pa) == len(pb) == 6
    np.testing.assert_array_equal(pa[:, 4, 4, 1], 200)  # each spot read on its own library's image
    np.testing.assert_array_equal(pb[:, 4, 4, 1], 55)
    # the default key of a multi-library AnnData stays obs['library_id']
    table.obs["library_id"] = table.obs["sample"]
    np.testing.assert_array_equal(as_sections(table, library_id="B")[0].rows, np.arange(6, 12))


def test_add_elements_replaces_only_what_stranker_added_under_that_name():
    import anndata as ad
    import pandas as pd
    from spatialdata.models import TableModel

    from stranker.write import add_elements

    sdata, _ = make_sdata()
    spots = sdata.shapes["spots"]
    add_elements(sdata, shapes={"mine_tiles": spots.copy()}, by="test")
    add_elements(sdata, shapes={"mine_tiles": spots.copy()}, by="test")  # its own: replaced
    # a copy of stranker's element under another name is the user's; names clash across types and case
    sdata.shapes["copied"] = sdata.shapes["mine_tiles"].copy()
    cases = (({"shapes": {"copied": spots.copy()}}, "copied"), ({"shapes": {"He": spots.copy()}}, "he"),
             ({"tables": {"mine_tiles": sdata.tables["table"].copy()}}, "mine_tiles"))
    for kwargs, held in cases:
        with pytest.raises(InputError, match=rf"element '{held}', which stranker did not write.*`out=`"):
            add_elements(sdata, **kwargs, by="test", arg="out")
    # stranker's shapes that a table of the user's annotates are not replaced under it
    obs = pd.DataFrame({"region": pd.Categorical(["mine_tiles"]), "spot_id": [spots.index[0]]}, index=["a"])
    sdata.tables["users"] = TableModel.parse(ad.AnnData(np.zeros((1, 1)), obs=obs), region="mine_tiles",
                                             region_key="region", instance_key="spot_id")
    tiles = sdata.shapes["mine_tiles"]
    with pytest.raises(InputError, match=r"annotated by table\(s\) \['users'\]"):
        add_elements(sdata, shapes={"mine_tiles": spots.copy()}, by="test")
    assert sdata.shapes["mine_tiles"] is tiles


def test_library_key_reaches_every_function_that_picks_a_library():
    # normalize, select_genes, smooth, embed_patches and gene_map took library_id but not the key
    import matplotlib

    matplotlib.use("Agg")
    table = _two_libraries()
    keys = dict(library_id="B", library_key="sample")
    sr.pp.normalize(table, **keys)
    lognorm = np.asarray(table.layers["lognorm"].todense() if hasattr(table.layers["lognorm"], "todense")
                         else table.layers["lognorm"])
    assert np.isfinite(lognorm[6:]).all() and lognorm[6:].any()  # library B's rows are written
    assert len(sr.pp.select_genes(table, flavor="heg", n_top=3, **keys)) == 3
    sr.pp.smooth(table, n_neighs=2, **keys)
    assert "smoothed" in table.layers
    sr.pp.embed_patches(table, backbone="test_resnet", size=9, image_size=16, pretrained=False, **keys)
    feats = next(v for k, v in table.obsm.items() if k != "spatial")
    assert np.isfinite(np.asarray(feats)[6:]).all()
    sr.pl.gene_map(table, genes=list(table.var_names[:1]), layer="lognorm", **keys)
