"""Memory of whole-slide prediction does not grow with the slide: what the reader keeps is bounded.

- the lazy level's cache of decoded windows is bounded in bytes, and a strided read (tissue
  detection) is not kept in it;
- reader threads asking for the same window at once decode it once;
- a batch of patches is cut and resized a few patches at a time, with the same pixels;
- freed memory goes back to the system after every batch (``stranker.spots.release_memory``).
"""

import threading
import time

import numpy as np
import pytest

import stranker as sr
from stranker.io import _slide
from stranker.section import as_sections
from stranker.section import patches as patches_mod

from .test_io import tissue_image, write_tiff


def _level(side=4096, delay=0.0):
    """A lazy level over an in-memory image, counting the windows it decodes."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    calls = []

    def read(y0, y1, x0, x1):
        calls.append((y0, y1, x0, x1))
        time.sleep(delay)
        return img[y0:y1, x0:x1]

    return _slide._Level((3, side, side), read, "fake[0]"), img, calls


def test_the_window_cache_is_bounded_in_bytes():
    # windows of 2048 x 2048 RGB (12 MB): the old cache kept the last 8 whatever their size (96 MB)
    lv, img, calls = _level()
    for y in range(0, 4096, 2048):
        for x in range(0, 4096, 2048):
            for dy in range(0, 64, 16):
                np.testing.assert_array_equal(lv[:, y + dy : y + dy + 2048, x : x + 2048].transpose(1, 2, 0),
                                              img[y + dy : y + dy + 2048, x : x + 2048])
    assert 0 < lv.cached_bytes <= _slide._CACHE_BYTES
    assert len(calls) == 16
    # a window read again while still cached is not decoded again
    lv[:, 48 + 2048 : 48 + 4096, 2048:4096]
    assert len(calls) == 16


def test_strided_reads_are_not_kept(tmp_path):
    # tissue detection reads a level with a step: the full windows it decodes were cached and held
    # (8 chunks of 3 MB per level, for as long as the SpatialData lived)
    write_tiff(tmp_path / "s.tif", tissue_image(1536, 2048), mpp=0.5, levels=2)
    sdata = sr.io.read_slide(tmp_path / "s.tif")
    lv = sdata.images["he"]["scale0"]["image"].data
    lv[:, ::3, ::3].compute()
    levels = [d for d in lv.dask.values() if isinstance(d, _slide._Level)]
    assert levels and all(level.cached_bytes == 0 for level in levels)
    lv[:, :100, :100].compute()  # a plain read is kept
    assert levels[0].cached_bytes > 0


def test_threads_asking_for_one_window_decode_it_once():
    lv, img, calls = _level(2048, delay=0.2)
    out = [None] * 4

    def ask(i):
        out[i] = lv[:, 0:1024, 0:1024]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    for o in out:
        np.testing.assert_array_equal(o.transpose(1, 2, 0), img[:1024, :1024])


def test_a_window_that_fails_fails_every_thread_waiting_for_it():
    def read(*win):
        time.sleep(0.2)
        raise ValueError("bad tile")

    lv = _slide._Level((3, 1024, 1024), read, "broken.tif[0]")
    errors = []

    def ask():
        try:
            lv[:, 0:512, 0:512]
        except sr.InputError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 3 and all("broken.tif[0]: cannot decode" in e for e in errors)
    assert not lv._pending  # nothing left waiting: a later read tries again
    with pytest.raises(sr.InputError, match="bad tile"):
        lv[:, 0:512, 0:512]


def test_patches_are_resized_a_few_at_a_time_with_the_same_pixels(tmp_path, monkeypatch):
    # the whole batch used to be cut at the crop's size and converted to float at once
    # (128 patches of 350 px: 190 MB in float), per reader thread
    img = tissue_image(1024, 1024, seed=1)
    write_tiff(tmp_path / "s.tif", img, mpp=0.5, levels=1)
    sp = as_sections(sr.io.read_slide(tmp_path / "s.tif"), need_table=False)[0]
    rng = np.random.default_rng(0)
    centers = rng.uniform(100, 900, (40, 2))
    reader = patches_mod.PatchReader(sp, 150.0, out_px=32)
    sizes = []
    real = patches_mod.resize_batch
    monkeypatch.setattr(patches_mod, "resize_batch", lambda x, px: sizes.append(len(x)) or real(x, px))
    monkeypatch.setattr(patches_mod, "_RESIZE_BYTES", 150 * 150 * 3 * 4 * 8)  # 8 patches of 150 px
    got = reader.read(centers=centers)
    assert max(sizes) <= 8 and sum(sizes) == 40
    # the same pixels as all crops resized at once
    y0, x0 = (np.floor(centers[:, ::-1] - 75 + 0.5).astype(int)).T
    crops = np.stack([img[y : y + 150, x : x + 150] for y, x in zip(y0, x0, strict=True)])
    np.testing.assert_array_equal(got[:, 0], real(crops, 32))


def test_memory_goes_back_after_every_batch(monkeypatch):
    import torch

    from stranker import spots

    trims = []
    monkeypatch.setattr(spots, "release_memory", lambda: trims.append(1))
    x = np.zeros((10, 1, 4, 4, 3), dtype=np.uint8)
    spots.run_batches(lambda t: (t.flatten(1),), spots.SpotInputs.held(x), device=torch.device("cpu"),
                      batch_size=3)
    assert len(trims) == 4


def test_release_memory_runs_here():
    from stranker import spots

    assert spots.release_memory() is None  # glibc's malloc_trim, or nothing where there is none
