"""Consistency training and distillation through the trainer, the sampler and the CLIs."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from train_fixtures import (
    assert_same,
    assert_uint8_matches,
    batch_of,
    leaves,
    set_fields,
    setup_of,
    tiny_config,
)

from jaxgen import sample as sample_cli
from jaxgen.diffusion import EDM, Flow, TrigFlow
from jaxgen.diffusion.consistency import cd_loss, consistency_view, ict_loss, ict_num_scales
from jaxgen.diffusion.distillation import progressive_loss, progressive_times
from jaxgen.diffusion.scm import scm_loss, teacher_velocity, trigflow_velocity
from jaxgen.errors import InputError
from jaxgen.sampling import consistency_times, sample, to_uint8
from jaxgen.sampling.teacher import solver_step
from jaxgen.train import (
    Checkpointer,
    abstract_state,
    init_state,
    load_run,
    loop,
    make_train_step,
    sample_images,
    train_and_evaluate,
)
from jaxgen.train.consistency import check_teacher, with_teacher
from jaxgen.train.workdir import config_differences

pytestmark = pytest.mark.usefixtures("module_compile_cache")

EDM_KWARGS = dict(sigma_min=0.002, sigma_max=80.0)

def assert_resume_is_bit_exact(make_config, tmp_path, fields=("params", "ema", "opt_state")):
    """Train ``make_config()`` to its 4 steps in one go and, in another folder, stop at 2
    and resume to 4; the two states' ``fields`` are equal bit for bit. Returns the resumed
    state."""
    straight = train_and_evaluate(make_config(), str(tmp_path / "a"))
    train_and_evaluate(make_config(**{"train.num_steps": 2}), str(tmp_path / "b"))
    resumed = train_and_evaluate(make_config(), str(tmp_path / "b"))
    assert int(resumed.step) == int(straight.step) == 4
    for name in fields:
        assert_same(getattr(resumed, name), getattr(straight, name))
    return resumed


def starting_noise(*, seed: int, num: int, shape: tuple) -> jax.Array:
    """The unit noise sample ``i`` starts from in ``jaxgen.sample --seed SEED``: drawn from
    ``fold_in(fold_in(key, i), 0)`` (:func:`jaxgen.sampling.consistency_sample`)."""
    key = jax.random.key_data(jax.random.key(seed))
    return jnp.stack([jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), 0), shape)
                      for i in range(num)])



def student_config(data_file: str, loss: str = "cd", teacher: str | None = None, **overrides):
    """test_train's tiny U-Net as a consistency model on EDM's process (no dropout)."""
    return tiny_config(data_file, **{
        "diffusion.process": "edm",
        "diffusion.process_kwargs": ml_collections.ConfigDict(EDM_KWARGS),
        "diffusion.precond": "consistency",
        "diffusion.prediction": "x0",
        "diffusion.loss": loss,
        "distill.teacher": teacher,
        "model.kwargs.dropout": 0.0,
        "model.kwargs.class_dropout": 0.0,
        **overrides,
    })


@pytest.fixture(scope="module")
def teacher_dir(data_file, tmp_path_factory) -> str:
    """A tiny flow-matching run trained for 2 steps."""
    workdir = tmp_path_factory.mktemp("teacher")
    train_and_evaluate(tiny_config(data_file, **{"train.num_steps": 2}), str(workdir))
    return str(workdir)


@pytest.fixture(scope="module")
def cd_run(data_file, teacher_dir, tmp_path_factory):
    """A tiny CD student trained 4 steps straight: (final state, workdir)."""
    workdir = tmp_path_factory.mktemp("cd")
    return train_and_evaluate(student_config(data_file, teacher=teacher_dir), str(workdir)), workdir


def test_cd_loss_at_step_0_is_the_pure_loss_with_the_teachers_ode_step(data_file, teacher_dir):
    parts = with_teacher(loop.build(student_config(data_file, teacher=teacher_dir))[0])
    state = init_state(parts, 0)
    batch = batch_of(parts)
    _, metrics = make_train_step(parts)(init_state(parts, 0), batch)
    # The pure loss, built by hand: the teacher's Heun step and the step's key.
    teacher = load_run(teacher_dir)
    k_loss, _ = jax.random.split(jax.random.fold_in(state.rng, 0))
    x0 = jnp.asarray(batch["image"], jnp.float32) / 127.5 - 1

    @jax.jit
    def pure(teacher_params):
        step = solver_step(teacher.parts.model_fn, teacher_params, teacher.parts.process,
                           prediction="velocity", solver="heun")
        per_example, _ = cd_loss(parts.model_fn, state.params, x0, {"label": batch["label"]},
                                 k_loss, teacher_step=step, process=EDM(**EDM_KWARGS),
                                 num_scales=18)
        return jnp.mean(per_example)

    want = float(pure(teacher.params))
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=2e-5)
    # The teacher's weights matter: the equality above is the trainer reading them.
    other = float(pure(jax.tree.map(lambda p: p + 0.1, teacher.params)))
    assert abs(other - want) > 1e-3 * want


@pytest.mark.slow
def test_cd_resume_is_bit_exact(data_file, teacher_dir, cd_run, tmp_path):
    straight, _ = cd_run
    train_and_evaluate(student_config(data_file, teacher=teacher_dir,
                                      **{"train.num_steps": 2}), str(tmp_path))
    resumed = train_and_evaluate(student_config(data_file, teacher=teacher_dir), str(tmp_path))
    assert int(resumed.step) == int(straight.step) == 4
    assert_same(resumed.params, straight.params)
    assert_same(resumed.ema, straight.ema)
    assert_same(resumed.opt_state, straight.opt_state)


@pytest.mark.slow
def test_sample_cli_one_step_is_one_consistency_evaluation_at_sigma_max(cd_run, tmp_path):
    _, workdir = cd_run
    out = tmp_path / "s.npz"
    assert sample_cli.main(["--workdir", str(workdir), "--steps", "1", "--num", "8",
                            "--seed", "3", "--out", str(out)]) == 0
    got = np.load(out)["arr_0"]
    run = load_run(workdir)
    noise = starting_noise(seed=3, num=8, shape=(8, 8, 1))
    x_T = 80.0 * noise
    labels = {"label": jnp.arange(8, dtype=jnp.int32) % 4}
    assert_uint8_matches(got, run.parts.model_fn(run.params, x_T, jnp.full((8,), 80.0), labels))
    # Two steps re-noise and evaluate again: other images.
    out2 = tmp_path / "s2.npz"
    assert sample_cli.main(["--workdir", str(workdir), "--steps", "2", "--num", "8",
                            "--seed", "3", "--out", str(out2)]) == 0
    assert np.mean(np.load(out2)["arr_0"] != got) > 0.5


def test_boundary_condition_is_bit_exact_through_the_trainers_model(data_file):
    parts = setup_of(student_config(data_file, loss="ict", **{"train.num_steps": 16,
                                                               "model.kwargs.dropout": 0.1}))
    state = init_state(parts, 0)
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 1)) * 3.0
    cond = {"label": jnp.arange(8, dtype=jnp.int32) % 4}
    at_min = jnp.full((8,), 0.002, jnp.float32)
    np.testing.assert_array_equal(parts.model_fn(state.params, x, at_min, cond), x)
    train_mode = parts.apply(state.params, x, at_min, cond, train=True,
                             rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(train_mode, x)
    above = parts.model_fn(state.params, x, jnp.full((8,), 0.01, jnp.float32), cond)
    assert not np.allclose(above, x, atol=1e-4)


def test_ict_follows_the_curriculum_of_the_update_count(data_file):
    config = student_config(data_file, loss="ict", **{"train.num_steps": 16,
                                                       "optim.warmup_steps": 0})
    parts = setup_of(config)
    state = init_state(parts, 0)
    batch = batch_of(parts)
    x0 = jnp.asarray(batch["image"], jnp.float32) / 127.5 - 1
    k_loss, _ = jax.random.split(jax.random.fold_in(state.rng, 0))
    per_example, _ = jax.jit(lambda p: ict_loss(
        parts.model_fn, p, x0, {"label": batch["label"]}, k_loss, step=0, total_steps=16,
        process=EDM(**EDM_KWARGS)))(state.params)
    step = make_train_step(parts)
    scales = []
    for i in range(3):
        state, metrics = step(state, batch)
        if i == 0:
            np.testing.assert_allclose(float(metrics["loss"]), float(jnp.mean(per_example)),
                                       rtol=2e-5)
        scales.append(int(metrics["num_scales"]))
    # K = 16 updates, K' = floor(16 / (log2(128) + 1)) = 2: N = 11, 11, 21.
    assert scales == [int(ict_num_scales(k, 16)) for k in range(3)] == [11, 11, 21]


def test_contradictory_configs_are_refused_before_anything_runs(data_file, tmp_path):
    cases = {
        "precond": student_config(data_file, loss="denoising"),
        "process": student_config(data_file, loss="ict", **{"diffusion.process": "flow",
                                                            "diffusion.process_kwargs":
                                                            ml_collections.ConfigDict()}),
        "no teacher": student_config(data_file),
        "teacher for ict": student_config(data_file, loss="ict", teacher=str(tmp_path)),
        "too short": student_config(data_file, loss="ict"),  # 4 steps: no curriculum
        "kwargs": student_config(data_file, loss="ict", **{
            "train.num_steps": 16, "distill.loss_kwargs": ml_collections.ConfigDict(dict(nn=1))}),
        "num_scales": student_config(data_file, teacher=str(tmp_path), **{
            "distill.loss_kwargs": ml_collections.ConfigDict(dict(num_scales=1))}),
    }
    words = {"precond": "both or neither", "process": "process='edm'",
             "no teacher": "distill.teacher=WORKDIR", "teacher for ict": "read only by",
             "too short": "too short", "kwargs": "['nn'] unknown", "num_scales": "num_scales=1"}
    for name, config in cases.items():
        with pytest.raises(InputError, match=re.escape(words[name])):
            setup_of(config)


def test_a_teacher_that_does_not_fit_is_refused(data_file, teacher_dir, tmp_path):
    student = setup_of(student_config(data_file, teacher=teacher_dir))
    shape = dataclasses.replace(student, image_shape=(16, 16, 1))
    classes = setup_of(student_config(data_file, teacher=teacher_dir,
                                      **{"model.kwargs.num_classes": 5}))
    narrow = setup_of(tiny_config(data_file, **{
        "diffusion.process": "edm", "diffusion.prediction": "x0",
        "diffusion.process_kwargs": ml_collections.ConfigDict(dict(sigma_max=10.0))}))
    teacher = load_run(teacher_dir).parts
    for bad, parts, word in [(teacher, shape, "images of shape (8, 8, 1)"),
                             (teacher, classes, "num_classes=4"),
                             (narrow, student, "does not cover"),
                             (student, student, "a consistency model")]:
        with pytest.raises(InputError, match=re.escape(word)):
            check_teacher(bad, parts, "T")
    # Through the trainer: one line before anything is written.
    workdir = tmp_path / "cd"
    config = student_config(data_file, teacher=teacher_dir, **{"data.pad_to": 16})
    with pytest.raises(InputError, match="images of shape"):
        train_and_evaluate(config, str(workdir))
    assert not workdir.exists()


def test_old_configs_resume_and_ict_length_is_fixed(data_file, tmp_path):
    new = json.loads(tiny_config(data_file).to_json_best_effort())
    old = {k: v for k, v in new.items() if k != "distill"}
    old["diffusion"] = {k: v for k, v in new["diffusion"].items() if k != "loss"}
    assert config_differences(old, new) == []
    ict = json.loads(student_config(data_file, loss="ict").to_json_best_effort())
    longer = json.loads(student_config(data_file, loss="ict", **{
        "train.num_steps": 8}).to_json_best_effort())
    assert config_differences(ict, longer) == ["train.num_steps: 4 -> 8"]


def test_train_cli_with_a_missing_teacher_exits_2_and_writes_nothing(data_file, tmp_path):
    workdir = tmp_path / "cd"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "jaxgen.train", "--config", "jaxgen/configs/fashion_mnist_cd.py",
         "--workdir", str(workdir), f"--config.data.source={data_file}",
         "--config.data.batch_size=8", f"--config.distill.teacher={tmp_path / 'none'}"],
        cwd=repo, capture_output=True, text=True, timeout=300,
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert err.startswith("error: ") and "\n" not in err and "config.json: not found" in err, err
    assert not workdir.exists()


# ---------------------------------------------------------------- sCM in the trainer


def scm_config(data_file: str, teacher: str | None = None, **overrides):
    """The tiny U-Net as a TrigFlow model trained by sCM (no dropout, tangent warmup 0)."""
    return tiny_config(data_file, **{
        "diffusion.process": "trigflow",
        "diffusion.process_kwargs": ml_collections.ConfigDict(),
        "diffusion.precond": "trigflow",
        "diffusion.prediction": "velocity",
        "diffusion.time_scale": 1000.0,
        "diffusion.loss": "scm",
        "distill.teacher": teacher,
        "distill.loss_kwargs": ml_collections.ConfigDict(dict(warmup_steps=0)),
        "model.kwargs.dropout": 0.0,
        "model.kwargs.class_dropout": 0.0,
        **overrides,
    })


def pd_config(data_file: str, teacher: str, **overrides):
    """The tiny flow U-Net (the teacher's recipe) distilled from 4 DDIM steps to 2."""
    return tiny_config(data_file, **{
        "diffusion.loss": "pd", "distill.teacher": teacher, "distill.teacher_steps": 4,
        "model.kwargs.class_dropout": 0.0, **overrides})


def _x0_cond(batch):
    return jnp.asarray(batch["image"], jnp.float32) / 127.5 - 1, {"label": batch["label"]}


@pytest.mark.parametrize("distil", [False, True], ids=["sct", "scd"])
def test_scm_loss_at_step_0_is_the_pure_loss_with_jvp_tangent(data_file, teacher_dir, distil):
    config = scm_config(data_file, teacher_dir if distil else None)
    parts = loop.build(config)[0]
    parts = with_teacher(parts) if distil else parts
    state = init_state(parts, 0)
    batch = batch_of(parts)
    _, metrics = make_train_step(parts)(init_state(parts, 0), batch)
    teacher = load_run(teacher_dir)
    k_loss, _ = jax.random.split(jax.random.fold_in(state.rng, 0))
    x0, cond = _x0_cond(batch)
    # F(x_in, t) of the paper: the trainer's TrigFlow model is sigma_d F(x_t / sigma_d, 1000 t).
    raw = lambda p, x_in, t, c: parts.model_fn(p, 0.5 * x_in, t, c) / 0.5

    def with_logvar(p, x_in, t, c):
        v, u = parts.model_fn(p, 0.5 * x_in, t, c, return_logvar=True)
        return v / 0.5, u

    @jax.jit
    def pure(teacher_params):
        velocity = teacher_velocity(teacher.parts.model_fn, teacher_params, Flow(),
                                    prediction="velocity") if distil else None
        per_example, m = scm_loss(raw, state.params, x0, cond, k_loss, teacher=velocity,
                                  step=0, warmup_steps=0, raw_logvar_fn=with_logvar)
        return jnp.mean(per_example), m["tangent_norm"]

    want, norm = pure(teacher.params)
    np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=2e-5)
    np.testing.assert_allclose(float(metrics["tangent_norm"]), float(norm), rtol=2e-5)
    if distil:  # the teacher's weights make the tangent: the equality is the trainer reading them
        other, _ = pure(jax.tree.map(lambda p: p + 0.1, teacher.params))
        assert abs(float(other) - float(want)) > 1e-3 * float(want)


