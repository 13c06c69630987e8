"""Rectified-flow reflow and DMD2 through the trainer, the checkpoints and the sampler CLI."""

from __future__ import annotations

import dataclasses
import functools
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from test_train_consistency import assert_resume_is_bit_exact, starting_noise
from train_fixtures import (
    assert_same,
    assert_uint8_matches,
    batch_of,
    leaves,
    setup_of,
    tiny_config,
)

from jaxgen import sample as sample_cli
from jaxgen import sampling
from jaxgen.diffusion import Flow
from jaxgen.diffusion.distillation import (
    dmd_loss,
    fake_score_loss,
    few_step_generator,
    reflow_loss,
)
from jaxgen.errors import InputError
from jaxgen.sampling.teacher import reflow_pairs
from jaxgen.train import ema_decay, init_state, load_run, loop, make_train_step, train_and_evaluate
from jaxgen.train import state as state_module
from jaxgen.train.consistency import check_teacher, with_teacher

pytestmark = pytest.mark.usefixtures("module_compile_cache")


# test_train's tiny U-Net with one resolution level: DMD2's step holds five passes of it
# (generator, real and fake scores, and two backward), so it compiles in half the time.
ONE_LEVEL = {"model.kwargs.ch_mult": (1,)}


@pytest.fixture(scope="module")
def teacher_dir(data_file, tmp_path_factory) -> str:
    """A tiny flow-matching run (velocity prediction, 4 classes) trained for 2 steps."""
    workdir = tmp_path_factory.mktemp("teacher")
    train_and_evaluate(tiny_config(data_file, **{"train.num_steps": 2, **ONE_LEVEL}),
                       str(workdir))
    return str(workdir)


def reflow_config(data_file: str, teacher: str, **overrides):
    """The teacher's recipe reflowed through 2 Heun steps of its ODE (no dropout)."""
    return tiny_config(data_file, **{
        "diffusion.loss": "reflow", "distill.teacher": teacher, "distill.solver": "heun",
        "distill.teacher_steps": 2, "model.kwargs.dropout": 0.0,
        "model.kwargs.class_dropout": 0.0, **ONE_LEVEL, **overrides})


def dmd2_config(data_file: str, teacher: str, **overrides):
    """The teacher's recipe as a DMD2 generator, 2 fake-score updates per generator update;
    no warmup (the generator's first update moves it)."""
    return tiny_config(data_file, **{
        "diffusion.loss": "dmd2", "distill.teacher": teacher, "distill.fake_updates": 2,
        "model.kwargs.dropout": 0.0, "model.kwargs.class_dropout": 0.0, "eval.steps": 1,
        "optim.warmup_steps": 0, **ONE_LEVEL, **overrides})


def _keys(state, step: int, n: int):
    """The loss's keys at ``step``: ``k_loss = split(fold_in(rng, step))[0]``, split ``n`` ways."""
    k_loss, _ = jax.random.split(jax.random.fold_in(state.rng, step))
    return jax.random.split(k_loss, n)


def _x0_cond(batch):
    return jnp.asarray(batch["image"], jnp.float32) / 127.5 - 1, {"label": batch["label"]}


# ---------------------------------------------------------------- reflow


def test_reflow_starts_from_the_teacher_and_its_loss_is_the_pure_loss_on_fresh_pairs(
        data_file, teacher_dir):
    parts = with_teacher(loop.build(reflow_config(data_file, teacher_dir))[0])
    teacher = load_run(teacher_dir)
    state = init_state(parts, 0)
    assert_same(state.params, teacher.params)
    assert state.fake_params is None and state.fake_opt_state is None
    batch = batch_of(parts)
    _, metrics = make_train_step(parts)(init_state(parts, 0), batch)
    k_pairs, k_t = _keys(state, 0, 2)
    _, cond = _x0_cond(batch)

    @jax.jit
    def pure(teacher_params):
        # Algorithm 1: z, and x0 = the teacher's ODE (2 Heun steps) from z, then flow matching
        z, x0 = reflow_pairs(teacher.parts.model_fn, teacher_params, Flow(), k_pairs,
                             (8, 8, 8, 1), prediction="velocity", solver="heun", steps=2,
                             cond=cond)
        per_example, _ = reflow_loss(parts.model_fn, state.params, z, x0, cond, k_t,
                                     process=Flow(), prediction="velocity")
        return jnp.mean(per_example)

    want = float(pure(teacher.params))
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
    # The pairs come from the teacher's weights: the equality is the trainer reading them.
    other = float(pure(jax.tree.map(lambda p: p + 0.1, teacher.params)))
    assert abs(other - want) > 1e-2 * want


