"""HEST-1k: read_hest on samples written in HEST's layout, the offline/download rule of sr.datasets.hest."""

import json
import shutil

import numpy as np
import pytest

import stranker as sr
from stranker._errors import InputError
from stranker.section import as_sections

FAST = dict(epochs=1, batch_size=32, patch_px=64, image_size=32, backbone="test_resnet", genes="heg",
            n_top_genes=20, tta=False, pretrained=False)


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
    sp = as_sections(s)[0]
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
    # (within 1.25x of the 3.125 µm/px its patches imply: further apart is refused, see test_scales.py)
    _set_meta(root, "SYN1", pixel_size_um_estimated=2.8, spot_diameter=None)
    sp = as_sections(sr.io.read_hest(root, "SYN1"))[0]
    assert sp.microns_per_pixel == pytest.approx(2.8)
    # no spot_diameter in the metadata: the scalefactor spot_diameter_fullres (32 px) is used as it is
    assert sp.diameter == pytest.approx(32.0)


def test_unknown_id_lists_the_ids_present(hest_root, tmp_path):
    with pytest.raises(InputError, match=r"'TENX95' is not in .*\['SYN0', 'SYN1', 'SYN2'\]"):
        sr.io.read_hest(hest_root, "TENX95")
    with pytest.raises(FileNotFoundError):
        sr.io.read_hest(hest_root / "nope")
    (tmp_path / "IDC").symlink_to(hest_root, target_is_directory=True)
    with pytest.raises(InputError, match=r"folder of HEST-Bench tasks \['IDC'\]"):
        sr.io.read_hest(tmp_path)


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
    wsi = as_sections(sr.io.read_hest(hest_fine, "SYN0", image="wsi"))[0]
    mos = as_sections(sr.io.read_hest(hest_fine, "SYN0", image="patches"))[0]
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
    sp = as_sections(s)[0]
    assert sp.diameter == pytest.approx(100 / 3.125)
    # Visium HD: HEST's 128 µm bins are squares too; their scalefactor is right and is used
    _set_meta(tmp_path, "SYN0", st_technology="Visium HD")
    s = sr.io.read_hest(tmp_path, "SYN0")
    assert s.shapes["spots"].geometry.iloc[0].geom_type == "Polygon"
    assert as_sections(s)[0].diameter == pytest.approx(32.0)


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
    with pytest.raises(InputError, match=r"MahmoodLab/hest.*hf auth login"):
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
    monkeypatch.setattr(sr.settings, "allow_download", True)  # the suite forbids it; the hub here is fake
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