def test_scm_adaptive_weight_head_sits_beside_the_unchanged_model(data_file):
    parts = setup_of(scm_config(data_file, **{"optim.warmup_steps": 0}))
    bare = setup_of(scm_config(data_file, **{"distill.adaptive_weight": False}))
    state, plain = init_state(parts, 0), init_state(bare, 0)
    flat = flatten_dict(state.params)
    head = {k for k in flat if k[0] == "logvar_head"}
    assert {k for k in flat if k not in head} == set(flatten_dict(plain.params))
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 1))
    t = jnp.linspace(0.1, 1.5, 8)
    cond = {"label": jnp.arange(8, dtype=jnp.int32) % 4}
    # The wrapper computes the bare model's output; the head starts at u = 0 (unit weight).
    np.testing.assert_array_equal(parts.model_fn(state.params, x, t, cond),
                                  bare.model_fn(plain.params, x, t, cond))
    _, u = parts.model_fn(state.params, x, t, cond, return_logvar=True)
    np.testing.assert_array_equal(u, np.zeros(8))
    # d/du (e^-u mse + u) = 1 - mse != 0: the head learns from the first update.
    new, _ = make_train_step(parts)(state, batch_of(parts))
    moved = flatten_dict(new.params)[("logvar_head", "linear", "bias")]
    assert float(jnp.abs(moved).max()) > 1e-5


