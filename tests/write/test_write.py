"""The writer (``stranker.write``): the only code that puts results into the user's objects."""

import logging

import anndata as ad
import numpy as np
import pytest

import stranker as sr
from stranker.section import Section
from stranker.write import write_results, write_table
from tests.conftest import make_sdata


def _table(n=6):
    a = ad.AnnData(np.ones((n, 3), np.float32))
    a.layers["old"] = np.full((n, 3), 7.0, np.float32)
    return a


def _rows(t, rows):
    return Section(name="lib", image=None, centers=np.zeros((len(rows), 2)), diameter=1.0, table=t,
                   rows=np.asarray(rows))


def test_results_of_some_rows_leave_the_other_rows_as_they_were():
    t = _table()
    sp = _rows(t, [1, 3])
    write_results(sp, layers={"old": np.zeros((2, 3), np.float32)}, obsm={"X_e": np.ones((2, 2))},
                  obs={"score": np.array([0.5, 0.25])})
    np.testing.assert_array_equal(t.layers["old"][[1, 3]], 0)
    np.testing.assert_array_equal(t.layers["old"][[0, 2, 4, 5]], 7)  # a former result keeps its rows
    assert np.isnan(t.obsm["X_e"][[0, 2, 4, 5]]).all() and (t.obsm["X_e"][[1, 3]] == 1).all()
    np.testing.assert_array_equal(t.obs["score"].to_numpy()[[1, 3]], [0.5, 0.25])


def test_one_log_line_names_every_key(caplog):
    t = _table()
    with caplog.at_level(logging.INFO, logger="stranker"):
        write_table(t, "the table of 'lib'", layers={"x": t.X.copy()}, uns={"x": {"a": 1}})
    lines = [r.getMessage() for r in caplog.records if "Added" in r.getMessage()]
    assert lines == ["Added layers['x'], uns['x'] to the table of 'lib'."]


@pytest.fixture(scope="module")
def tiny_model():
    return sr.tl.fit(make_sdata(n=16, seed=0)[0], epochs=1, batch_size=8, patch_px=32, image_size=32,
                     backbone="test_resnet", seed=0, pretrained=False, genes=["G0", "G1", "G2", "G3", "G4"])


def test_predict_writes_each_sections_record_once_and_whole(tiny_model, monkeypatch):
    """The run record is written with the layer, not rewritten afterwards by another module."""
    import stranker.write.predictions as writer

    secs = [make_sdata(n=16, seed=s)[0] for s in (1, 2)]
    calls = []
    real = writer.write_results

    def spy(sp, **kw):
        calls.append((sp.name, sorted(kw)))
        return real(sp, **kw)

    monkeypatch.setattr(writer, "write_results", spy)
    sr.tl.predict(tiny_model, secs, adapt=True)
    assert len(calls) == 2 and all({"layers", "obsm", "uns"} <= set(c[1]) for c in calls)  # one per section
    for sd in secs:
        rec = sd.tables["table"].uns["stranker"]
        assert rec["adapt"] is True and "resampling" in rec and rec["in_sample"] is False
        assert "chosen" not in rec["params"]  # how the configuration came about is not a parameter