# ---------------------------------------------------------------- DMD2


@pytest.mark.slow
def test_dmd2_two_time_scale_updates_are_the_hand_called_optax_updates(data_file, teacher_dir):
    parts = with_teacher(loop.build(dmd2_config(data_file, teacher_dir))[0])
    teacher = load_run(teacher_dir)
    state0 = init_state(parts, 0)
    # Generator, its EMAs and the fake score all start as the teacher.
    for tree in (state0.params, state0.fake_params, *state0.ema.values()):
        assert_same(tree, teacher.params)
    tx, fake_tx = parts.optimizer, parts.fake_optimizer
    generator = few_step_generator(parts.model_fn, Flow(), prediction="velocity")
    kept = lambda tree: jax.tree.map(np.array, tree)  # copies: the step donates its state
    s0 = kept(state0)
    step = make_train_step(parts)

    def fake_objective(phi, theta, batch, k_z, k_fake):
        x0, cond = _x0_cond(batch)
        x = generator(theta, jax.random.normal(k_z, x0.shape), cond)
        per_example, _ = fake_score_loss(parts.model_fn, phi, x, cond, k_fake, process=Flow(),
                                         prediction="velocity")
        return jnp.mean(per_example)

    def generator_objective(theta, phi, batch, k_z, k_gen):
        x0, cond = _x0_cond(batch)
        per_example, _ = dmd_loss(generator, theta, jax.random.normal(k_z, x0.shape), cond,
                                  k_gen, real_fn=teacher.parts.model_fn,
                                  real_params=teacher.params, fake_fn=parts.model_fn,
                                  fake_params=phi, process=Flow(), prediction="velocity")
        return jnp.mean(per_example)

    grads_of = {f: jax.jit(jax.value_and_grad(f)) for f in (fake_objective, generator_objective)}

    def hand_update(transform, objective, params, opt_state, *args):
        value, grads = grads_of[objective](params, *args)
        updates, opt_state = transform.update(grads, opt_state, params)
        return float(value), optax.apply_updates(params, updates), opt_state

    # Adam's first step is lr g / (|g| + eps): in an element whose gradient is near eps = 1e-8
    # the gradient's rounding (the train step and these functions compile the same sums in
    # other orders) moves the update by up to ~1e-3 of lr = 1e-3.
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)

    # Step 0: the fake score's alone (fake_updates = 2: the generator's turn is step 1).
    batch0 = batch_of(parts)
    state1, m0 = step(state0, batch0)
    s1 = kept(state1)
    k_z, k_fake, _ = _keys(s0, 0, 3)
    want, phi1, _ = hand_update(fake_tx, fake_objective, s0.fake_params, s0.fake_opt_state,
                                s0.params, batch0, k_z, k_fake)
    np.testing.assert_allclose(float(m0["fake_loss"]), want, rtol=1e-5)
    assert float(m0["generator_loss"]) == float(m0["grad_norm"]) == 0.0
    np.testing.assert_allclose(float(m0["loss"]), want, rtol=1e-5)
    for a, b in zip(leaves(s1.fake_params), leaves(phi1), strict=True):
        close(a, b)
    assert not np.array_equal(leaves(s1.fake_params)[0], leaves(s0.fake_params)[0])
    # The generator, its optimizer state and its EMAs stand still, bit for bit.
    assert_same(s1.params, s0.params)
    assert_same(s1.opt_state, s0.opt_state)
    assert_same(s1.ema, s0.ema)

    # Step 1: the generator's turn, against the fake score of step 0; the fake score again.
    batch1 = batch_of(parts, start=8)
    state2, m1 = step(state1, batch1)
    s2 = kept(state2)
    k_z, k_fake, k_gen = _keys(s0, 1, 3)
    want_gen, theta1, _ = hand_update(tx, generator_objective, s0.params, s0.opt_state,
                                      s1.fake_params, batch1, k_z, k_gen)
    want_fake, phi2, _ = hand_update(fake_tx, fake_objective, s1.fake_params, s1.fake_opt_state,
                                     s1.params, batch1, k_z, k_fake)
    assert want_gen > 0  # the fake score has moved off the teacher: a non-zero DM gradient
    np.testing.assert_allclose(float(m1["generator_loss"]), want_gen, rtol=1e-4)
    np.testing.assert_allclose(float(m1["fake_loss"]), want_fake, rtol=1e-5)
    np.testing.assert_allclose(float(m1["loss"]), want_gen + want_fake, rtol=1e-5)
    for got, want_tree in ((s2.params, theta1), (s2.fake_params, phi2)):
        for a, b in zip(leaves(got), leaves(want_tree), strict=True):
            close(a, b)
    # The EMAs average the generator after its first update (TF-style warmup decay).
    d = float(ema_decay(0.9, jnp.asarray(1), True))
    for a, p, e in zip(leaves(s2.ema[repr(0.9)]), leaves(s2.params), leaves(s0.params),
                       strict=True):
        close(a, d * e + (1 - d) * p)
    assert int(s2.opt_state.gradient_step) == 1 and int(s2.fake_opt_state.gradient_step) == 2