def test_scm_samples_at_the_papers_times(data_file, tmp_path):
    workdir = tmp_path / "sct"
    train_and_evaluate(scm_config(data_file, **{"train.num_steps": 2}), str(workdir))
    big_t = float(np.arctan(80.0 / 0.5))
    np.testing.assert_allclose(consistency_times(TrigFlow(0.5), 1), [big_t], rtol=1e-15)
    np.testing.assert_allclose(consistency_times(TrigFlow(0.5), 2), [big_t, 1.1], rtol=1e-15)
    assert np.all(np.diff(consistency_times(TrigFlow(0.5), 4)) < 0)
    out = tmp_path / "s.npz"
    assert sample_cli.main(["--workdir", str(workdir), "--steps", "1", "--num", "8",
                            "--seed", "3", "--out", str(out)]) == 0
    got = np.load(out)["arr_0"]
    run = load_run(workdir)
    noise = starting_noise(seed=3, num=8, shape=(8, 8, 1))
    x_T = 0.5 * np.sin(big_t) * noise
    labels = {"label": jnp.arange(8, dtype=jnp.int32) % 4}
    v = run.parts.model_fn(run.params, x_T, jnp.full((8,), big_t), labels)
    # sCM's f = cos(t) x_t - sin(t) sigma_d F
    assert_uint8_matches(got, np.cos(big_t) * x_T - np.sin(big_t) * v)
    for steps in (2, 4):
        out_n = tmp_path / f"s{steps}.npz"
        assert sample_cli.main(["--workdir", str(workdir), "--steps", str(steps), "--num", "8",
                                "--seed", "3", "--out", str(out_n)]) == 0
        assert np.mean(np.load(out_n)["arr_0"] != got) > 0.5



