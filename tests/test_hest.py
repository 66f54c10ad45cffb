"""HEST-1k: read_hest on samples written in HEST's layout, the offline/download rule of sr.datasets.hest."""

import json
import shutil

import numpy as np
import pytest

import stranker as sr
from stranker._spots import InputError, as_spots

FAST = dict(epochs=1, batch_size=32, patch_px=64, image_size=32, backbone="test_resnet", genes="heg",
            n_top_genes=20, tta=False)


@pytest.fixture(scope="module")
def hest_root(tmp_path_factory):
    """Three synthetic samples (two patients) in HEST-1k's layout, at their own 3.125 µm/px."""
    root = tmp_path_factory.mktemp("hest")
    sr.datasets.synthetic_hest(root, n_samples=3, n_spots=60, patients=["A", "A", "B"])
    return root


@pytest.fixture(scope="module")
def hest_fine(tmp_path_factory):
    """One sample declared at 0.5 µm/px: HEST's 224 px patches are then plain crops of the WSI."""
    root = tmp_path_factory.mktemp("hest_fine")
    sr.datasets.synthetic_hest(root, n_samples=1, n_spots=100, mpp=0.5)
    return root


def _set_meta(root, sid, **kw):
    p = root / "metadata" / f"{sid}.json"
    meta = json.loads(p.read_text())
    meta.update(kw)
    p.write_text(json.dumps(meta))


def test_read_hest_is_a_section_stranker_takes(hest_root):
    s = sr.io.read_hest(hest_root, "SYN0")
    t = s.tables["table"]
    meta = t.uns["hest"]
    assert {meta[k] for k in ("organ", "st_technology", "patient", "oncotree_code")} == {
        "Synthetic", "Visium", "A", "SYN"}
    sp = as_spots(s)[0]
    assert sp.name == "SYN0" and sp.n_spots == t.n_obs == 60
    assert sp.microns_per_pixel == pytest.approx(3.125)
    assert sp.diameter == pytest.approx(100 / 3.125)  # metadata spot_diameter (µm) at its pixel size
    np.testing.assert_allclose(sp.centers, t.obsm["spatial"])
    # the WSI is read lazily, level by level, as read_slide reads it
    assert hasattr(sp.image.levels[0], "dask") and len(sp.image.levels) == 3
    assert "tissue" in s.shapes and len(s.shapes["tissue"]) == 1
    assert (t.obs["hest_patch"].to_numpy() == np.arange(60)).all()


def test_pixel_size_comes_from_the_metadata(hest_root, tmp_path):
    root = tmp_path / "h"
    shutil.copytree(hest_root, root)
    # the TIFF's tags say 3.125 µm/px; HEST's estimate in the metadata wins
    _set_meta(root, "SYN1", pixel_size_um_estimated=2.0, spot_diameter=None)
    sp = as_spots(sr.io.read_hest(root, "SYN1"))[0]
    assert sp.microns_per_pixel == pytest.approx(2.0)
    # no spot_diameter in the metadata: the scalefactor spot_diameter_fullres (32 px) is used as it is
    assert sp.diameter == pytest.approx(32.0)


def test_unknown_id_lists_the_ids_present(hest_root):
    with pytest.raises(InputError, match=r"'TENX95' is not in .*\['SYN0', 'SYN1', 'SYN2'\]"):
        sr.io.read_hest(hest_root, "TENX95")
    with pytest.raises(FileNotFoundError):
        sr.io.read_hest(hest_root / "nope")


def test_whole_folder_and_metadata_filter(hest_root):
    all_ = sr.io.read_hest(hest_root)
    assert list(all_) == ["SYN0", "SYN1", "SYN2"]
    a = sr.io.read_hest(hest_root, patient="a")  # case-insensitive
    assert list(a) == ["SYN0", "SYN1"]
    assert list(sr.io.read_hest(hest_root, organ="Synthetic", patient=["B"])) == ["SYN2"]
    assert len(sr.io.read_hest(hest_root, ["SYN2", "SYN0"])) == 2
    with pytest.raises(InputError, match="keys present"):
        sr.io.read_hest(hest_root, organ_name="Bowel")
    with pytest.raises(InputError, match="No sample"):
        sr.io.read_hest(hest_root, organ="Bowel")


def test_patch_corners_are_read_as_corners(hest_fine):
    """patches/*.h5 'coords' are top-left corners (HEST#52): corner + 112 px is the spot centre at 0.5 µm/px,
    and the patch is the WSI's pixels from that corner."""
    import tifffile

    s = sr.io.read_hest(hest_fine, "SYN0")
    t = s.tables["table"]
    img, corners, barcodes = sr.io.read_hest_patches(hest_fine / "patches" / "SYN0.h5", rows=[3, 0, 3])
    assert list(barcodes) == [t.obs_names[3], t.obs_names[0], t.obs_names[3]]
    np.testing.assert_array_equal(img[0], img[2])
    xy = t.obsm["spatial"][[3, 0]]
    assert np.abs(corners[:2] + 112 - xy).max() <= 1
    np.testing.assert_allclose(t.obsm["hest_patch_corner"][[3, 0]], corners[:2])
    img, corners, _ = sr.io.read_hest_patches(hest_fine / "patches" / "SYN0.h5")
    wsi = tifffile.imread(hest_fine / "wsis" / "SYN0.tif", level=0)
    h, w = wsi.shape[:2]
    inside = np.flatnonzero((corners[:, 0] >= 0) & (corners[:, 1] >= 0) & (corners[:, 0] + 224 <= w)
                            & (corners[:, 1] + 224 <= h))
    assert len(inside)
    for i in inside:
        x0, y0 = corners[i]
        np.testing.assert_array_equal(img[i], wsi[y0 : y0 + 224, x0 : x0 + 224])


