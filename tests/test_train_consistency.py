"""Consistency training and distillation through the trainer, the sampler and the CLIs."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from train_fixtures import assert_same, batch_of, setup_of, tiny_config

from jaxgen import sample as sample_cli
from jaxgen.diffusion import EDM
from jaxgen.diffusion.consistency import cd_loss, ict_loss, ict_num_scales
from jaxgen.errors import InputError
from jaxgen.sampling import to_uint8
from jaxgen.sampling.teacher import solver_step
from jaxgen.train import init_state, load_run, loop, make_train_step, train_and_evaluate
from jaxgen.train.consistency import check_teacher, with_teacher
from jaxgen.train.workdir import config_differences

pytestmark = pytest.mark.usefixtures("module_compile_cache")

EDM_KWARGS = dict(sigma_min=0.002, sigma_max=80.0)


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
    key = jax.random.key_data(jax.random.key(3))
    noise = [jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), 0), (8, 8, 1))
             for i in range(8)]
    x_T = 80.0 * jnp.stack(noise)
    labels = {"label": jnp.arange(8, dtype=jnp.int32) % 4}
    f = run.parts.model_fn(run.params, x_T, jnp.full((8,), 80.0), labels)
    want = np.asarray(to_uint8(f))
    assert np.abs(got.astype(int) - want).max() <= 1  # compiled vs eager rounding
    assert np.mean(got == want) > 0.99
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
