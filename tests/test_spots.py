"""The spot pipeline: one source of spot inputs and one batched inference loop (``stranker.spots``)."""

import threading
import time

import numpy as np
import pytest
import torch

import stranker as sr
from stranker.spots import SpotInputs, device_of, run_batches, tensor_batches


def _patches(n=10, px=4):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 1, px, px, 3), dtype=np.uint8)


class _Reader:
    """A patch reader's interface: ``read(rows)`` or ``read(centers=...)``, and its section's spots."""

    def __init__(self, patches):
        self.patches = patches
        self.calls = []
        self.spots = type("S", (), {"n_spots": len(patches), "name": "s"})()

    def read(self, idx=None, centers=None):
        rows = np.asarray(idx) if centers is None else np.asarray(centers)[:, 0].astype(int)
        self.calls.append(len(rows))
        return self.patches[rows]


def test_every_source_gives_the_same_batches_in_order():
    x = _patches()
    reader = _Reader(x)
    sources = [
        SpotInputs.held(x),
        SpotInputs.streamed(reader),
        SpotInputs.streamed(reader, centers=np.column_stack([np.arange(10), np.zeros(10)])),
    ]
    for src in sources:
        assert len(src) == 10
        got = list(src.batches(4))
        assert [len(p) for p, _ in got] == [4, 4, 2]
        np.testing.assert_array_equal(np.concatenate([b for _, b in got]), x)
        np.testing.assert_array_equal(src.all(batch_size=3), x)
    assert max(reader.calls) <= 4  # streamed: never more than a batch at once


def test_in_memory_reads_a_streamed_source_once():
    x = _patches()
    reader = _Reader(x)
    held = SpotInputs.streamed(reader).in_memory(batch_size=5)
    assert held.kind == "patches" and reader.calls == [5, 5]
    list(held.batches(3))
    assert reader.calls == [5, 5]  # later reads come from memory
    features = SpotInputs.held(np.ones((3, 2)), kind="features")
    assert features.in_memory() is features and features.read(np.arange(3)).dtype == np.float32


def test_rows_and_bad_batch_size():
    src = SpotInputs.held(_patches())
    (pos, b), = list(src.batches(8, rows=np.array([7, 2, 5])))
    np.testing.assert_array_equal(pos, [0, 1, 2])
    np.testing.assert_array_equal(b, _patches()[[7, 2, 5]])
    with pytest.raises(ValueError, match="batch_size"):
        list(src.batches(0))


def test_tensor_batches_are_network_ready():
    x = _patches(3)
    (t,) = list(tensor_batches(SpotInputs.held(x), torch.device("cpu"), 8))
    assert t.shape == (3, 1, 3, 4, 4) and t.dtype == torch.float32
    assert float(t.max()) <= 1.0
    np.testing.assert_allclose(t[1, 0, 2].numpy(), x[1, 0, :, :, 2] / 255.0, rtol=1e-6)
    feats = np.arange(6, dtype=np.float32).reshape(3, 2)
    (f,) = list(tensor_batches(SpotInputs.held(feats, kind="features"), torch.device("cpu"), 8))
    np.testing.assert_array_equal(f.numpy(), feats)  # features pass through


def test_run_batches_gathers_every_output_in_spot_order():
    x = _patches(11)
    net = torch.nn.Linear(48, 5)

    def step(t):
        flat = t.flatten(1)
        return net(flat), flat.mean(1, keepdim=True)

    emb, mean = run_batches(step, SpotInputs.held(x), device=torch.device("cpu"), dims=(5, 1), batch_size=4)
    with torch.no_grad():
        full = torch.from_numpy(x).permute(0, 1, 4, 2, 3).float().div(255).flatten(1)
        np.testing.assert_allclose(emb, net(full).numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mean[:, 0], full.mean(1).numpy(), rtol=1e-5)
    assert emb.dtype == np.float32
    # widths told by the first batch; no spots: one empty array
    (told,) = run_batches(lambda t: (net(t.flatten(1)),), SpotInputs.held(x), device=torch.device("cpu"))
    assert told.shape == (11, 5)
    (empty,) = run_batches(lambda t: (t,), SpotInputs.held(x[:0]), device=torch.device("cpu"))
    assert empty.shape == (0, 0)


