"""Training engine: one step, resume bit for bit, corrupt checkpoints, divergence, FSDP, CLI."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from train_fixtures import assert_same, batch_of, leaves, setup_of, tiny_config, tiny_images

from jaxgen.data import ArraySource
from jaxgen.errors import InputError
from jaxgen.models import count_params
from jaxgen.train import (
    Checkpointer,
    TrainingDiverged,
    TrainingInterrupted,
    abstract_state,
    ema_decay,
    image_grid,
    init_state,
    loop,
    make_train_step,
    read_events,
    train_and_evaluate,
)
from jaxgen.train.state import param_sharding_summary
from jaxgen.train.writers import TensorBoardWriter, crc32c

TINY_PARAMS = 45_201


# Compilations are reused between the runs of the module (identical configs, identical HLO).
pytestmark = pytest.mark.usefixtures("module_compile_cache")


def test_one_step_changes_params_and_is_finite(data_file):
    config = tiny_config(data_file, **{"optim.warmup_steps": 0})
    parts = setup_of(config)
    state = init_state(parts, seed=0)
    assert count_params(state.params) == TINY_PARAMS
    before = leaves(state.params)
    step = make_train_step(parts)
    state, metrics = step(state, batch_of(parts))
    assert int(state.step) == 1
    # The zero-initialised output layer is all the first step can move (the rest gets no
    # gradient through it); the second reaches every layer not behind another zero-initialised
    # residual branch (38 of 111 arrays).
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(state.params)]
    changed = [not np.array_equal(a, b) for a, b in zip(before, leaves(state.params), strict=True)]
    assert {p for p, c in zip(paths, changed, strict=True) if c} == {
        "['conv_out']['bias']", "['conv_out']['kernel']"}
    state, metrics = step(state, batch_of(parts))
    for k in ("loss", "grad_norm", "update_norm", "lr"):
        assert np.isfinite(float(metrics[k])), k
    changed = [not np.array_equal(a, b) for a, b in zip(before, leaves(state.params), strict=True)]
    assert sum(changed) == 38 and len(changed) == 111
    assert float(metrics["lr"]) == pytest.approx(config.optim.lr)
    assert set(state.ema) == {"0.9", "0.99"}


def test_gradient_accumulation_updates_every_k_steps(data_file):
    config = tiny_config(data_file, **{"optim.grad_accum": 2, "optim.warmup_steps": 0})
    parts = setup_of(config)
    state = init_state(parts, seed=0)
    step = make_train_step(parts)
    p0 = leaves(state.params)
    state, _ = step(state, batch_of(parts))
    assert all(np.array_equal(a, b) for a, b in zip(p0, leaves(state.params), strict=True))
    state, _ = step(state, batch_of(parts))
    assert not all(np.array_equal(a, b) for a, b in zip(p0, leaves(state.params), strict=True))


def test_ema_decay_warmup():
    n = jnp.asarray([0, 10, 10_000])
    np.testing.assert_allclose(ema_decay(0.999, n, True), [0.1, 11 / 20, 0.999], rtol=1e-6)
    np.testing.assert_allclose(ema_decay(0.999, n, False), [0.999] * 3, rtol=1e-6)


@pytest.fixture(scope="module")
def straight(data_file, tmp_path_factory):
    """An uninterrupted 4-step run: ``(final state, workdir)``."""
    workdir = tmp_path_factory.mktemp("straight")
    return train_and_evaluate(tiny_config(data_file), str(workdir)), workdir


def test_resume_after_stop_equals_uninterrupted(data_file, straight, tmp_path):
    state, workdir = straight
    train_and_evaluate(tiny_config(data_file, **{"train.num_steps": 2}), str(tmp_path))
    resumed = train_and_evaluate(tiny_config(data_file), str(tmp_path))
    assert int(resumed.step) == 4
    assert_same(state, resumed)
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 0, "params": TINY_PARAMS}
    assert [x["step"] for x in lines[1:]] == [1, 2, 3, 4]
    (events,) = (workdir / "tb").iterdir()
    assert [s for s, _ in read_events(events)] == [0, 1, 2, 3, 4]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["train"]["num_steps"] == 4


class _SigtermAt(ArraySource):
    """An ArraySource that sends SIGTERM to this process on its ``k``-th read."""

    def __init__(self, images, labels, k):
        super().__init__(images, "sigterm-source", labels=labels)
        self.reads, self.k = 0, k

    def read_with_labels(self, indices):
        self.reads += 1
        if self.reads == self.k:
            signal.raise_signal(signal.SIGTERM)
        return super().read_with_labels(indices)


def test_sigterm_checkpoints_and_resume_is_bit_exact(data_file, straight, tmp_path, monkeypatch):
    config = tiny_config(data_file, **{"checkpoint.every_steps": 100})
    images, labels = tiny_images()
    monkeypatch.setattr(loop, "open_source", lambda spec, **_: _SigtermAt(images, labels, 2))
    with pytest.raises(TrainingInterrupted, match="SIGTERM: stopped at step") as stopped:
        train_and_evaluate(config, str(tmp_path))
    assert stopped.value.signum == signal.SIGTERM and 1 <= stopped.value.step < 4
    assert Checkpointer(tmp_path / "checkpoints").steps() == [stopped.value.step]
    monkeypatch.undo()
    resumed = train_and_evaluate(config, str(tmp_path))
    assert int(resumed.step) == 4
    assert_same(straight[0], resumed)


def test_corrupt_latest_checkpoint_falls_back(data_file, straight, tmp_path, capfd):
    workdir = tmp_path / "run"
    shutil.copytree(straight[1], workdir)
    ckpts = workdir / "checkpoints"
    assert Checkpointer(ckpts).steps() == [2, 4]
    for f in (ckpts / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0garbage" * 8)
    capfd.readouterr()
    config = tiny_config(data_file)
    state, extra, step = Checkpointer(ckpts).restore_latest(abstract_state(setup_of(config)))
    err = capfd.readouterr().err
    assert step == 2 and int(state.step) == 2 and extra["data"]["step"] == 2
    assert "checkpoints/4 is corrupt" in err and "previous one" in err
    assert (ckpts / "4.corrupt-0").is_dir() and Checkpointer(ckpts).steps() == [2]
    again = train_and_evaluate(config, str(workdir))  # resumes at 2, redoes 3..4
    assert_same(straight[0], again)


def test_divergence_stops_and_keeps_last_good_checkpoint(data_file, straight, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(straight[1], workdir)
    bad = tiny_config(data_file, **{"optim.lr": float("inf"), "checkpoint.every_steps": 1,
                                    "train.num_steps": 6})
    with pytest.raises(TrainingDiverged, match=r"steps 5\.\.5 had a non-finite.*step 4 in"):
        train_and_evaluate(bad, str(workdir), allow_config_change=True)  # lr differs
    assert Checkpointer(workdir / "checkpoints").steps() == [2, 4]
    last = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 5 and last["update_norm"] is None


def test_fsdp_shards_params_and_optimizer_state_by_logical_axes(data_file):
    config = tiny_config(data_file, **{"train.fsdp": 4})
    parts = setup_of(config, mesh="fsdp")
    assert dict(parts.mesh.shape) == {"data": 2, "fsdp": 4}
    state = init_state(parts, seed=0)
    specs = param_sharding_summary(state)
    # conv_in kernel: (kernel_h, kernel_w, channels, embed) -> embed on fsdp.
    assert specs["conv_in/kernel"] == (None, None, None, "fsdp")
    assert specs["norm_out/scale"] == (None,)  # "norm" stays replicated
    kernel = state.params["conv_in"]["kernel"]
    assert kernel.addressable_shards[0].data.shape == (3, 3, 1, 2)
    mu = state.opt_state.inner_opt_state[1][0].mu["conv_in"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec
    ema = state.ema["0.9"]["conv_in"]["kernel"]
    assert ema.sharding.spec == kernel.sharding.spec
    # Same numbers as the unsharded step.
    plain = setup_of(tiny_config(data_file))
    a, _ = make_train_step(parts)(state, batch_of(parts))
    b, _ = make_train_step(plain)(init_state(plain, seed=0), batch_of(plain))
    for x, y in zip(leaves(a.params), leaves(b.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_bad_config_values_are_input_errors(data_file):
    with pytest.raises(InputError, match="diffusion.process='ve'"):
        setup_of(tiny_config(data_file, **{"diffusion.process": "ve"}))
    with pytest.raises(InputError, match="optim.schedule"):
        setup_of(tiny_config(data_file, **{"optim.schedule": "linear"}))
    with pytest.raises(InputError, match="compute_dtype"):
        setup_of(tiny_config(data_file, **{"train.compute_dtype": "float16"}))


def test_process_kwargs_of_another_process_are_named():
    # The flow recipes set process_kwargs.path; switching only the process to VP
    # used to end in a TypeError from the dataclass.
    from jaxgen.configs import fashion_mnist
    from jaxgen.train.state import make_process

    cfg = fashion_mnist.get_config().diffusion
    assert cfg.process == "flow" and "path" in cfg.process_kwargs
    cfg.process = "vp"
    with pytest.raises(InputError, match=r"has path, which process 'vp' does not take"):
        make_process(cfg)


# bfloat16 compute against float32 within its rounding, one step's numbers against
# AdamW / EMA / accumulation by hand: tests/test_train_step_math.py.


def test_tensorboard_events_round_trip(tmp_path):
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    w = TensorBoardWriter(tmp_path)
    w.scalars(3, {"loss": 0.5, "fid": 12.25})
    w.scalars(7, {"loss": float("nan")})
    w.close()
    events = read_events(w.path)
    assert events[0] == (3, {"loss": 0.5, "fid": 12.25})
    assert events[1][0] == 7 and np.isnan(events[1][1]["loss"])


def test_image_grid_layout():
    images = np.stack([np.full((2, 3, 1), i, np.uint8) for i in range(1, 11)])
    grid = image_grid(images, cols=4, pad=1)
    assert grid.shape == (3 * 3 + 1, 4 * 4 + 1, 1)
    assert grid[1, 1, 0] == 1 and grid[1, 5, 0] == 2 and grid[4, 1, 0] == 5
    assert grid[7, 9, 0] == 0  # the missing 11th tile stays empty


_WORKER = """
import sys
import numpy as np
import jax
sys.path[:0] = [{repo!r}, {tests!r}]
from train_fixtures import tiny_config
from jaxgen.train import train_and_evaluate
state = train_and_evaluate(tiny_config({data!r}), {workdir!r})
assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state)]
if jax.process_index() == 0:
    np.savez({out!r}, *leaves)
