"""Runs in a bucket: ``jaxgen.train --workdir gs://BUCKET/...``, resume, ``jaxgen.sample``.

No network. ``gs://`` is served by a fake ``etils.epath`` backend that keeps each object
``gs://B/K`` as the file ``ROOT/B/K`` and, like Cloud Storage, refuses to append; orbax's
tensorstore writes are pointed at the same folder. Orbax then takes its Cloud Storage
route (a commit file marks a complete checkpoint, no renames). A ``pathlib.Path`` that
met the workdir would turn ``gs://bkt/run`` into the local ``gs:/bkt/run``: the tests run
in an empty current folder and check that no ``gs:`` folder appears there.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from orbax.checkpoint._src.path import gcs_utils
from PIL import Image
from train_fixtures import tiny_config  # tests/ is on sys.path under pytest

from jaxgen import sample
from jaxgen.files import GrowingFile, is_local, open_atomic
from jaxgen.metrics import GaussianStats
from jaxgen.train import Checkpointer, monitoring, read_scalars, reference_stats, train_and_evaluate

# Compilations are reused between the runs of the module (identical configs, identical HLO).
pytestmark = pytest.mark.usefixtures("module_compile_cache")


class FakeBucket(epath_backend._OsPathBackend):
    """``gs://B/K`` stored as ``ROOT/B/K``; no append or read-write modes, as on GCS."""

    def __init__(self, root) -> None:
        self.root = os.fspath(root)

    def local(self, path) -> str:
        path = os.fspath(path)
        assert path.startswith("gs://"), f"{path} reached the gs:// backend"
        return posixpath.join(self.root, path.removeprefix("gs://"))

    def _gs(self, local) -> str:
        return "gs://" + posixpath.relpath(os.fspath(local), self.root)

    def open(self, path, mode):
        if "a" in mode or "+" in mode:
            raise OSError(f"{path}: a Cloud Storage object cannot be opened with mode {mode!r}")
        return super().open(self.local(path), mode)

    def exists(self, path):
        return super().exists(self.local(path))

    def isdir(self, path):
        return super().isdir(self.local(path))

    def listdir(self, path):
        return super().listdir(self.local(path))

    def glob(self, path):
        return [self._gs(p) for p in super().glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in super().walk(self.local(top), top_down=top_down,
                                              on_error=on_error):
            yield self._gs(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        super().makedirs(self.local(path), exist_ok=exist_ok)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        super().mkdir(self.local(path), exist_ok=exist_ok)

    def rmtree(self, path):
        super().rmtree(self.local(path))

    def remove(self, path):
        super().remove(self.local(path))

    def rename(self, path, dst):  # the parent's methods would pass local paths to self.exists
        if os.path.exists(self.local(dst)):
            raise FileExistsError(dst)
        os.rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
        os.replace(self.local(path), self.local(dst))

    def copy(self, path, dst, overwrite):
        if not overwrite and os.path.exists(self.local(dst)):
            raise FileExistsError(dst)
        shutil.copyfile(self.local(path), self.local(dst))

    def stat(self, path):
        return super().stat(self.local(path))


@pytest.fixture
def bucket(tmp_path, monkeypatch) -> FakeBucket:
    """``gs://`` served from ``tmp_path/bucket``; the current folder is an empty one."""
    fake = FakeBucket(tmp_path / "bucket")
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else tf.io.gfile serves gs
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", fake)
    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                        lambda path: {"driver": "file", "path": fake.local(path)})
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield fake
    assert not os.listdir(cwd), f"written to the current folder: {os.listdir(cwd)}"


# test_train's tiny model with one resolution and one EMA: half the compilation time. The
# evaluation grid samples in batches of 4 with 2 Euler steps, as jaxgen.sample below does,
# so that both are one compilation.
SMALLER = {"model.kwargs.ch_mult": (1,), "train.ema_decays": (0.9,), "eval.batch_size": 4}


def test_train_resume_and_sample_in_a_bucket(bucket, data_file, capfd):
    workdir = "gs://bkt/runs/r"
    run = bucket.local(workdir)
    config = tiny_config(data_file, **SMALLER, **{"eval.every_steps": 4})
    train_and_evaluate(tiny_config(data_file, **SMALLER, **{"train.num_steps": 2}), workdir)
    assert os.path.isfile(f"{run}/checkpoints/2/commit_success.txt")  # orbax's GCS route
    assert json.load(open(f"{run}/config.json"))["train"]["num_steps"] == 2
    capfd.readouterr()

    state = train_and_evaluate(config, workdir)  # resumes at step 2
    assert int(state.step) == 4
    assert f"resuming from {workdir}/checkpoints/2" in capfd.readouterr().err
    assert Checkpointer(f"{workdir}/checkpoints").steps() == [2, 4]
    assert json.load(open(f"{run}/config.json"))["train"]["num_steps"] == 4
    records = [json.loads(x) for x in open(f"{run}/metrics.jsonl").read().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 4]  # runs 1 and 2, evaluation at 4
    assert "sample_seconds" in records[-1]
    events = sorted(epath.Path(f"{workdir}/tb").iterdir())  # one event file per run
    assert len(events) == 2
    assert [s for s, _ in read_scalars(f"{workdir}/tb")] == [0, 1, 2, 3, 4, 4]
    assert Image.open(f"{run}/samples/00000004.png").size == (8 * 10 + 2, 8 * 10 + 2)

    argv = ["--workdir", workdir, "--num", "4", "--steps", "2", "--batch-size", "4",
            "--out", "gs://bkt/out/s.npz"]
    assert sample.main(argv) == 0
    assert "4 samples, step 4" in capfd.readouterr().out
    with np.load(bucket.local("gs://bkt/out/s.npz")) as f:
        assert f["arr_0"].shape == (4, 8, 8, 1) and list(f["arr_1"]) == [0, 1, 2, 3]
    assert os.path.isfile(bucket.local("gs://bkt/out/s.png"))
    assert not [f for f in os.listdir(bucket.local("gs://bkt/out")) if "tmp" in f]


def test_corrupt_checkpoint_in_a_bucket_is_set_aside(bucket, capfd):
    ckpt = Checkpointer("gs://bkt/c", keep=2)
    state = {"w": jnp.arange(6.0).reshape(2, 3)}
    for step in (1, 2):
        ckpt.save(step, jax.tree.map(lambda x, s=step: x * s, state), {"step": step})
    ckpt.wait()  # saves are asynchronous
    for root, _, files in os.walk(bucket.local("gs://bkt/c/2/state")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\0garbage" * 8)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
    restored, extra, step = Checkpointer("gs://bkt/c").restore_latest(target)
    assert step == 1 and extra == {"step": 1}
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert "gs://bkt/c/2 is corrupt" in capfd.readouterr().err
    assert os.path.isdir(bucket.local("gs://bkt/c/2.corrupt-0"))
    assert Checkpointer("gs://bkt/c").steps() == [1]


def test_fid_reference_stats_are_cached_in_the_bucket(bucket, data_file, monkeypatch):
    rng = np.random.default_rng(0)
    stats = GaussianStats.from_features(rng.normal(size=(16, 4)))
    calls = []

    def featurize(*args, **kwargs):
        calls.append(1)
        return {"pool3_stats": stats}

    monkeypatch.setattr(monitoring, "featurize", featurize)

    class Extractor:  # only its weights' identity is read, for the cache key
        class module:
            source = "fake-inception"

    first = reference_stats(data_file, "gs://bkt/r", Extractor(), num=16)
    (cached,) = epath.Path("gs://bkt/r").glob("fid_ref_*.npz")
    again = reference_stats(data_file, "gs://bkt/r", Extractor(), num=16)
    assert len(calls) == 1  # the second call read the bucket's copy
    for a, b in ((first, stats), (again, stats)):
        np.testing.assert_array_equal(a.mu, b.mu)
        np.testing.assert_array_equal(a.sigma, b.sigma)
    assert os.path.isfile(bucket.local(os.fspath(cached)))


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_growing_file_and_atomic_writes(bucket, tmp_path, where):
    folder = epath.Path("gs://bkt/f" if where == "bucket" else tmp_path / "f")
    assert is_local(folder) == (where == "local")
    grow = GrowingFile(folder / "log.jsonl")
    grow.append(b"1\n")
    grow.append(b"2\n")
    grow.close()
    grow = GrowingFile(folder / "log.jsonl")  # a resumed run continues the file
    grow.append(b"3\n")
    grow.close()
    assert (folder / "log.jsonl").read_bytes() == b"1\n2\n3\n"

    with open_atomic(folder / "a.bin") as f:
        f.write(b"saved")
    with pytest.raises(RuntimeError), open_atomic(folder / "a.bin") as f:
        f.write(b"half of a new ")
        raise RuntimeError("crash mid-write")
    assert (folder / "a.bin").read_bytes() == b"saved"  # untouched, no partial content
    assert sorted(p.name for p in folder.iterdir()) == ["a.bin", "log.jsonl"]  # no leftovers
