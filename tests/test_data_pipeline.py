"""Training batches: determinism, exact sharding, resumption, augmentation, devices."""

import jax
import numpy as np
import pytest
from PIL import Image

from jaxgen import data
from jaxgen.errors import InputError
from jaxgen.parallel import make_mesh


def _indexed(n: int, size: int = 4) -> data.ArraySource:
    """Image i has channel 0 = a left-to-right ramp (shows flips) and channel 1 = i."""
    x = np.zeros((n, size, size, 3), np.uint8)
    x[..., 0] = np.arange(size)[None, None, :]
    x[..., 1] = np.arange(n)[:, None, None]
    return data.ArraySource(x, f"indexed{n}", labels=np.arange(n) % 7)


def _ids(batch: dict) -> np.ndarray:
    return np.asarray(batch["image"])[:, 0, 0, 1].astype(int)


def _take(it, k: int) -> list[dict]:
    return [next(it) for _ in range(k)]


def test_same_seed_same_order_other_seed_other_order():
    src = _indexed(40)
    a = [_ids(b) for b in _take(data.TrainIterator(src, 8, seed=3, flip=True), 6)]
    b = [_ids(b) for b in _take(data.TrainIterator(src, 8, seed=3, flip=True, prefetch=0), 6)]
    c = [_ids(b) for b in _take(data.TrainIterator(src, 8, seed=4, flip=True), 6)]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_process_shards_cover_each_epoch_exactly_once(processes):
    n, batch = 10, 4  # batches straddle epoch boundaries
    src = _indexed(n)
    its = [
        data.TrainIterator(src, batch, seed=0, process_index=p, process_count=processes)
        for p in range(processes)
    ]
    for it in its:
        assert it.local_batch_size == batch // processes
    steps = 15  # 60 examples: 6 epochs
    global_batches = [np.concatenate([_ids(next(it)) for it in its]) for _ in range(steps)]
    stream = np.concatenate(global_batches)
    for epoch in stream.reshape(6, n):
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
    # A global batch does not depend on how many processes share it.
    single = data.TrainIterator(src, batch, seed=0, process_index=0, process_count=1)
    np.testing.assert_array_equal(
        np.concatenate([_ids(next(single)) for _ in range(steps)]), stream
    )
    assert len({tuple(e) for e in stream.reshape(6, n)}) > 1  # reshuffled each epoch


def test_each_process_reads_only_its_rows():
    read = []

    class Recording(data.ArraySource):
        def read_with_labels(self, indices):
            read.append(np.asarray(indices).copy())
            return super().read_with_labels(indices)

    x = _indexed(16)
    src = Recording(x._images, "rec")
    it = data.TrainIterator(src, 8, seed=1, process_index=1, process_count=4, prefetch=0)
    batch = next(it)
    assert len(read) == 1 and len(read[0]) == 2
    np.testing.assert_array_equal(_ids(batch), read[0])
    indices, _ = data.global_positions(1, 16, np.arange(8))
    np.testing.assert_array_equal(read[0], indices[2:4])


def test_resume_mid_epoch_reproduces_the_remaining_batches(tmp_path):
    for i in range(12):
        Image.fromarray(np.full((6, 6, 3), 20 * i, np.uint8)).save(tmp_path / f"{i:02d}.png")
    src = data.open_source(str(tmp_path))
    kw = dict(seed=7, flip=True, pad_to=8)
    full = _take(data.TrainIterator(src, 4, **kw), 8)  # 32 examples: 2 epochs and a bit
    it = data.TrainIterator(src, 4, **kw)
    _take(it, 2)
    state = it.get_state()
    assert state == {"step": 2, "seed": 7, "num_examples": 12, "batch_size": 4}
    assert it.epoch == 8 / 12
    del it
    resumed = data.TrainIterator(src, 4, **kw, state=state)
    for want, got in zip(full[2:], _take(resumed, 6), strict=True):
        np.testing.assert_array_equal(want["image"], got["image"])
    # Resuming on two hosts sees the same global batches.
    halves = [
        data.TrainIterator(src, 4, **kw, process_index=p, process_count=2, state=state)
        for p in range(2)
    ]
    for want in full[2:5]:
        got = np.concatenate([next(h)["image"] for h in halves])
        np.testing.assert_array_equal(want["image"], got)