"""


@pytest.mark.slow
def test_two_processes_match_one_process(data_file, straight, tmp_path):
    """2 processes x 4 CPU devices (jax.distributed, gloo) == 1 process x 8 devices.

    Equal to float32 rounding: gloo's cross-process all-reduce adds the gradient shards in
    another order than the in-process one, and Adam's m / sqrt(v) magnifies that rounding in
    near-zero gradient components; after 4 steps parameters agree within 1e-6, a thousandth
    of one step at lr 1e-3.
    """
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "params.npz"
    code = _WORKER.format(repo=str(repo), tests=str(repo / "tests"), data=data_file,
                          workdir=str(tmp_path / "run"), out=str(out))
    procs, logs = [], [tmp_path / f"process{i}.log" for i in range(2)]
    for i in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   JAX_PLATFORMS="cpu", JAXGEN_COORDINATOR=f"localhost:{port}",
                   JAXGEN_NUM_PROCESSES="2", JAXGEN_PROCESS_ID=str(i))
        # Output to files: a full pipe would block one process and fail its peer.
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=repo,
                                      stdout=logs[i].open("w"), stderr=subprocess.STDOUT))
    for p, log in zip(procs, logs, strict=True):
        p.wait(timeout=600)
        assert p.returncode == 0, log.read_text()[-3000:]
    got = np.load(out)
    want = leaves(straight[0])
    assert len(got.files) == len(want)
    for i, w in enumerate(want):
        np.testing.assert_allclose(got[f"arr_{i}"], w, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_evaluation_writes_grid_fid_and_caches_reference(data_file, tmp_path, capfd):
    config = tiny_config(data_file, **{"train.num_steps": 2, "eval.every_steps": 2,
                                       "eval.fid_samples": 16, "eval.fid_batch_size": 16,
                                       "eval.fid_reference": data_file,
                                       "eval.fid_reference_num": 16})
    train_and_evaluate(config, str(tmp_path))
    grid = tmp_path / "samples" / "00000002.png"
    assert Image.open(grid).size == (8 * 10 + 2, 8 * 10 + 2)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2
    # The in-loop FID is jaxgen.evaluate's on the same images: the run's first EMA at
    # step 2 sampled again from its checkpoint with the eval seed and batch size (the
    # same compiled program, so the same uint8 images), against the first 16 training
    # images; identical features, float64 statistics summed in another order.
    from jaxgen.metrics.evaluate import evaluate
    from jaxgen.metrics.weights import load_inception
    from jaxgen.train import load_run, sample_images

    run, ev = load_run(tmp_path), config.eval
    assert run.step == 2
    samples = np.concatenate(list(sample_images(
        run.parts, run.params, jax.random.key_data(jax.random.key(ev.seed)), num=64,
        batch_size=ev.batch_size, solver=ev.solver, steps=ev.steps)))[:16]
    again = evaluate(tiny_images()[0][:16], samples, ["fid"], inception=load_inception(),
                     progress=False, batch_size=16)["fid"]
    assert record["fid16"] == pytest.approx(again, rel=1e-6)
    (cached,) = tmp_path.glob("fid_ref_*.npz")
    assert "computing FID reference statistics of 16 images" in capfd.readouterr().err
    train_and_evaluate(tiny_config(data_file, **{"train.num_steps": 4, "eval.every_steps": 4,
                                                 "eval.fid_samples": 16,
                                                 "eval.fid_batch_size": 16,
                                                 "eval.fid_reference": data_file,
                                                 "eval.fid_reference_num": 16}), str(tmp_path))
    assert "computing FID reference" not in capfd.readouterr().err  # read from the cache
    assert list(tmp_path.glob("fid_ref_*.npz")) == [cached]