def test_scd_starts_from_a_flow_teacher_seen_as_trigflow(data_file, teacher_dir, tmp_path):
    """sCD on the teacher's own parametrisation (flow, velocity): the student starts as the
    teacher, its loss views it as a TrigFlow model at equal log-SNR, and it samples at the
    flow times of sCM's TrigFlow times, its consistency function being its x0 prediction."""
    config = tiny_config(data_file, **{
        "diffusion.loss": "scm", "distill.teacher": teacher_dir,
        "distill.init_from_teacher": True, "distill.adaptive_weight": True,
        "distill.loss_kwargs": ml_collections.ConfigDict(dict(warmup_steps=0)),
        "model.kwargs.dropout": 0.0, "model.kwargs.class_dropout": 0.0,
        "optim.warmup_steps": 0})
    parts = with_teacher(loop.build(config)[0])
    teacher = load_run(teacher_dir)
    state = init_state(parts, 0)
    head = ("logvar_head",)
    assert_same({k: v for k, v in state.params.items() if (k,) != head}, teacher.params)
    batch = batch_of(parts)
    k_loss, _ = jax.random.split(jax.random.fold_in(state.rng, 0))
    # A shifted teacher, so that sigma_d F- - dx_t/dt (zero at the start) is not.
    shifted = jax.tree.map(lambda p: p + 0.05, teacher.params)
    moved = dataclasses.replace(parts, frozen=shifted)
    _, metrics = make_train_step(moved)(init_state(moved, 0), batch)
    x0, cond = _x0_cond(batch)
    velocity = trigflow_velocity(parts.model_fn, Flow(), prediction="velocity")

    @jax.jit
    def pure(params):
        raw = lambda p, x_in, t, c: velocity(p, 0.5 * x_in, t, c) / 0.5

        def with_logvar(p, x_in, t, c):
            v, u = velocity(p, 0.5 * x_in, t, c, return_logvar=True)
            return v / 0.5, u

        t_v = teacher_velocity(teacher.parts.model_fn, shifted, Flow(), prediction="velocity")
        per_example, _ = scm_loss(raw, params, x0, cond, k_loss, teacher=t_v, step=0,
                                  warmup_steps=0, raw_logvar_fn=with_logvar)
        return jnp.mean(per_example)

    want = float(pure(state.params))
    assert want > 1e-4  # g is not negligible against its normalisation's c = 0.1
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=2e-5)
    # Sampling: sigma / alpha = 80 at one step, t / (1 - t) on the linear flow.
    np.testing.assert_allclose(consistency_times(Flow(), 1, scm_sigma_data=0.5), [80 / 81],
                               rtol=1e-5)
    two = consistency_times(Flow(), 2, scm_sigma_data=0.5)
    np.testing.assert_allclose(two[1] / (1 - two[1]), 0.5 * np.tan(1.1), rtol=1e-5)
    workdir = tmp_path / "scd_flow"
    train_and_evaluate(set_fields(config, {"train.num_steps": 1}), str(workdir))
    run = load_run(workdir)
    out = tmp_path / "s.npz"
    assert sample_cli.main(["--workdir", str(workdir), "--steps", "1", "--num", "8",
                            "--seed", "3", "--out", str(out)]) == 0
    t1 = 80 / 81
    x_T = t1 * starting_noise(seed=3, num=8, shape=(8, 8, 1))  # sigma(t) z on the flow
    labels = {"label": jnp.arange(8, dtype=jnp.int32) % 4}
    v = run.parts.model_fn(run.params, x_T, jnp.full((8,), t1, jnp.float32), labels)
    # The flow model's x0 = x_t - t v.
    assert_uint8_matches(np.load(out)["arr_0"], x_T - t1 * v)


