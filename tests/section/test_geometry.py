"""Patch geometry: one record, computed by fit, read by predict; in-sample outputs from patches in memory."""

import json

import numpy as np
import pytest

import stranker as sr
from stranker.section import as_sections
from stranker.section.patches import PatchGeometry, PatchReader
from stranker.tl._model import Model

MPP = 3.125  # synthetic spots are 32 px = 100 µm wide
FIT = dict(seed=0, epochs=1, batch_size=32, patch_px=64, image_size=32, backbone="test_resnet",
           pretrained=False, n_top_genes=20, genes="heg", patch_um=150.0)


@pytest.fixture(scope="module")
def um_fit(synthetic_small):
    """A fit at 150 µm on two sections at 3.125 and 3.4375 µm/px, counting the patches it reads."""
    from spatialdata import deepcopy

    secs = [deepcopy(s) for s in synthetic_small[:2]]
    for i, s in enumerate(secs):
        s.tables["table"].uns["microns_per_pixel"] = MPP * (1 + 0.1 * i)
    reads: list[int] = []
    real = PatchReader._read_scale
    PatchReader._read_scale = lambda self, c, side0: reads.append(len(c)) or real(self, c, side0)
    try:
        model = sr.tl.fit(secs, stream=False, **FIT)
    finally:
        PatchReader._read_scale = real
    return model, secs, reads




def test_fit_records_one_geometry_that_predict_reads_with(um_fit, tmp_path):
    model, secs, _ = um_fit
    want = PatchGeometry(size_px=150.0 / MPP, size_um=150.0, mpp=MPP, image_size=32)
    assert model.geometry == want
    assert {k: model.meta[k] for k in ("patch_px", "patch_um", "microns_per_pixel")} == want.to_meta()
    for sp in as_sections(secs):  # the same tissue width on each section, at its own resolution
        assert model.patch_reader(sp).size == pytest.approx(150.0 / sp.microns_per_pixel)
    model.save(tmp_path / "m")
    assert Model.load(tmp_path / "m").geometry == want
    # a model.json written before the record had microns_per_pixel reads the same widths
    info = json.loads((tmp_path / "m" / "model.json").read_text())
    del info["meta"]["microns_per_pixel"]
    (tmp_path / "m" / "model.json").write_text(json.dumps(info))
    import torch  # an older stranker saved no checksum of model.json either

    blob = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    del blob["meta_sha256"]
    torch.save(blob, tmp_path / "m" / "model.pt")
    old = Model.load(tmp_path / "m")
    assert old.geometry.mpp is None and old.geometry.size_um == 150.0
    sps = as_sections(secs)
    assert [old.patch_reader(sp).size for sp in sps] == [model.patch_reader(sp).size for sp in sps]


def test_section_of_unknown_resolution_is_read_at_the_training_width_with_a_warning(um_fit, stranker_log):
    from spatialdata import deepcopy

    model, secs, _ = um_fit
    bare = deepcopy(secs[0])
    del bare.tables["table"].uns["microns_per_pixel"]
    sp = as_sections(bare)[0]
    assert sp.microns_per_pixel is None
    # 150 µm at the first training section's 3.125 µm/px (was: the configured patch_px, 64 px)
    assert model.patch_reader(sp).size == pytest.approx(150.0 / MPP)
    assert "no known resolution" in stranker_log.text and "uns['microns_per_pixel']" in stranker_log.text


def test_in_sample_outputs_come_from_the_patches_in_memory(um_fit):
    from spatialdata import deepcopy

    model, secs, reads = um_fit
    # each section's patches were read once per scale (for training), not again for the outputs
    assert reads == [sp.n_spots for sp in as_sections(secs) for _ in model.config.scales]
    again = deepcopy(secs[1])
    sr.tl.predict(model, again, key_added="again")
    t, t2 = secs[1].tables["table"], again.tables["table"]
    np.testing.assert_array_equal(t.layers["stranker"], t2.layers["again"])
    np.testing.assert_array_equal(t.obsm["X_stranker"], t2.obsm["X_again"])
