"""sr.tl.predict_slides: slide files and zarr stores to one output per slide, whole, resumable, shared out.

The slides are written here: pyramidal TIFFs with JPEG tiles (µm/px in their resolution tags, or none)
and SpatialData stores (an image-only slide, a section with spots). One tiny model (two synthetic
sections, so it has a reliability record) and one reference run are shared with tests/test_cli_cohort.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import stranker as sr
from stranker._errors import InputError
from stranker.tl._cohort import SlideFailures, assign_slides, existing_output, model_sha256, slide_inputs

MPP = 6.25  # µm/px of the synthetic slides painted at patch_px=32 (a 16 px spot is 100 µm)
FIT = dict(genes="heg", n_top_genes=20, epochs=1, sharp_epochs=0, batch_size=8, image_size=32,
           backbone="test_resnet", pretrained=False, seed=0)
NAMES = ["a", "b", "c"]


@functools.cache
def cohort_model():
    """A tiny model fitted on two synthetic sections at 6.25 µm/px (so it has a reliability record)."""
    secs = sr.datasets.synthetic(n_sections=2, n_spots=24, n_genes=20, patch_px=32, seed=1)
    return sr.tl.fit(secs, **FIT)


def write_tiff(path: Path, img: np.ndarray, mpp: float | None = MPP) -> Path:
    """A pyramidal TIFF of ``img`` (y, x, 3): JPEG tiles, a half-size level in a SubIFD, µm/px in its tags."""
    import tifffile

    res = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(64, 64), compression="jpeg", photometric="rgb", subifds=1, **res)
        tw.write(img[::2, ::2], tile=(64, 64), compression="jpeg", photometric="rgb", subfiletype=1)
    return path


def slide_image(i: int) -> np.ndarray:
    slides, _ = sr.datasets.synthetic_cohort(4, size_px=128, patch_px=32, seed=0)
    return np.moveaxis(np.asarray(slides[i].images["he"].values), 0, -1)


def write_inputs(folder: Path) -> list[Path]:
    """a.tif (a slide file), b.zarr (an image-only slide as a store), c.zarr (a section with spots)."""
    folder.mkdir(parents=True, exist_ok=True)
    slides, _ = sr.datasets.synthetic_cohort(4, size_px=128, patch_px=32, seed=0)
    a = write_tiff(folder / "a.tif", np.moveaxis(np.asarray(slides[0].images["he"].values), 0, -1))
    slides[1].write(folder / "b.zarr")
    section = sr.datasets.synthetic(n_sections=1, n_spots=16, n_genes=20, patch_px=32, seed=7)[0]
    section.write(folder / "c.zarr")
    return [a, folder / "b.zarr", folder / "c.zarr"]


_RUNS: dict[str, tuple] = {}


def reference(tmp_path_factory) -> tuple[list[Path], Path, Path, object]:
    """(inputs, saved model folder, output folder, summary) of one run on a, b, c (made once per session)."""
    if "ref" not in _RUNS:
        root = tmp_path_factory.mktemp("cohort")
        inputs = write_inputs(root / "in")
        cohort_model().save(root / "model")
        summary = sr.tl.predict_slides(cohort_model(), inputs, out=root / "out")
        _RUNS["ref"] = (inputs, root / "model", root / "out", summary)
    return _RUNS["ref"]


def files(folder: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under ``folder``."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def table_of(path: Path):
    """The predicted table of an output (.zarr: its one table; .h5ad: the file)."""
    if path.suffix == ".h5ad":
        import anndata as ad

        return ad.read_h5ad(path)
    import spatialdata as sd

    tables = sd.read_zarr(path).tables
    assert len(tables) == 1
    return next(iter(tables.values()))


def record_of(path: Path) -> dict:
    if path.suffix == ".h5ad":
        return dict(table_of(path).uns["stranker_slide"])
    return json.loads((path / "zarr.json").read_text())["attributes"]["stranker_slide"]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return reference(tmp_path_factory)


@pytest.fixture(scope="module")
def model():
    return cohort_model()


# --------------------------------------------------------------------------------------------
# what a cohort run writes
# --------------------------------------------------------------------------------------------
def test_slide_files_and_stores_mixed_give_one_whole_output_each(ref, model):
    import spatialdata as sd

    inputs, _, out, summary = ref
    assert list(summary.index) == NAMES and (summary["status"] == "written").all()
    assert sorted(p.name for p in out.iterdir()) == ["a.zarr", "b.zarr", "c.zarr"]  # nothing else, no temp
    sha = model_sha256(model)
    for name, src in zip(NAMES, inputs, strict=True):
        rec = record_of(out / f"{name}.zarr")
        assert rec["model_sha256"] == sha and rec["source"] == str(src) and rec["slide"] == name
        assert rec["path"] == str(out / f"{name}.zarr") and rec["n_obs"] == summary.loc[name, "n_obs"]
        assert existing_output(out / f"{name}.zarr")[0] == "ours"
    # a slide file: its tiles and their table, as sr.tl.predict writes them on the slide read lazily
    a = sd.read_zarr(out / "a.zarr")
    assert not a.images and set(a.shapes) == {"stranker_tiles"} and set(a.tables) == {"stranker_table"}
    slide = sr.io.read_slide(inputs[0])
    sr.tl.predict(model, slide)
    want, got = slide.tables["stranker_table"], a.tables["stranker_table"]
    np.testing.assert_array_equal(got.obsm["spatial"], want.obsm["spatial"])
    np.testing.assert_allclose(got.layers["stranker"], want.layers["stranker"], rtol=1e-6)
    # with the reliability the model has: per-gene estimates, per-tile intervals
    assert {"stranker_lower", "stranker_upper"} <= set(got.layers)
    assert "stranker_cv_pcc" in got.var and "shift" in got.uns["stranker"]
    assert (got.layers["stranker_lower"] <= got.layers["stranker_upper"]).all()
    # an image-only store is tiled too; a section with spots keeps its spots and counts
    assert set(sd.read_zarr(out / "b.zarr").tables) == {"stranker_table"}
    c = sd.read_zarr(out / "c.zarr")
    assert set(c.shapes) == {"spots"} and set(c.tables) == {"table"}
    assert c.tables["table"].n_obs == 16 and "stranker" in c.tables["table"].layers
    assert c.tables["table"].X.sum() > 0  # the measured counts came along


def test_h5ad_outputs_another_models_output_redone_and_a_foreign_file_kept(ref, model, tmp_path):
    inputs, _, out, _ = ref
    dest = tmp_path / "h5"
    dest.mkdir()
    (dest / "c.h5ad").write_text("my own file, not an h5ad")
    with pytest.raises(SlideFailures) as info:
        sr.tl.predict_slides(model, [inputs[0], inputs[2]], out=dest, format="h5ad")
    msg = str(info.value)
    assert f"{inputs[2]}: FileExistsError" in msg and "cannot be read as an .h5ad" in msg
    assert (dest / "c.h5ad").read_text() == "my own file, not an h5ad"
    assert list(info.value.summary["status"]) == ["written", "failed"]
    a = table_of(dest / "a.h5ad")
    ref_a = table_of(out / "a.zarr")
    np.testing.assert_array_equal(a.layers["stranker"], ref_a.layers["stranker"])
    assert a.uns["stranker_slide"]["model_sha256"] == model_sha256(model)
    # another model (one weight changed): its output is predicted again, replacing this one
    import torch

    other = sr.Model.load(ref[1])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in other.aligner.parameters():
            w.add_(0.1 * torch.randn(w.shape, generator=gen))
    assert model_sha256(other) != model_sha256(model)
    summary = sr.tl.predict_slides(other, [inputs[0]], out=dest, format="h5ad")
    assert summary.loc["a", "status"] == "written" and "another model" in summary.loc["a", "reason"]
    b = table_of(dest / "a.h5ad")
    assert b.uns["stranker_slide"]["model_sha256"] == model_sha256(other)
    assert not np.allclose(b.layers["stranker"], a.layers["stranker"])
    assert sorted(p.name for p in dest.iterdir()) == ["a.h5ad", "c.h5ad"]


def test_a_rerun_skips_whole_outputs_and_leaves_them_as_they_were(ref):
    inputs, saved, out, _ = ref
    before = files(out)
    summary = sr.tl.predict_slides(str(saved), [inputs[0].parent], out=out)  # loaded: the same checksum
    assert list(summary["status"]) == ["skipped"] * 3
    assert files(out) == before  # not a byte, not an mtime changed


def test_partial_outputs_are_predicted_again(ref, model, tmp_path):
    inputs, _, out, _ = ref
    dest = tmp_path / "out"
    shutil.copytree(out, dest)
    for p in dest.iterdir():  # their records name the path they were written to: now this one
        meta = p / "zarr.json"
        meta.write_text(meta.read_text().replace(str(out), str(dest)))
    # a: a run killed while writing it left its temporary folder (lock released) and no a.zarr
    shutil.rmtree(dest / "a.zarr")
    tmp = dest / ".a.zarr.writing-0123456789ab"
    shutil.copytree(out / "b.zarr", tmp / "store")
    (tmp / ".stranker-lock").write_text("")
    # b: stranker's store with an element gone
    shutil.rmtree(dest / "b.zarr" / "tables")
    c_before = files(dest / "c.zarr")
    summary = sr.tl.predict_slides(model, inputs, out=dest)
    assert list(summary["status"]) == ["written", "written", "skipped"]
    assert "partial" in summary.loc["b", "reason"]
    assert temporaries(dest) == []
    assert sorted(p.name for p in dest.iterdir()) == ["a.zarr", "b.zarr", "c.zarr"]
    for name in ("a", "b"):
        assert existing_output(dest / f"{name}.zarr")[0] == "ours"
        np.testing.assert_array_equal(table_of(dest / f"{name}.zarr").layers["stranker"],
                                      table_of(out / f"{name}.zarr").layers["stranker"])
    assert files(dest / "c.zarr") == c_before


def test_a_foreign_output_and_a_corrupt_slide_fail_alone(ref, model, tmp_path, stranker_log):
    inputs, _, out, _ = ref
    bad = tmp_path / "bad.tif"
    whole = inputs[0].read_bytes()
    bad.write_bytes(whole[: len(whole) // 2])  # a copy cut short
    dest = tmp_path / "out"
    (dest / "a.zarr").mkdir(parents=True)
    (dest / "a.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    (dest / "a.zarr" / "notes.txt").write_text("mine")
    before = files(dest / "a.zarr")
    with pytest.raises(SlideFailures) as info:
        sr.tl.predict_slides(model, [inputs[0], bad, inputs[1]], out=dest)
    err = info.value
    assert list(err.summary["status"]) == ["failed", "failed", "written"]
    assert list(err.failed.index) == ["a", "bad"]
    lines = str(err).splitlines()
    assert lines[0].startswith("2 of 3 slide(s) failed")
    assert any(ln.strip().startswith(f"{inputs[0]}:") and "stranker did not write it" in ln for ln in lines)
    assert any(line.strip().startswith(f"{bad}:") for line in lines)
    assert files(dest / "a.zarr") == before  # never touched
    assert existing_output(dest / "b.zarr")[0] == "ours"
    assert not (dest / "bad.zarr").exists() and temporaries(dest) == []
    reported = [r.getMessage() for r in stranker_log.records if r.levelname == "ERROR"]
    assert any(m.startswith(f"{bad}: ") and "\n" not in m for m in reported)


def test_a_file_without_resolution_is_refused_unless_mpp_is_given(model, tmp_path):
    n = write_tiff(tmp_path / "n.tif", slide_image(2), mpp=None)
    dest = tmp_path / "out"
    with pytest.raises(SlideFailures) as info:
        sr.tl.predict_slides(model, [n], out=dest)
    assert "does not record its resolution" in str(info.value)
    assert "--mpp" in str(info.value) and "mpp=" in str(info.value)
    assert not (dest / "n.zarr").exists()
    with pytest.raises(InputError, match="not among the inputs"):
        sr.tl.predict_slides(model, [n], out=dest, mpp={"m": MPP})
    with pytest.raises(InputError, match="µm per pixel"):
        sr.tl.predict_slides(model, [n], out=dest, mpp=300.0)
    summary = sr.tl.predict_slides(model, [n], out=dest, mpp={"n": MPP})
    assert summary.loc["n", "status"] == "written" and record_of(dest / "n.zarr")["mpp"] == MPP
    again = sr.tl.predict_slides(model, [n], out=dest, mpp=MPP)  # the same setting, said another way
    assert again.loc["n", "status"] == "skipped"


# --------------------------------------------------------------------------------------------
# inputs, names, shares, checksums
# --------------------------------------------------------------------------------------------
def test_inputs_from_folders_and_lists_and_names_that_clash(ref, model, tmp_path):
    inputs, _, out, _ = ref
    folder = inputs[0].parent
    assert [(s.name, s.kind) for s in slide_inputs(folder)] == [("a", "slide"), ("b", "zarr"), ("c", "zarr")]
    with pytest.raises(InputError, match="holds no slide files"):  # outputs of a run are no slides
        slide_inputs(out)
    other = tmp_path / "more"
    other.mkdir()
    (other / "x.ome.tif").write_bytes(b"")
    (other / "notes.md").write_text("not a slide")
    (other / ".hidden.tif").write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my cohort\n{inputs[0]}\n\nmore\n{folder / 'c.zarr'}\n")
    assert [s.name for s in slide_inputs(listing)] == ["a", "x", "c"]
    with pytest.raises(FileNotFoundError, match="nowhere.tif"):
        slide_inputs([tmp_path / "nowhere.tif"])
    # two slides named a: refused before any work, both listed
    twin = tmp_path / "twin"
    twin.mkdir()
    shutil.copytree(folder / "b.zarr", twin / "a.zarr")
    with pytest.raises(InputError, match="distinct names") as info:
        sr.tl.predict_slides(model, [inputs[0], twin / "a.zarr"], out=tmp_path / "never")
    assert str(inputs[0]) in str(info.value) and str(twin / "a.zarr") in str(info.value)
    with pytest.raises(InputError, match="more than once"):
        slide_inputs([inputs[0], inputs[0]])
    # an output that would replace its input
    with pytest.raises(InputError, match="written over or inside"):
        sr.tl.predict_slides(model, [twin / "a.zarr"], out=twin)
    assert not (tmp_path / "never").exists()


def test_slides_are_shared_largest_first_to_the_least_loaded_process():
    sizes = [10, 1, 9, 2, 8, 3]
    owner = assign_slides(sizes, 2)
    assert owner == [0, 0, 1, 0, 1, 0]  # 10 | 9, 8 | then 3, 2, 1 to the lighter: loads 16 and 17
    loads = [sum(s for s, o in zip(sizes, owner, strict=True) if o == r) for r in range(2)]
    assert max(loads) - min(loads) <= 1
    assert assign_slides(sizes, 2) == owner  # the same in every process
    assert assign_slides(sizes, 1) == [0] * 6
    assert sorted(assign_slides([5, 5, 5], 4)) == [0, 1, 2]  # one each, the fourth idle
    assert assign_slides([0, 0, 0, 0], 2) == [0, 1, 0, 1]  # unknown sizes still spread


def test_model_checksum_survives_saving_and_changes_with_any_weight(ref, model):
    import torch

    loaded = sr.Model.load(ref[1])
    assert model_sha256(loaded) == model_sha256(model)
    with torch.no_grad():
        list(loaded.aligner.parameters())[-1].view(-1)[0] += 1e-6
    assert model_sha256(loaded) != model_sha256(model)


def test_embed_slides_reads_paths_lazily_as_predict_slides_reads_them(ref, model):
    inputs, _, out, _ = ref
    cohort = sr.tl.embed_slides(model, [inputs[0], inputs[1]], keep_tiles=True)
    assert list(cohort.obs_names) == ["a", "b"]  # slide ids: the file stems
    for name in ("a", "b"):  # the tiles and embeddings predict_slides wrote for the same slides
        tiles = table_of(out / f"{name}.zarr")
        centres = cohort.uns["stranker_tiles"]["centers"][name]
        np.testing.assert_allclose(centres, tiles.obsm["spatial"], atol=1e-3)
        np.testing.assert_allclose(cohort[name].X[0], tiles.obsm["X_stranker"].mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="µm per pixel"):
        sr.tl.embed_slides(model, [inputs[0]], mpp=0.0)


def test_an_aperio_svs_read_by_openslide(model, tmp_path):
    # an SVS as Aperio's scanners write it (tiled JPEG pages, µm/px in the description): read by
    # OpenSlide (the `wsi` extra), predicted as the same slide read directly
    pytest.importorskip("openslide")
    import spatialdata as sd
    import tifffile

    img = slide_image(0)
    h, w = img.shape[:2]
    path = tmp_path / "in" / "d.svs"
    path.parent.mkdir()
    desc = (f"Aperio Image Library v12.0.0\n{w}x{h} [0,0 {w}x{h}] (64x64) JPEG/RGB Q=90"
            f"|AppMag = 20|MPP = {MPP}")
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(64, 64), compression="jpeg", photometric="rgb", description=desc, metadata=None)
        tw.write(np.ascontiguousarray(img[::2, ::2]), tile=(64, 64), compression="jpeg", photometric="rgb",
                 description=f"Aperio Image Library v12.0.0\n{w // 2}x{h // 2}", metadata=None)
    summary = sr.tl.predict_slides(model, [path], out=tmp_path / "out")
    assert summary.loc["d", "status"] == "written"
    got = sd.read_zarr(tmp_path / "out" / "d.zarr").tables["stranker_table"]
    slide = sr.io.read_slide(path, backend="openslide")
    sr.tl.predict(model, slide)
    np.testing.assert_allclose(got.layers["stranker"], slide.tables["stranker_table"].layers["stranker"],
                               rtol=1e-6)
    assert got.n_obs > 0