def test_cd_starts_from_a_flow_teacher_seen_as_a_consistency_function(data_file, teacher_dir,
                                                                      tmp_path):
    """CD on the teacher's own parametrisation (flow, velocity): the student starts as the
    teacher, the loss sees it as CM's c_skip x + c_out F of the F of its x0 at equal
    log-SNR, on [0.002, 80], and it samples there by CM's Algorithm 1."""
    config = tiny_config(data_file, **{
        "diffusion.loss": "cd", "distill.teacher": teacher_dir,
        "distill.init_from_teacher": True, "distill.solver": "heun",
        "distill.target_ema": 0.95,
        "distill.loss_kwargs": ml_collections.ConfigDict(dict(num_scales=18)),
        "model.kwargs.dropout": 0.0, "model.kwargs.class_dropout": 0.0,
        "optim.warmup_steps": 0})
    parts = with_teacher(loop.build(config)[0])
    teacher = load_run(teacher_dir)
    state = init_state(parts, 0)
    assert_same(state.params, teacher.params)
    batch = batch_of(parts)
    # A shifted teacher, so that its ODE step moves off the student's trajectory.
    shifted = jax.tree.map(lambda p: p + 0.05, teacher.params)
    moved = dataclasses.replace(parts, frozen=shifted)
    _, metrics = make_train_step(moved)(init_state(moved, 0), batch)
    k_loss, _ = jax.random.split(jax.random.fold_in(state.rng, 0))
    x0, cond = _x0_cond(batch)
    f = consistency_view(parts.model_fn, Flow(), prediction="velocity", sigma_min=0.002)

    @jax.jit
    def pure(teacher_params):
        step = solver_step(teacher.parts.model_fn, teacher_params, Flow(),
                           prediction="velocity", solver="heun")
        per_example, _ = cd_loss(f, state.params, x0, cond, k_loss, teacher_step=step,
                                 target_params=state.params, process=EDM(), num_scales=18)
        return jnp.mean(per_example)

    want = float(pure(shifted))
    assert want > 1e-4
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=2e-5)
    workdir = tmp_path / "cd_flow"
    train_and_evaluate(set_fields(config, {"train.num_steps": 1}), str(workdir))
    run = load_run(workdir)
    out = tmp_path / "s.npz"
    assert sample_cli.main(["--workdir", str(workdir), "--steps", "1", "--num", "8",
                            "--seed", "3", "--out", str(out)]) == 0
    x_T = 80.0 * starting_noise(seed=3, num=8, shape=(8, 8, 1))  # EDM's sigma_max z
    labels = {"label": jnp.arange(8, dtype=jnp.int32) % 4}
    view = consistency_view(run.parts.model_fn, Flow(), prediction="velocity")
    assert_uint8_matches(np.load(out)["arr_0"],
                         view(run.params, x_T, jnp.full((8,), 80.0), labels))
    bad = {
        "spans noise levels [": set_fields(config, {
            "diffusion.process": "vp", "diffusion.process_kwargs": ml_collections.ConfigDict()}),
        "init_from_teacher is for": student_config(data_file, teacher="T", **{
            "distill.init_from_teacher": True}),
    }
    for word, bad_config in bad.items():
        with pytest.raises(InputError, match=re.escape(word)) as e:
            setup_of(bad_config)
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_scd_resume_is_bit_exact(data_file, teacher_dir, tmp_path):
    assert_resume_is_bit_exact(functools.partial(scm_config, data_file, teacher_dir), tmp_path)