def test_dmd2_step_without_cond_matches_the_cond(data_file, teacher_dir, monkeypatch):
    # On CPU the step computes the generator's terms every step and drops them off its
    # turns (a gradient inside lax.cond is ~10x slower there); under lax.cond, as on an
    # accelerator, the same three steps (turns at step 1) must give the same numbers.
    parts = with_teacher(loop.build(dmd2_config(data_file, teacher_dir))[0])
    assert not state_module.gradients_under_cond(parts.mesh)  # the tests run on CPU
    runs = {}
    for under_cond in (False, True):
        monkeypatch.setattr(state_module, "gradients_under_cond", lambda mesh, c=under_cond: c)
        step, state, metrics = make_train_step(parts), init_state(parts, 0), []
        for i in range(3):
            state, m = step(state, batch_of(parts, start=8 * i))
            metrics.append({k: float(v) for k, v in m.items()})
        runs[under_cond] = (jax.tree.map(np.array, state), metrics)
    (a, ma), (b, mb) = runs[False], runs[True]
    # Off the generator's turns (steps 0 and 2) its terms are exactly 0 and the loss is the
    # fake score's alone, bit for bit; on its turn they equal the cond's (compared below).
    for m in (ma[0], ma[2]):
        assert m["generator_loss"] == m["dm_grad_norm"] == m["grad_norm"] == 0.0
        assert m["loss"] == m["fake_loss"]
    assert ma[1]["generator_loss"] != 0.0 and ma[1]["dm_grad_norm"] != 0.0
    for x, y in zip(ma, mb, strict=True):
        assert x.keys() == y.keys()
        for k in x:  # the two programs sum in their own orders: float32 rounding apart
            np.testing.assert_allclose(x[k], y[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # Adam's first steps are lr g / (|g| + eps): rounding of g near eps moves an element by
    # up to ~1e-3 of lr (as in the hand-called test above).
    for field in ("params", "opt_state", "fake_params", "fake_opt_state", "ema"):
        for x, y in zip(leaves(getattr(a, field)), leaves(getattr(b, field)), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=field)


@pytest.mark.slow
def test_dmd2_resume_is_bit_exact_and_samples_g_of_noise_in_one_step(data_file, teacher_dir,
                                                                     tmp_path):
    # 4 steps, turns at steps 1 and 3; the resumed run stops at 2 between them.
    assert_resume_is_bit_exact(functools.partial(dmd2_config, data_file, teacher_dir), tmp_path,
                               fields=("params", "ema", "opt_state", "fake_params",
                                       "fake_opt_state"))
    workdir = tmp_path / "b"
    out = tmp_path / "s.npz"
    assert sample_cli.main(["--workdir", str(workdir), "--steps", "1", "--num", "8",
                            "--seed", "3", "--out", str(out)]) == 0
    got = np.load(out)["arr_0"]
    run = load_run(workdir)
    labels = {"label": jnp.arange(8, dtype=jnp.int32) % 4}
    noise = starting_noise(seed=3, num=8, shape=(8, 8, 1))
    x = few_step_generator(run.parts.model_fn, Flow(), prediction="velocity")(run.params, noise,
                                                                              labels)
    assert_uint8_matches(got, x)
    with pytest.raises(InputError, match=re.escape("a 1-step generator")) as e:
        sample_cli.main(["--workdir", str(workdir), "--steps", "2", "--num", "8",
                         "--out", str(tmp_path / "s2.npz")])
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_two_step_dmd2_trains_on_its_backward_simulation_and_samples_in_two_steps(
        data_file, teacher_dir, tmp_path):
    config = dmd2_config(data_file, teacher_dir, **{"distill.generator_steps": 2,
                                                    "eval.steps": 2, "train.num_steps": 2})
    parts = with_teacher(loop.build(config)[0])
    state = init_state(parts, 0)
    s0 = jax.tree.map(np.array, state)
    batch = batch_of(parts)
    _, m0 = make_train_step(parts)(state, batch)
    # Step 0 is the fake score's: its loss on the 2-step generator's backward-simulated
    # sample (times 1 and 0.5), the simulation keyed by fold_in(k_loss, 3).
    k_loss, _ = jax.random.split(jax.random.fold_in(s0.rng, 0))
    k_z, k_fake, _ = jax.random.split(k_loss, 3)
    x0, cond = _x0_cond(batch)
    z = jax.random.normal(k_z, x0.shape)
    fake_of = lambda x: float(jnp.mean(fake_score_loss(
        parts.model_fn, s0.fake_params, x, cond, k_fake, process=Flow(),
        prediction="velocity")[0]))
    two = few_step_generator(parts.model_fn, Flow(), prediction="velocity", ts=(1.0, 0.5))
    want = fake_of(two(s0.params, z, cond, jax.random.fold_in(k_loss, 3)))
    np.testing.assert_allclose(float(m0["fake_loss"]), want, rtol=1e-5)
    one = few_step_generator(parts.model_fn, Flow(), prediction="velocity")
    assert abs(fake_of(one(s0.params, z, cond)) - want) > 1e-3 * want  # the simulation counts

    workdir = tmp_path / "dmd2"
    train_and_evaluate(config, str(workdir))  # its in-loop grid samples in 2 steps
    out = tmp_path / "s.npz"
    assert sample_cli.main(["--workdir", str(workdir), "--steps", "2", "--num", "8",
                            "--seed", "3", "--out", str(out)]) == 0
    got = np.load(out)["arr_0"]
    run = load_run(workdir)
    labels = {"label": jnp.arange(8, dtype=jnp.int32) % 4}
    x, _ = sampling.consistency_sample(
        run.parts.model_fn, run.params, Flow(), jax.random.key_data(jax.random.key(3)),
        (8, 8, 8, 1), ts=(1.0, 0.5), cond=labels, prediction="velocity", clean_output=True)
    assert_uint8_matches(got, x)
    with pytest.raises(InputError, match=re.escape("a 2-step generator")) as e:
        sample_cli.main(["--workdir", str(workdir), "--steps", "1", "--num", "8",
                         "--out", str(tmp_path / "s1.npz")])
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- refusals


def test_reflow_and_dmd2_options_that_contradict_are_refused(data_file):
    vp = {"diffusion.process": "vp", "diffusion.process_kwargs": ml_collections.ConfigDict()}
    cases = {
        "diffusion.process='flow' (got 'vp')": reflow_config(data_file, "T", **vp),
        "distill.teacher_steps=0": reflow_config(data_file, "T", **{"distill.teacher_steps": 0}),
        "solver='euler_maruyama'": reflow_config(data_file, "T",
                                                 **{"distill.solver": "euler_maruyama"}),
        "distill.fake_updates=0": dmd2_config(data_file, "T", **{"distill.fake_updates": 0}),
        "eval.steps=2": dmd2_config(data_file, "T", **{"eval.steps": 2}),
        "distill.generator_steps=0": dmd2_config(data_file, "T", **{
            "distill.generator_steps": 0, "eval.steps": 0}),
        "distill.generator_steps=2 is a DMD2": reflow_config(data_file, "T", **{
            "distill.generator_steps": 2}),
        "diffusion.prediction='eps'": dmd2_config(data_file, "T",
                                                  **{"diffusion.prediction": "eps"}),
        "distill.real_guidance=2.0 guides": reflow_config(data_file, "T",
                                                          **{"distill.real_guidance": 2.0}),
        "['nn'] unknown": dmd2_config(data_file, "T", **{
            "distill.loss_kwargs": ml_collections.ConfigDict(dict(nn=1))}),
        "no teacher": dmd2_config(data_file, None),
    }
    words = {**{k: k for k in cases}, "no teacher": "distill.teacher=WORKDIR"}
    for name, config in cases.items():
        with pytest.raises(InputError, match=re.escape(words[name])) as e:
            setup_of(config)
        assert "\n" not in str(e.value)


def test_a_teacher_of_another_shape_or_process_is_refused_before_anything_is_written(
        data_file, teacher_dir, tmp_path):
    edm = {"diffusion.process": "edm", "diffusion.prediction": "x0",
           "diffusion.process_kwargs": ml_collections.ConfigDict()}
    cases = [
        ("images of shape (8, 8, 1)", dmd2_config(data_file, teacher_dir, **{"data.pad_to": 16})),
        ("diffusion.process='edm' contradicts", dmd2_config(data_file, teacher_dir, **edm)),
        ("images of shape (8, 8, 1)", reflow_config(data_file, teacher_dir,
                                                    **{"data.pad_to": 16})),
        ("model.kwargs.ch=16", reflow_config(data_file, teacher_dir, **{"model.kwargs.ch": 16})),
    ]
    for word, config in cases:
        workdir = tmp_path / "student"
        with pytest.raises(InputError, match=re.escape(word)) as e:
            train_and_evaluate(config, str(workdir))
        assert "\n" not in str(e.value) and not workdir.exists()
    # A DMD2 run is no teacher (it has no score); guidance needs a teacher with classes.
    student = setup_of(dmd2_config(data_file, teacher_dir))
    with pytest.raises(InputError, match="a DMD2 generator"):
        check_teacher(student, student, "T")
    teacher = load_run(teacher_dir)
    unconditional = teacher._replace(parts=dataclasses.replace(
        teacher.parts, module=teacher.parts.module.clone(num_classes=0)))
    guided = loop.build(dmd2_config(data_file, teacher_dir, **{"distill.real_guidance": 2.0}))[0]
    with pytest.raises(InputError, match=re.escape("has no classes: set it to 1")):
        with_teacher(guided, teacher=unconditional)


def test_cli_exits_2_in_one_line_for_reflow_off_a_flow_and_a_teacher_of_another_shape(
        data_file, teacher_dir, tmp_path):
    config = tmp_path / "reflow_vp.py"  # the reflow recipe on VP (its flow kwargs dropped)
    config.write_text("import ml_collections\nfrom jaxgen.configs import fashion_mnist_reflow\n\n"
                      "def get_config():\n    c = fashion_mnist_reflow.get_config()\n"
                      "    c.diffusion.process = 'vp'\n"
                      "    c.diffusion.process_kwargs = ml_collections.ConfigDict()\n"
                      "    return c\n")
    runs = [
        (str(config), [], "diffusion.process='flow' (got 'vp')"),
        ("jaxgen/configs/fashion_mnist_dmd2.py", ["--config.data.pad_to=16"],
         "images of shape (8, 8, 1)"),  # the teacher's 8x8 vs the student's padded 16x16
    ]
    for recipe, extra, word in runs:
        workdir = tmp_path / "student"
        proc = subprocess.run(
            [sys.executable, "-m", "jaxgen.train", "--config", recipe, "--workdir", str(workdir),
             f"--config.data.source={data_file}", f"--config.distill.teacher={teacher_dir}",
             *extra],
            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
        )
        # Orbax logs that it opens the teacher's checkpoints read-only (absl warnings).
        err = "\n".join(line for line in proc.stderr.strip().splitlines()
                        if not line.startswith("WARNING:absl:"))
        assert proc.returncode == 2, err
        assert err.startswith("error: ") and "\n" not in err and word in err, err
        assert not workdir.exists()
