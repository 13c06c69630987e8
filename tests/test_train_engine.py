"""Training engine contract: mixed-size data, model facts from the module, a user's module and
loss, one model_fn with traced weights, on-device finiteness, progress against the real limit."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from train_fixtures import UserNet, batch_of, leaves, setup_of, tiny_config

from jaxgen import diffusion
from jaxgen.errors import InputError
from jaxgen.sampling import driver
from jaxgen.train import (
    init_state,
    load_run,
    loop,
    make_train_step,
    sample_images,
    train_and_evaluate,
)

pytestmark = pytest.mark.usefixtures("module_compile_cache")


def test_mixed_size_folder_trains_at_data_resolution(tmp_path):
    """Images of different sizes are resized once, in the source, to data.resolution."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "mixed"
    for i, (h, w) in enumerate([(12, 10), (9, 16), (8, 8), (20, 14)] * 2):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w), np.uint8)).save(folder / f"c{i % 2}/{i}.png")
    config = tiny_config(str(folder), **{"data.resolution": 8, "train.num_steps": 2,
                                         "model.kwargs.num_classes": 0})
    source, shape = loop.open_data(config)
    assert shape == (8, 8, 1) and source.image_shape == (8, 8, 1)
    state = train_and_evaluate(config, str(tmp_path / "run"))
    assert int(state.step) == 2
    config.data.resolution = None
    with pytest.raises(InputError, match="differ in size"):
        loop.open_data(config)


def test_model_facts_come_from_the_module(data_file):
    # A DiT with its default 1000 classes and no num_classes in the config: conditioned
    # on 1000 classes, null class 1000 (not an unconditional run that refuses CFG).
    config = tiny_config(data_file)
    config.model.name = "DiT-S/8"
    config.model.kwargs = {"depth": 1, "hidden": 32, "num_heads": 2, "learn_sigma": False}
    parts = setup_of(config)
    assert parts.num_classes == 1000 == parts.module.num_classes
    assert parts.null_cond["label"].tolist() == [1000]
    sample_images(parts, None, jax.random.key(0), num=1, batch_size=8, solver="euler",
                  steps=1, cfg_scale=2.0)  # accepted: the model is class-conditional
    config.model.kwargs = {"depth": 1, "hidden": 32, "num_heads": 2, "num_classes": 2}
    with pytest.raises(InputError, match="labels up to 3 .* num_classes=2"):
        loop.build(config)
    with pytest.raises(InputError, match="must be a finite number"):
        sample_images(parts, None, jax.random.key(0), num=1, batch_size=8, solver="euler",
                      steps=1, cfg_scale=float("nan"))


def test_edm_sigma_data_reaches_the_preconditioning(data_file):
    config = tiny_config(data_file, **{"diffusion.process": "edm", "diffusion.precond": "edm",
                                       "diffusion.sigma_data": 1.3})
    config.diffusion.process_kwargs = {}
    parts = setup_of(config)
    assert parts.process.sigma_data == 1.3
    params = init_state(parts, 0).params
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 1))
    t = jnp.full((8,), 0.7)
    cond = {"label": jnp.arange(8) % 4}
    raw = lambda p, x, c_noise, c: parts.module.apply({"params": p}, x, c_noise, c)
    for sd, same in ((1.3, True), (0.5, False)):
        want = diffusion.edm_precond(raw, parts.process, sd)(params, x, t, cond)
        assert np.allclose(parts.model_fn(params, x, t, cond), want, atol=1e-6) == same
    config.diffusion.process_kwargs = {"sigma_data": 0.5}
    with pytest.raises(InputError, match="set diffusion.sigma_data instead"):
        setup_of(config)


def test_user_module_and_loss_train_resume_and_sample(data_file, tmp_path):
    calls = []

    def my_loss(model_fn, params, x0, cond, key):  # per-example x0 regression at t = 0.5
        calls.append(1)
        t = jnp.full((x0.shape[0],), 0.5)
        noisy = x0 + 0.5 * jax.random.normal(key, x0.shape)
        per_example = jnp.mean((model_fn(params, noisy, t, cond) - x0) ** 2, axis=(1, 2, 3))
        return per_example, {"mean_abs_x0": jnp.mean(jnp.abs(x0))}

    config = tiny_config(data_file, **{"train.num_steps": 4})
    workdir = tmp_path / "run"
    state = train_and_evaluate(config, str(workdir), module=UserNet(), loss_fn=my_loss)
    assert int(state.step) == 4 and calls  # traced once, then compiled
    assert set(state.params) == {"Conv_0", "Conv_1", "Dense_0", "Embed_0"}
    run = load_run(workdir, module=UserNet())
    assert run.step == 4 and run.parts.num_classes == 4
    (images,) = sample_images(run.parts, run.params, jax.random.key(0), num=8, batch_size=8,
                              solver="euler", steps=2)
    assert images.shape == (8, 8, 8, 1) and images.dtype == np.uint8
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert "mean_abs_x0" in logged[-1] and np.isfinite(logged[-1]["loss"])