# ---------------------------------------------------------------- progressive distillation


def test_pd_starts_from_the_teacher_and_its_loss_is_the_pure_loss(data_file, teacher_dir):
    parts = with_teacher(loop.build(pd_config(data_file, teacher_dir,
                                              **{"optim.warmup_steps": 0}))[0])
    teacher = load_run(teacher_dir)  # its first EMA, the default weights
    state = init_state(parts, 0)
    assert_same(state.params, teacher.params)
    assert_same(state.ema, {k: teacher.params for k in state.ema})
    # Step 1 (the student = its teacher: a loss of round-off only) moves the student;
    # step 2's loss is the pure loss of the moved student against the teacher.
    step = make_train_step(parts)
    state, _ = step(state, batch_of(parts))
    params_1 = jax.tree.map(np.array, state.params)
    _, metrics = step(state, batch_of(parts, start=8))
    k_loss, _ = jax.random.split(jax.random.fold_in(init_state(parts, 0).rng, 1))
    x0, cond = _x0_cond(batch_of(parts, start=8))

    @jax.jit
    def pure(teacher_params):
        per_example, _ = progressive_loss(
            parts.model_fn, params_1, x0, cond, k_loss, teacher_fn=teacher.parts.model_fn,
            teacher_params=teacher_params, process=Flow(), prediction="velocity",
            student_steps=2, ts=np.linspace(1.0, 0.0, 5), weighting="truncated_snr")
        return jnp.mean(per_example)

    want = float(pure(teacher.params))
    # The loss is a squared difference of order 1e-2 between two O(1) float32 estimates (one
    # student step, two teacher steps): rounding of 1e-7 in each, amplified 100 times by the
    # cancellation and twice by the square, and compiled in another order inside the step.
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-3)
    other = float(pure(jax.tree.map(lambda p: p * 0.9, teacher.params)))
    assert abs(other - want) > 0.1 * want


@pytest.mark.slow
def test_pd_resume_is_bit_exact_and_samples_with_ddim_on_the_halved_grid(data_file, teacher_dir,
                                                                          tmp_path):
    assert_resume_is_bit_exact(functools.partial(pd_config, data_file, teacher_dir), tmp_path)
    # The student's 2-step grid is every second time of the teacher's 4-step grid.
    np.testing.assert_allclose(progressive_times(Flow(), 2), progressive_times(Flow(), 4)[::2],
                               rtol=0, atol=1e-16)
    run = load_run(tmp_path / "b")
    key = jax.random.key_data(jax.random.key(3))
    got = np.concatenate(list(sample_images(run.parts, run.params, key, num=8, batch_size=8,
                                            solver="heun", steps=2)))  # solver not used
    labels = {"label": jnp.arange(8, dtype=jnp.int32) % 4}
    x, _ = sample(run.parts.model_fn, run.params, Flow(), key, (8, 8, 8, 1), cond=labels,
                  prediction="velocity", solver="ddim", steps=2, grid=np.linspace(1.0, 0.0, 3))
    np.testing.assert_array_equal(got, np.asarray(to_uint8(x)))