def test_run_batches_needs_no_grad_and_keeps_the_device_type():
    seen = []

    def step(t):
        seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return (t.flatten(1),)

    run_batches(step, SpotInputs.held(_patches(2)), device=torch.device("cpu"))
    assert seen == [(False, False)]  # no gradients; no autocast off CUDA
    assert device_of("cpu") == torch.device("cpu")


# ------------------------------------------------------------------ reader threads (num_workers)
class _SlowReader(_Reader):
    """Reads take a random while (so threads finish out of order) and record the thread and the time."""

    def __init__(self, patches, fail_at=None):
        super().__init__(patches)
        self.threads, self.fail_at, self.lock = set(), fail_at, threading.Lock()
        self.rng = np.random.default_rng(1)

    def read(self, idx=None, centers=None):
        with self.lock:
            wait = float(self.rng.uniform(0, 0.02))
        time.sleep(wait)
        self.threads.add(threading.current_thread().name)
        if self.fail_at is not None and self.fail_at in np.asarray(idx):
            raise sr.InputError(f"cannot decode spot {self.fail_at}")
        return super().read(idx, centers)


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_reader_threads_give_the_same_batches_in_order(workers):
    x = _patches(47)
    seq = list(SpotInputs.streamed(_Reader(x)).batches(4))
    reader = _SlowReader(x)
    par = list(SpotInputs.streamed(reader).batches(4, num_workers=workers))
    assert len(par) == len(seq) == 12
    for (p0, b0), (p1, b1) in zip(seq, par, strict=True):
        np.testing.assert_array_equal(p0, p1)
        np.testing.assert_array_equal(b0, b1)
    assert reader.threads and all(t.startswith("stranker-read") for t in reader.threads)
    rows = np.array([9, 3, 40, 41, 0])  # chosen rows too
    for w in (0, 2):
        got = np.concatenate([b for _, b in SpotInputs.streamed(_Reader(x)).batches(2, rows, num_workers=w)])
        np.testing.assert_array_equal(got, x[rows])
    # patches held in memory are not read by threads
    held = SpotInputs.held(x)
    held.read = lambda rows: (reader.threads.add("held:" + threading.current_thread().name), x[rows])[1]
    list(held.batches(4, num_workers=2))
    assert {t for t in reader.threads if t.startswith("held:")} == {"held:MainThread"}


def test_reader_threads_read_a_bounded_number_of_batches_ahead():
    x = _patches(100)
    reader = _Reader(x)
    src = SpotInputs.streamed(reader)
    it = src.batches(5, num_workers=2)
    next(it)
    time.sleep(0.3)  # the threads read ahead as far as they may
    assert len(reader.calls) == 1 + 2 * 2  # the batch yielded and 2 x num_workers ahead, not all 20
    rest = list(it)
    assert len(rest) == 19 and len(reader.calls) == 20
    # a caller that stops early leaves no thread running
    it = src.batches(5, num_workers=3)
    next(it)
    it.close()
    time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name.startswith("stranker-read")]


def test_a_reading_error_surfaces_at_its_batch():
    x = _patches(30)
    got = []
    with pytest.raises(sr.InputError, match="spot 17"):
        for pos, _ in SpotInputs.streamed(_SlowReader(x, fail_at=17)).batches(4, num_workers=2):
            got.append(pos[0])
    assert got == [0, 4, 8, 12]  # every batch before the one that fails, as read one by one


def test_run_batches_outputs_do_not_depend_on_num_workers():
    x = _patches(37)
    net = torch.nn.Linear(48, 5)

    def step(t):
        return net(t.flatten(1)), t.flatten(1).mean(1, keepdim=True)

    outs = [run_batches(step, SpotInputs.streamed(_SlowReader(x)), device=torch.device("cpu"), batch_size=4,
                        num_workers=w) for w in (0, 1, 3, None)]
    for o in outs[1:]:
        for a, b in zip(outs[0], o, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_num_workers_must_be_a_whole_number(bad):
    with pytest.raises(sr.InputError, match="num_workers"):
        run_batches(lambda t: (t,), SpotInputs.held(_patches(2)), device=torch.device("cpu"), num_workers=bad)