def test_frozen_weights_reach_the_loss_as_arguments(data_file):
    # A teacher's weights: the loss regresses the model onto the frozen teacher's output.
    config = tiny_config(data_file, **{"optim.warmup_steps": 0})
    module = UserNet()
    teacher = module.init(jax.random.key(7), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)),
                          {"label": jnp.zeros((1,), jnp.int32)})["params"]
    def distill(model_fn, params, x0, cond, key, frozen):
        t = jnp.full((x0.shape[0],), 0.5)
        target = module.apply({"params": frozen["teacher"]}, x0, t, cond)
        return jnp.mean((model_fn(params, x0, t, cond) - target) ** 2, axis=(1, 2, 3)), {}

    parts, _ = loop.build(config, module=module, loss_fn=distill, frozen={"teacher": teacher})
    state = init_state(parts, 0)
    batch = batch_of(parts)
    x0 = jnp.asarray(batch["image"], jnp.float32) / 127.5 - 1
    t, cond = jnp.full((8,), 0.5), {"label": batch["label"]}
    want = np.mean((np.asarray(module.apply({"params": state.params}, x0, t, cond))
                    - np.asarray(module.apply({"params": teacher}, x0, t, cond))) ** 2)
    _, metrics = make_train_step(parts)(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
    other = dataclasses.replace(parts, frozen={"teacher": jax.tree.map(lambda p: 2 * p, teacher)})
    _, metrics2 = make_train_step(other)(init_state(parts, 0), batch)
    assert float(metrics2["loss"]) != float(metrics["loss"])


def test_sampling_a_new_checkpoint_or_ema_never_recompiles(data_file):
    parts = setup_of(tiny_config(data_file))
    state = init_state(parts, 0)
    kw = dict(num=8, batch_size=8, solver="euler", steps=2)
    a = np.concatenate(list(sample_images(parts, state.params, jax.random.key(0), **kw)))
    size = driver._run_jit._cache_size()
    shifted = jax.tree.map(lambda p: p + 0.01, state.params)
    b = np.concatenate(list(sample_images(parts, shifted, jax.random.key(0), **kw)))
    c = np.concatenate(list(sample_images(parts, state.ema["0.9"], jax.random.key(0), **kw)))
    assert driver._run_jit._cache_size() == size  # the weights are arguments, not constants
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, c)  # the EMA starts equal to the parameters


def test_non_finite_step_is_dropped_on_device(data_file):
    # A NaN learning rate makes the update non-finite while the loss stays finite.
    config = tiny_config(data_file, **{"optim.lr": float("nan"), "optim.warmup_steps": 0})
    parts = setup_of(config)
    state = init_state(parts, 0)
    before = [*leaves(state.params), *leaves(state.opt_state), *leaves(state.ema)]
    state, metrics = make_train_step(parts)(state, batch_of(parts))
    assert float(metrics["finite"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 1
    after = [*leaves(state.params), *leaves(state.opt_state), *leaves(state.ema)]
    for x, y in zip(before, after, strict=True):
        np.testing.assert_array_equal(x, y)


def test_metrics_are_read_only_when_logging(data_file, tmp_path, monkeypatch):
    reads = []
    real = jax.device_get
    monkeypatch.setattr(loop.jax, "device_get", lambda x: reads.append(1) or real(x))
    config = tiny_config(data_file, **{"train.num_steps": 8, "train.log_every": 4,
                                       "checkpoint.every_steps": 8})
    train_and_evaluate(config, str(tmp_path))
    assert len(reads) == 2  # steps 4 and 8, not 8 host round trips


def test_time_limited_progress_counts_minutes_not_a_million_steps(data_file):
    config = tiny_config(data_file, **{"train.minutes": 10.0, "train.num_steps": 1_000_000})
    progress = loop._Progress(config, step=0, seconds=0.0, enabled=True)
    assert progress.bar.total == 600  # seconds of training, not steps
    progress.update(step=123, seconds=61.4)
    assert progress.bar.n == 61
    config.train.minutes = 0.0
    assert loop._Progress(config, step=5, seconds=0.0, enabled=False).bar.total == 1_000_000