def test_pd_teacher_and_student_that_contradict_are_refused(data_file, teacher_dir, tmp_path):
    for steps in (3, 1, 0, -2):
        with pytest.raises(InputError, match=re.escape(f"distill.teacher_steps={steps!r}")):
            setup_of(pd_config(data_file, teacher_dir, **{"distill.teacher_steps": steps}))
    cases = {
        "model.kwargs.ch=16": pd_config(data_file, teacher_dir, **{"model.kwargs.ch": 16}),
        "diffusion.process='vp'": pd_config(data_file, teacher_dir, **{
            "diffusion.process": "vp", "diffusion.process_kwargs": ml_collections.ConfigDict()}),
        "images of shape (8, 8, 1)": pd_config(data_file, teacher_dir, **{"data.pad_to": 16}),
        "predicts 'eps'": pd_config(data_file, teacher_dir, **{"diffusion.prediction": "eps"}),
    }
    for word, config in cases.items():
        workdir = tmp_path / "pd"
        with pytest.raises(InputError, match=re.escape(word)) as e:
            train_and_evaluate(config, str(workdir))
        assert "\n" not in str(e.value) and not workdir.exists()


def test_scd_teacher_that_does_not_cover_sCMs_noise_levels_is_refused(data_file):
    narrow = setup_of(tiny_config(data_file, **{
        "diffusion.process": "edm", "diffusion.prediction": "x0",
        "diffusion.process_kwargs": ml_collections.ConfigDict(dict(sigma_max=10.0))}))
    student = setup_of(scm_config(data_file, teacher="T"))
    with pytest.raises(InputError, match=re.escape("does not cover the student's [0.002, 80]")):
        check_teacher(narrow, student, "T")
    bad = {
        "both to 'trigflow'": scm_config(data_file, **{"diffusion.precond": "none"}),
        "precond='consistency'": scm_config(data_file, **{"diffusion.precond": "consistency"}),
        "init_from_teacher is for": scm_config(data_file, **{"distill.init_from_teacher": True}),
        "distill.target_ema=0.9 is CD's": scm_config(data_file, **{"distill.target_ema": 0.9}),
        "distill.target_ema=1.0": student_config(data_file, teacher="T",
                                                 **{"distill.target_ema": 1.0}),
        "spans noise levels [0.002, 10]": scm_config(data_file, **{
            "diffusion.process": "edm", "diffusion.precond": "none",
            "diffusion.prediction": "x0",
            "diffusion.process_kwargs": ml_collections.ConfigDict(dict(sigma_max=10.0))}),
        "['nn'] unknown": scm_config(data_file, **{
            "distill.loss_kwargs": ml_collections.ConfigDict(dict(nn=1))}),
    }
    for word, config in bad.items():
        with pytest.raises(InputError, match=re.escape(word)):
            setup_of(config)
    for steps in (0, -1):
        with pytest.raises(InputError, match="steps >= 1"):
            consistency_times(TrigFlow(0.5), steps)
        with pytest.raises(InputError, match=r"steps=.* must be an int >= 1"):
            progressive_times(Flow(), steps)


def test_cli_pd_with_odd_teacher_steps_and_sample_with_zero_steps_exit_2(data_file, tmp_path):
    repo = Path(__file__).resolve().parents[1]
    workdir = tmp_path / "pd"
    runs = [
        ([sys.executable, "-m", "jaxgen.train", "--config", "jaxgen/configs/fashion_mnist_pd.py",
          "--workdir", str(workdir), f"--config.data.source={data_file}",
          f"--config.distill.teacher={tmp_path}", "--config.distill.teacher_steps=7"],
         "distill.teacher_steps=7"),
        ([sys.executable, "-m", "jaxgen.sample", "--workdir", str(tmp_path), "--steps", "0",
          "--out", str(tmp_path / "s.npz")], "--steps 0"),
    ]
    for argv, word in runs:
        proc = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=300)
        err = proc.stderr.strip()
        assert proc.returncode == 2, err
        assert err.startswith("error: ") and "\n" not in err and word in err, err
    assert not workdir.exists()


# ---------------------------------------------------------------- CD with an EMA target network