def test_set_state_rewinds_and_checks_compatibility():
    src = _indexed(20)
    it = data.TrainIterator(src, 5, seed=0)
    first = [_ids(b) for b in _take(it, 3)]
    state = it.get_state()
    it.set_state({**state, "step": 1})
    np.testing.assert_array_equal(_ids(next(it)), first[1])
    for key, value in [("seed", 1), ("num_examples", 21), ("batch_size", 10)]:
        with pytest.raises(InputError, match=rf"{key}={value} but this run has"):
            data.TrainIterator(src, 5, seed=0, state={**state, key: value})


def test_flip_is_per_image_and_about_half():
    src = _indexed(400)
    batch = next(data.TrainIterator(src, 400, seed=0, flip=True))
    ramp = batch["image"][:, 0, :, 0].astype(int)
    flipped = ramp[:, 0] > ramp[:, -1]
    assert 150 < flipped.sum() < 250
    np.testing.assert_array_equal(ramp[flipped], np.tile(np.arange(4)[::-1], (flipped.sum(), 1)))
    np.testing.assert_array_equal(ramp[~flipped], np.tile(np.arange(4), ((~flipped).sum(), 1)))
    plain = next(data.TrainIterator(src, 400, seed=0))
    assert (plain["image"][:, 0, 0, 0] == 0).all()


def test_pad_28_to_32_and_resize():
    src = data.open_source("fashion_mnist:test")
    it = data.TrainIterator(src, 16, seed=0, pad_to=32, with_labels=True)
    batch = next(it)
    x = batch["image"]
    assert x.shape == (16, 32, 32, 1) and batch["label"].dtype == np.int32
    assert (x[:, :2] == 0).all() and (x[:, -2:] == 0).all() and (x[:, :, :2] == 0).all()
    indices, _ = data.global_positions(0, len(src), np.arange(16))
    np.testing.assert_array_equal(x[:, 2:30, 2:30], src.read(indices))
    np.testing.assert_array_equal(batch["label"], src.labels[indices])
    with pytest.raises(InputError, match="pad_to=24 is smaller"):
        data.TrainIterator(src, 16, seed=0, pad_to=24)


def test_mesh_batches_are_sharded_global_arrays():
    mesh = make_mesh()
    src = _indexed(64)
    batch = next(data.TrainIterator(src, 16, seed=0, mesh=mesh, with_labels=True))
    x = batch["image"]
    assert isinstance(x, jax.Array) and x.shape == (16, 4, 4, 3)
    assert len(x.sharding.device_set) == jax.device_count()
    assert {s.data.shape[0] for s in x.addressable_shards} == {16 // jax.device_count()}
    np.testing.assert_array_equal(np.asarray(batch["label"]), _ids(batch) % 7)
    y = data.to_model_space(x)
    assert y.dtype == np.float32 and float(y.min()) >= -1 and float(y.max()) <= 1
    with pytest.raises(InputError, match="multiple of the mesh"):
        data.TrainIterator(src, 12, seed=0, mesh=mesh)


def test_bad_arguments():
    src = _indexed(8)
    with pytest.raises(InputError, match="multiple of the number of processes"):
        data.TrainIterator(src, 6, seed=0, process_count=4, process_index=0)
    with pytest.raises(InputError, match="process_index=2"):
        data.TrainIterator(src, 4, seed=0, process_count=2, process_index=2)
    with pytest.raises(InputError, match="no labels"):
        data.TrainIterator(data.ArraySource(src._images, "x"), 4, seed=0, with_labels=True)


def test_read_errors_surface_from_the_prefetch_thread(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes((tmp_path / "a.png").read_bytes()[:100])
    it = data.TrainIterator(data.open_source(str(tmp_path)), 2, seed=0)
    with pytest.raises(InputError, match=r"b\.png: cannot decode"):
        next(it)
    (tmp_path / "b.png").write_bytes((tmp_path / "a.png").read_bytes())  # repaired
    assert next(it)["image"].shape == (2, 32, 32, 3) and it.step == 1


def test_dropping_an_iterator_stops_its_thread():
    it = data.TrainIterator(_indexed(8), 2, seed=0, prefetch=1)
    next(it)
    thread = it._batches._thread
    assert thread.is_alive()
    del it
    thread.join(timeout=5)
    assert not thread.is_alive()
