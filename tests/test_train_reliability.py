"""Nothing a run saved is lost: config changes refused, checksums, locks, signals, readers
that never write, no duplicated log steps, and a kill -9 / resume loop that ends bit-exact."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from train_fixtures import assert_same, leaves, tiny_config, tiny_images

from jaxgen.data import ArraySource
from jaxgen.errors import InputError
from jaxgen.train import (
    Checkpointer,
    TrainingInterrupted,
    load_run,
    loop,
    read_scalars,
    train_and_evaluate,
)
from jaxgen.train.workdir import config_differences

pytestmark = pytest.mark.usefixtures("module_compile_cache")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def done(data_file, tmp_path_factory):
    """A finished 4-step run (checkpoints at 2 and 4): ``(state, workdir)``."""
    workdir = tmp_path_factory.mktemp("done")
    return train_and_evaluate(tiny_config(data_file), str(workdir)), workdir


def _copy(done, tmp_path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(done[1], workdir)
    return workdir


def _snapshot(workdir: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in workdir.rglob("*")}


def test_changed_config_is_refused_and_nothing_changes(data_file, done, tmp_path):
    workdir = _copy(done, tmp_path)
    before = _snapshot(workdir)
    changed = tiny_config(data_file, **{"train.num_steps": 6, "optim.lr": 5e-4,
                                        "train.ema_decays": (0.9, 0.99, 0.999)})
    with pytest.raises(InputError, match=r"optim.lr: 0.001 -> 0.0005.*train.ema_decays.*"
                                         r"--allow-config-change") as e:
        train_and_evaluate(changed, str(workdir))
    assert "num_steps" not in str(e.value)  # how long a run goes may change
    assert _snapshot(workdir) == before  # no config.json rewrite, no checkpoint renamed
    # Continuing with a longer run is allowed; the saved config then says 6 steps.
    longer = train_and_evaluate(tiny_config(data_file, **{"train.num_steps": 6}), str(workdir))
    assert int(longer.step) == 6
    assert json.loads((workdir / "config.json").read_text())["train"]["num_steps"] == 6


def test_config_differences_rules():
    a = {"train": {"num_steps": 4, "minutes": 0}, "optim": {"schedule": "constant"},
         "eval": {"steps": 2}}
    b = {"train": {"num_steps": 9, "minutes": 5}, "optim": {"schedule": "constant"},
         "eval": {"steps": 8}}
    assert config_differences(a, b) == []
    cosine = {**b, "optim": {"schedule": "cosine"}}
    assert config_differences({**a, "optim": {"schedule": "cosine"}}, cosine) == [
        "train.num_steps: 4 -> 9"]  # a cosine's length is part of the schedule
    # A field jaxgen added after the run started: no change at the base default only.
    assert config_differences(a, {**b, "diffusion": {"loss": "denoising"}}) == []
    assert config_differences(a, {**b, "diffusion": {"loss": "edm2"}}) == [
        "diffusion.loss: '(absent)' -> 'edm2'"]


def _flip_bytes(workdir: Path, step: int) -> Path:
    """Overwrite 64 bytes in the middle of the largest array file of checkpoint ``step``."""
    files = [p for p in (workdir / "checkpoints" / str(step) / "state").rglob("*") if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(255 - b for b in data[mid : mid + 64])
    target.write_bytes(bytes(data))
    return target


def test_silent_corruption_is_caught_by_checksums(data_file, done, tmp_path, capfd):
    workdir = _copy(done, tmp_path)
    _flip_bytes(workdir, 4)
    capfd.readouterr()
    run = load_run(workdir, ema="params")  # a reader: skips it, renames nothing
    err = capfd.readouterr().err
    assert run.step == 2
    assert err.count("\n") == 1 and "checkpoints/4 is corrupt" in err and "differ" in err
    assert (workdir / "checkpoints" / "4").is_dir()
    again = train_and_evaluate(tiny_config(data_file), str(workdir))  # the trainer sets aside
    assert (workdir / "checkpoints" / "4.corrupt-0").is_dir()
    assert_same(done[0], again)  # redone from step 2, bit for bit
    for leaf in leaves(again.ema):
        assert np.all(np.isfinite(leaf)) and np.abs(leaf).max() < 1e3


def test_intact_checkpoint_of_another_model_is_not_corruption(data_file, done, tmp_path):
    workdir = _copy(done, tmp_path)
    other = tiny_config(data_file)
    other.model.kwargs.ch = 16
    with pytest.raises(InputError, match="intact but does not fit this model"):
        train_and_evaluate(other, str(workdir), allow_config_change=True)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


def test_second_trainer_is_refused_and_stale_lock_taken_over(data_file, tmp_path, capfd):
    workdir = tmp_path / "run"
    workdir.mkdir()
    lock = workdir / ".lock"
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "time": 0}))
    config = tiny_config(data_file, **{"train.num_steps": 2})
    with pytest.raises(InputError, match=rf"in use by process {os.getpid()}"):
        train_and_evaluate(config, str(workdir))
    assert sorted(p.name for p in workdir.iterdir()) == [".lock"]  # nothing else written
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "time": 0}))
    capfd.readouterr()
    assert int(train_and_evaluate(config, str(workdir)).step) == 2
    assert "taking over the stale lock" in capfd.readouterr().err
    assert not lock.exists()  # released at the end


class _SignalAt(ArraySource):
    def __init__(self, images, labels, k, signum):
        super().__init__(images, "signal-source", labels=labels)
        self.reads, self.k, self.signum = 0, k, signum

    def read_with_labels(self, indices):
        self.reads += 1
        if self.reads == self.k:
            signal.raise_signal(self.signum)
        return super().read_with_labels(indices)


def test_ctrl_c_saves_and_reports_like_sigterm(data_file, tmp_path, monkeypatch):
    images, labels = tiny_images()
    source = _SignalAt(images, labels, 2, signal.SIGINT)
    monkeypatch.setattr(loop, "open_source", lambda spec, **_: source)
    with pytest.raises(TrainingInterrupted, match="SIGINT") as e:
        train_and_evaluate(tiny_config(data_file, **{"checkpoint.every_steps": 100}),
                           str(tmp_path))
    assert e.value.signum == signal.SIGINT
    assert Checkpointer(tmp_path / "checkpoints").steps() == [e.value.step]


@pytest.mark.parametrize("key, value", [("checkpoint.every_steps", 0),
                                        ("train.log_every", 0), ("data.batch_size", 0)])
def test_zero_periods_are_refused_before_anything_is_written(data_file, tmp_path, key, value):
    with pytest.raises(InputError, match=rf"{key}={value} must be >= 1"):
        train_and_evaluate(tiny_config(data_file, **{key: value}), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_resume_does_not_duplicate_logged_steps(data_file, done, tmp_path):
    workdir = _copy(done, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "4")  # as if killed after logging 3 and 4
    train_and_evaluate(tiny_config(data_file), str(workdir))
    steps = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]
    # TensorBoard: the second event file discards the first one's steps 3 and 4.
    assert len(list((workdir / "tb").iterdir())) == 2
    assert [s for s, _ in read_scalars(workdir / "tb")] == [0, 1, 2, 3, 4]


def test_a_full_disk_while_training_is_one_error_naming_the_checkpoint(data_file, tmp_path,
                                                                       monkeypatch, capfd):
    from etils import epath

    from jaxgen.files import describe_os_error

    write_text = epath.Path.write_text

    def full(self, *args, **kwargs):  # orbax writes a checkpoint's metadata this way
        if "checkpoints" in os.fspath(self):
            raise OSError(28, "No space left on device")  # as raised there: no file name
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(epath.Path, "write_text", full)
    workdir = tmp_path / "run"
    with pytest.raises(OSError) as e:
        train_and_evaluate(tiny_config(data_file), str(workdir))
    line = describe_os_error(e.value)
    assert line.startswith(f"{workdir / 'checkpoints'}")  # the folder or checkpoint 2
    assert "No space left on device (" in line
    assert "free on the disk of" in line
    assert "Traceback" not in capfd.readouterr().err  # orbax's logged copy is dropped
    assert not (workdir / ".lock").exists()


def test_tensorstore_full_disk_errors_are_os_errors():
    import errno

    from jaxgen.train.checkpoint import _disk_error

    # What orbax raises when TensorStore cannot write an array file (seen on a full tmpfs).
    message = ('RESOURCE_EXHAUSTED: Error writing local file "/r/checkpoints/4.orbax-checkpoint'
               '-tmp/state/_sharding": Failed to write 195201 bytes to file 6: No space left on '
               "device [os_error_code='28']")
    error = _disk_error(ValueError(message))
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert _disk_error(ValueError("shapes (3,) and (4,) differ")) is None


def test_a_failed_start_leaves_nothing_behind(data_file, tmp_path, monkeypatch):
    def fails(self):
        raise InputError("the FID reference cannot be read")

    monkeypatch.setattr(loop._Evaluator, "prepare", fails)
    new = tmp_path / "new"
    with pytest.raises(InputError, match="FID reference"):
        train_and_evaluate(tiny_config(data_file), str(new))
    assert not new.exists()  # the folder it made is gone
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(InputError, match="FID reference"):
        train_and_evaluate(tiny_config(data_file), str(existing))
    assert list(existing.iterdir()) == []  # no config.json, no lock, no logs


_KILLABLE = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from train_fixtures import tiny_config
from jaxgen.train import train_and_evaluate
train_and_evaluate(tiny_config({data!r}, **{{"train.num_steps": 12, "checkpoint.every_steps": 1,
                                              "train.log_every": 1}}), {workdir!r})
"""


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_is_bit_exact(data_file, tmp_path):
    """SIGKILL a trainer at random moments (during steps, saves and checksums); the
    resumed run ends with exactly the state of an uninterrupted one."""
    config = tiny_config(data_file, **{"train.num_steps": 12, "checkpoint.every_steps": 1,
                                       "train.log_every": 1})
    straight = train_and_evaluate(config, str(tmp_path / "straight"))
    workdir = tmp_path / "killed"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"))
    code = _KILLABLE.format(repo=str(REPO), tests=str(REPO / "tests"), data=data_file,
                            workdir=str(workdir))
    rng = np.random.default_rng(0)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Wait until it trains (a checkpoint appears), then kill it a random moment later.
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if any((workdir / "checkpoints").glob("[0-9]*")):
                break
            time.sleep(0.2)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed = train_and_evaluate(config, str(workdir))
    assert int(resumed.step) == 12
    assert_same(straight, resumed)