def test_patches_land_where_the_source_has_them(hest_fine):
    """Without the WSI the image is a mosaic of the patches; around every spot it shows the WSI's pixels."""
    wsi = as_spots(sr.io.read_hest(hest_fine, "SYN0", image="wsi"))[0]
    mos = as_spots(sr.io.read_hest(hest_fine, "SYN0", image="patches"))[0]
    assert mos.microns_per_pixel == pytest.approx(0.5) and mos.diameter == pytest.approx(wsi.diameter)
    h, w = wsi.image.shape
    r = 100
    n = 0
    for (cx, cy), (mx, my) in zip(wsi.centers, mos.centers, strict=True):
        x0, y0 = int(round(cx)) - r, int(round(cy)) - r
        if x0 < 0 or y0 < 0 or x0 + 2 * r > w or y0 + 2 * r > h:
            continue
        a = wsi.image.read(0, y0, y0 + 2 * r, x0, x0 + 2 * r)
        b = mos.image.read(0, int(round(my)) - r, int(round(my)) + r, int(round(mx)) - r, int(round(mx)) + r)
        np.testing.assert_array_equal(a, b)
        n += 1
    assert n >= 3


def test_fit_and_predict_across_samples(hest_root):
    secs = sr.io.read_hest(hest_root, ["SYN0", "SYN1", "SYN2"])
    model = sr.tl.fit(secs[:2], seed=0, **FAST)
    sr.tl.predict(model, secs[2])
    t = secs[2].tables["table"]
    assert np.isfinite(t.layers["stranker"][:, t.var_names.get_indexer(model.genes)]).all()
    # and from the patches alone (a HEST-Bench folder has no WSIs): the same spots, another image
    mos = sr.io.read_hest(hest_root, "SYN2", image="patches")
    sr.tl.predict(model, mos)
    assert np.isfinite(mos.tables["table"].obsm["X_stranker"]).all()


def test_xenium_pseudo_spots_are_squares(tmp_path):
    sr.datasets.synthetic_hest(tmp_path, n_samples=1, n_spots=20, technology="Xenium", patches=False)
    # HEST's Xenium scalefactor says 55 µm spots; its pseudo-spots are 100 µm squares (metadata spot_diameter)
    _set_meta(tmp_path, "SYN0", spot_diameter=None)
    s = sr.io.read_hest(tmp_path, "SYN0")
    assert s.shapes["spots"].geometry.iloc[0].geom_type == "Polygon"
    sp = as_spots(s)[0]
    assert sp.diameter == pytest.approx(100 / 3.125)


def test_bad_patch_file_is_named(hest_root, tmp_path):
    import h5py

    root = tmp_path / "h"
    shutil.copytree(hest_root, root)
    with h5py.File(root / "patches" / "SYN0.h5", "a") as f:
        del f["coords"]
    with pytest.raises(InputError, match=r"SYN0.h5 lacks \['coords'\]"):
        sr.io.read_hest(root, "SYN0")


def test_datasets_hest_reads_a_folder_filled_in_advance(hest_root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = sr.datasets.hest("SYN1", root=hest_root)
    assert s.tables["table"].uns["section"] == "SYN1"
    with pytest.raises(InputError, match=r"MahmoodLab/hest.*huggingface-cli login"):
        sr.datasets.hest(["SYN1", "TENX95"], root=hest_root)


def test_datasets_hest_downloads_only_what_it_reads(hest_root, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(**kw):  # the hub, from a local folder: no network in tests
        calls.append(kw)
        import fnmatch

        for p in hest_root.rglob("*"):
            rel = p.relative_to(hest_root).as_posix()
            if p.is_file() and any(fnmatch.fnmatch(rel, pat) for pat in kw["allow_patterns"]):
                (kw["local_dir"] / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(p, kw["local_dir"] / rel)
        return str(kw["local_dir"])

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    sr.settings.data_dir = tmp_path
    try:
        [s] = sr.datasets.hest(["SYN2"], token="hf_x", patches=False)
    finally:
        sr.settings.data_dir = None
    assert s.tables["table"].uns["hest"]["patient"] == "B"
    (kw,) = calls
    assert kw["repo_id"] == "MahmoodLab/hest" and kw["repo_type"] == "dataset" and kw["token"] == "hf_x"
    pats = kw["allow_patterns"]
    assert all("SYN2" in p for p in pats) and not any("patches" in p for p in pats)
    assert not (tmp_path / "hest" / "patches").exists() and (tmp_path / "hest" / "wsis" / "SYN2.tif").exists()

    def refused(**kw):
        raise OSError("401 Client Error: gated repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refused)
    with pytest.raises(InputError, match="(?i)gated repository .*accept"):
        sr.datasets.hest("SYN0", root=tmp_path / "empty")