# --------------------------------------------------------------------------------------------
# benchmarks/hest_bench.py
# --------------------------------------------------------------------------------------------
def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "hest_bench.py"
    spec = importlib.util.spec_from_file_location("bench_hest_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hest_bench_smoke_writes_every_column(tmp_path):
    hb = _bench()
    hb.main(["--smoke", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "hest_bench.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert res["backbone"] == "test_resnet" and "leaderboard" in res["protocol"]
    task = res["tasks"]["SYN"]
    assert task["n_folds"] == 2  # patients A (two samples) and B: one fold each
    assert [f["test"] for f in task["folds"]] == [["SYN0", "SYN1"], ["SYN2"]]
    assert set(task["columns"]) == {"leaderboard", "no_pca", "alpha_cv", "per_sample_r", "genes_train_only",
                                    "stranker_heads"}
    for c in task["columns"].values():
        assert -1 <= c["pearson_mean"] <= 1 and len(c["mean_per_split"]) == 2
    assert len(task["genes"]) == 50 and set(res["average"]) == set(task["columns"])


def test_bench_table_sets_the_published_figures_beside():
    hb = _bench()
    res = {"backbone": "resnet50", "tasks": {"IDC": {"columns": {"leaderboard": {"pearson_mean": 0.5}}}},
           "average": {"leaderboard": 0.5}}
    assert hb.table(res).splitlines()[2] == "| IDC | 0.5000 | 0.4741 |"
    res["backbone"] = "uni"
    assert hb.table(res).splitlines()[2] == "| IDC | 0.5000 |"


def test_read_a_hest_bench_task_folder(hest_root, tmp_path):
    """HEST-Bench: adata/ instead of st/, no WSI, no metadata: pixel size from the patches' corners, the
    image their mosaic, the spot size the scalefactor's."""
    task = tmp_path / "IDC"
    for d in ("st", "patches"):
        shutil.copytree(hest_root / d, task / ("adata" if d == "st" else d))
    s = sr.io.read_hest(task, "SYN1")
    assert s.tables["table"].uns["hest"]["image_source"] == "patches"
    assert s.tables["table"].uns["hest"]["pixel_size_um"] == pytest.approx(3.125, rel=0.04)
    sp = as_sections(s)[0]
    assert sp.microns_per_pixel == 0.5 and sp.diameter == pytest.approx(32 * 3.125 / 0.5, rel=0.04)
    # with its WSI but still no metadata, the TIFF's own resolution wins over the patches' estimate
    shutil.copytree(hest_root / "wsis", task / "wsis")
    s = sr.io.read_hest(task, "SYN1")
    assert s.tables["table"].uns["hest"]["pixel_size_um"] == pytest.approx(3.125)
    assert as_sections(s)[0].microns_per_pixel == pytest.approx(3.125)


def test_bench_folds_follow_split_files_or_patients(tmp_path):
    hb = _bench()
    metas = {"a": {"patient": "P1", "dataset_title": "D"}, "b": {"patient": "P1", "dataset_title": "D"},
             "c": {"patient": None, "dataset_title": "D"}, "d": {"patient": "P1", "dataset_title": "E"}}
    f = hb.folds(tmp_path, metas)
    assert sorted(te for _, te in f) == [["a", "b"], ["c"], ["d"]]
    assert all(set(tr) | set(te) == set(metas) and not set(tr) & set(te) for tr, te in f)
    (tmp_path / "splits").mkdir()
    for i, (tr, te) in enumerate([(["a", "b"], ["c"]), (["c"], ["a", "b"])]):
        for name, ids in (("train", tr), ("test", te)):
            rows = "\n".join(f"{s},patches/{s}.h5,adata/{s}.h5ad" for s in ids)
            csv = f"sample_id,patches_path,expr_path\n{rows}\n"
            (tmp_path / "splits" / f"{name}_{i}.csv").write_text(csv)
    assert hb.folds(tmp_path, metas) == [(["a", "b"], ["c"]), (["c"], ["a", "b"])]


def test_bench_scores_concatenated_and_per_sample():
    """HEST's r is over the concatenated test split (HEST#127): a per-sample offset that the model gets
    right raises it, while within each sample the prediction is noise."""
    hb = _bench()
    rng = np.random.default_rng(0)
    sample = np.repeat(["s1", "s2"], 200)
    offset = np.where(sample == "s1", 0.0, 5.0)[:, None]
    y = offset + rng.normal(size=(400, 3))
    pred = offset + rng.normal(size=(400, 3))
    assert hb.pearson_genes(pred, y).min() > 0.8
    assert np.abs(hb.per_sample_r(pred, y, sample)).max() < 0.2


def test_bench_probe_is_hest_ridge():
    """Standardise, PCA to 256, lsqr ridge without intercept, alpha = 100 / (256 * n_genes)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    hb = _bench()
    rng = np.random.default_rng(1)
    x, y, xt = rng.normal(size=(300, 400)), rng.normal(size=(300, 50)) + 2, rng.normal(size=(20, 400))
    sc = StandardScaler().fit(x)
    pca = PCA(256, random_state=1).fit(sc.transform(x))
    reg = Ridge(alpha=100 / (256 * 50), solver="lsqr", fit_intercept=False, max_iter=1000).fit(
        pca.transform(sc.transform(x)), y)
    expected = reg.predict(pca.transform(sc.transform(xt)))
    np.testing.assert_allclose(hb.probe(x, y, xt, seed=1), expected, atol=1e-6)
    # without PCA (HEST#144's alternative) the ridge sees all 400 features
    direct = Ridge(alpha=100 / (400 * 50), solver="lsqr", fit_intercept=False, max_iter=1000).fit(x, y)
    np.testing.assert_allclose(hb.probe(x, y, xt, pca=False), direct.predict(xt), atol=1e-6)


def test_bench_genes_follow_hest_recipe():
    import anndata as ad

    hb = _bench()
    rng = np.random.default_rng(2)
    tables = []
    for i in range(2):
        x = rng.poisson(rng.uniform(0.5, 20, size=8), size=(100, 8)).astype(np.float32)
        x[:, 0] = 0
        if i:
            x[:5, 0] = 50  # g0: in 5% of the spots of one table (below HEST's 10%), very variable
        t = ad.AnnData(x)
        t.var_names = ["g0", "BLANK_1", "NegControl", "g3", "g4", "g5", "g6", "g7"]
        tables.append(t)
    genes = hb.hest_genes(tables, k=3)
    assert len(genes) == 3 and not {"g0", "BLANK_1", "NegControl"} & set(genes)