def _cd_steps(parts, n: int):
    """``n`` train steps on fixed batches: the states' (params, target) after each, and the
    metrics of each step."""
    state, step = init_state(parts, 0), make_train_step(parts)
    history, metrics = [(leaves(state.params), leaves(state.target))], []
    for i in range(n):
        state, m = step(state, batch_of(parts, start=8 * i))
        history.append((leaves(state.params), leaves(state.target)))
        metrics.append(float(m["loss"]))
    return state, history, metrics


def test_cd_target_ema_zero_is_the_online_target_bit_for_bit(data_file, teacher_dir):
    config = student_config(data_file, teacher=teacher_dir, **{"optim.warmup_steps": 0})
    parts = with_teacher(loop.build(config)[0])
    state, history, _ = _cd_steps(parts, 3)
    assert state.target is None  # the checkpoint tree is the one runs had before mu existed
    online = parts.loss_fn
    explicit = dataclasses.replace(parts, loss_fn=lambda m, p, *a, **k: online(
        m, p, *a, target_params=p, **k))  # theta- = stopgrad(theta) given by hand
    _, by_hand, _ = _cd_steps(explicit, 3)
    for (p, _), (q, _) in zip(history, by_hand, strict=True):
        for a, b in zip(p, q, strict=True):
            np.testing.assert_array_equal(a, b)


def test_cd_target_ema_follows_the_hand_iterated_ema(data_file, teacher_dir):
    mu = 0.95
    config = student_config(data_file, teacher=teacher_dir, **{"optim.warmup_steps": 0,
                                                               "distill.target_ema": mu})
    parts = with_teacher(loop.build(config)[0])
    state, history, metrics = _cd_steps(parts, 3)
    target = history[0][0]  # theta-_0 = theta_0
    np.testing.assert_array_equal(np.concatenate([a.ravel() for a in history[0][1]]),
                                  np.concatenate([a.ravel() for a in target]))
    for params, got in history[1:]:
        # theta- <- mu theta- + (1 - mu) theta (Song et al. 2023, Alg. 2), in float32; XLA may
        # fuse the two products into one FMA: 1 ulp of the largest term.
        target = [np.float32(1 - mu) * p + np.float32(1 - (1 - mu)) * t
                  for p, t in zip(params, target, strict=True)]
        for a, b in zip(got, target, strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-7, atol=1e-8)
    assert not np.allclose(history[-1][1][0], history[-1][0][0])  # a lagging target, not theta
    # The loss of step 2 reads the target: the pure CD loss with theta-_1 as target_params.
    teacher = load_run(teacher_dir)
    params_1 = jax.tree.unflatten(jax.tree.structure(state.params), history[1][0])
    target_1 = jax.tree.unflatten(jax.tree.structure(state.params), history[1][1])
    k_loss, _ = jax.random.split(jax.random.fold_in(state.rng, 1))
    x0, cond = _x0_cond(batch_of(parts, start=8))

    @jax.jit
    def pure(target_params):
        step = solver_step(teacher.parts.model_fn, teacher.params, teacher.parts.process,
                           prediction="velocity", solver="heun")
        per_example, _ = cd_loss(parts.model_fn, params_1, x0, cond, k_loss, teacher_step=step,
                                 target_params=target_params, process=EDM(**EDM_KWARGS),
                                 num_scales=18)
        return jnp.mean(per_example)

    np.testing.assert_allclose(metrics[1], float(pure(target_1)), rtol=2e-5)
    assert abs(float(pure(params_1)) - metrics[1]) > 1e-4 * metrics[1]


@pytest.mark.slow
def test_cd_target_ema_resume_is_bit_exact(data_file, teacher_dir, tmp_path):
    make = lambda **over: student_config(data_file, teacher=teacher_dir,
                                         **{"distill.target_ema": 0.5, **over})
    assert_resume_is_bit_exact(make, tmp_path, fields=("params", "ema", "opt_state", "target"))


@flax.struct.dataclass
class _StateBeforeTarget:
    """:class:`jaxgen.train.TrainState` as runs saved it before ``target`` existed."""

    step: jax.Array
    params: Any
    ema: dict
    opt_state: Any
    rng: jax.Array
    constants: Any = None
    phema: Any = None


def test_checkpoints_saved_before_the_target_field_still_restore(data_file, tmp_path):
    parts = setup_of(tiny_config(data_file))
    state = init_state(parts, 0)
    old = _StateBeforeTarget(**{f: getattr(state, f) for f in _StateBeforeTarget.__annotations__})
    ckpt = Checkpointer(tmp_path / "checkpoints")
    ckpt.save(2, old, {"data": None, "train_seconds": 1.0})
    ckpt.close()
    reader = Checkpointer(tmp_path / "checkpoints", writable=False)
    restored, extra, step = reader.restore_latest(abstract_state(parts))
    reader.close()
    assert step == 2 and extra["train_seconds"] == 1.0 and restored.target is None
    assert restored.phema is None and restored.constants is None
    assert_same(restored.params, state.params)
