"""Distillation objectives: progressive distillation, rectified-flow reflow, DMD2.

Each loss returns per-example values ``[B]`` and a metrics dict; what a
trainer must hold besides the student (teacher weights, a fake-score
network) is named in each docstring.

- Progressive distillation (Salimans & Ho 2022, Algorithm 2): a student
  learns to take in one DDIM step what the teacher takes in two.
- Reflow (Liu et al. 2023, Algorithm 1): flow matching on (noise, sample)
  pairs joined by the teacher's ODE (:func:`jaxgen.sampling.teacher.reflow_pairs`),
  which straightens the flow.
- DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation"): a
  one- or few-step generator trained with the distribution-matching gradient of DMD
  (Yin et al. 2023, Eqs. 7-8), the difference of a frozen real score and a
  fake score that tracks the generator's samples by denoising (Eq. 6),
  without DMD's regression loss; the GAN term of DMD2 is not included.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion.losses import TIME_SAMPLERS, resolve_option
from jaxgen.diffusion.predictions import bcast, check_prediction, from_x0_eps, to_x0_eps
from jaxgen.errors import InputError


def _per_example_mse(a, b):
    return jnp.mean(jnp.square(a - b).reshape(a.shape[0], -1), axis=1)


def _x0_eps(fn, params, x_t, t, cond, prediction, process):
    return to_x0_eps(fn(params, x_t, t, cond), prediction, x_t=x_t, t=t, process=process)


# ---------------------------------------------------------------- progressive distillation


def progressive_times(process, steps: int) -> np.ndarray:
    """The ``steps + 1`` times of an ``N``-step sampler in progressive distillation.

    Uniform in ``t`` from ``t_max`` to 0 (Salimans & Ho 2022, Algorithm 2:
    ``t = i / N``), so the student's grid of ``N`` steps is every second time of its
    teacher's grid of ``2N``.
    """
    if not isinstance(steps, int | np.integer) or steps < 1:
        raise InputError(f"steps={steps!r} must be an int >= 1.")
    return np.linspace(process.t_max, 0.0, int(steps) + 1)


def progressive_target(
    teacher_fn: Callable, teacher_params, z_t, t, t_mid, t_next, cond, *, process, prediction: str
):
    """The ``x0`` target of progressive distillation (Salimans & Ho 2022, Algorithm 2).

    Two teacher DDIM steps (Song et al. 2021, Eq. 12) ``t -> t' -> t''`` give
    ``z_t''``; the target is the ``x0`` with which *one* DDIM step ``t -> t''`` lands
    there: ``x~ = (z_t'' - r z_t) / (alpha_t'' - r alpha_t)`` with ``r = sigma_t'' / sigma_t``.

    Args:
      teacher_fn: ``teacher_fn(params, x_t, t, cond) -> prediction``.
      teacher_params: its weights.
      z_t: noisy inputs ``[B, ...]`` at times ``t``.
      t, t_mid, t_next: ``[B]`` times ``t > t' > t'' >= 0``.
      cond: conditioning pytree or ``None``.
      process: the process of teacher and student.
      prediction: what the teacher predicts.

    Returns:
      ``x~``, shaped like ``z_t``.
    """
    x0, eps = _x0_eps(teacher_fn, teacher_params, z_t, t, cond, prediction, process)
    z_mid = bcast(process.alpha(t_mid), z_t) * x0 + bcast(process.sigma(t_mid), z_t) * eps
    x0, eps = _x0_eps(teacher_fn, teacher_params, z_mid, t_mid, cond, prediction, process)
    z_next = bcast(process.alpha(t_next), z_t) * x0 + bcast(process.sigma(t_next), z_t) * eps
    ratio = bcast(process.sigma(t_next) / process.sigma(t), z_t)
    return (z_next - ratio * z_t) / (bcast(process.alpha(t_next), z_t) - ratio * bcast(
        process.alpha(t), z_t))


def progressive_loss(
    model_fn: Callable,
    params,
    x0,
    cond,
    key,
    *,
    teacher_fn: Callable,
    teacher_params,
    process,
    prediction: str,
    teacher_prediction: str | None = None,
    student_steps: int,
    ts=None,
    weighting: str = "truncated_snr",
):
    """Progressive distillation (Salimans & Ho 2022, Algorithm 2): ``N`` student steps from ``2N``.

    ``i ~ U{0..N-1}``, ``t = ts[2i]``, ``t' = ts[2i+1]``, ``t'' = ts[2i+2]`` on the
    teacher's grid of ``2N`` steps; ``z_t = alpha_t x0 + sigma_t eps``; the loss is
    ``w(lambda_t) ||x~ - x^_theta(z_t)||^2`` (mean over elements) with ``x~`` from
    :func:`progressive_target` and ``w = max(SNR, 1)`` ("truncated SNR", Sec. 4)
    or ``SNR + 1``. The trainer holds the teacher's weights and, after each
    round, makes the student the next teacher with ``student_steps`` halved.

    Args:
      model_fn: the student ``model_fn(params, x_t, t, cond) -> prediction``.
      params: student parameters.
      x0: clean data ``[B, ...]``.
      cond: conditioning pytree with leading axis ``B``, or ``None``.
      key: PRNG key for the step index and the noise.
      teacher_fn, teacher_params: the teacher and its weights.
      process: the process of teacher and student.
      prediction: what the student predicts.
      teacher_prediction: what the teacher predicts (default: ``prediction``).
      student_steps: ``N``, the student's number of sampling steps.
      ts: the teacher's ``2N + 1`` decreasing times (e.g.
        ``jaxgen.sampling.make_grid(grid, process, 2 * N)``); default
        :func:`progressive_times` ``(process, 2N)``, Salimans & Ho's ``t = i / N``.
      weighting: ``"truncated_snr"`` or ``"snr_plus_one"``.

    Returns:
      ``(per_example [B], {"loss"})``.
    """
    check_prediction(prediction)
    teacher_prediction = teacher_prediction or prediction
    check_prediction(teacher_prediction, "teacher_prediction")
    if not isinstance(student_steps, int) or student_steps < 1:
        raise InputError(f"student_steps={student_steps!r} must be an int >= 1.")
    if weighting not in ("truncated_snr", "snr_plus_one"):
        raise InputError(f"weighting={weighting!r}: use 'truncated_snr' or 'snr_plus_one'.")
    n = student_steps
    ts = progressive_times(process, 2 * n) if ts is None else np.asarray(ts, np.float64)
    if ts.shape != (2 * n + 1,) or not np.all(np.diff(ts) < 0) or ts[-1] < 0:
        raise InputError(
            f"ts has shape {ts.shape}: the teacher's grid for student_steps={n} needs "
            f"{2 * n + 1} strictly decreasing times >= 0."
        )
    ts = jnp.asarray(ts, jnp.result_type(float))
    k_i, k_eps = jax.random.split(key)
    i = jax.random.randint(k_i, (x0.shape[0],), 0, n)
    t, t_mid, t_next = ts[2 * i], ts[2 * i + 1], ts[2 * i + 2]
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    z_t = bcast(process.alpha(t), x0) * x0 + bcast(process.sigma(t), x0) * eps
    target = jax.lax.stop_gradient(progressive_target(
        teacher_fn, teacher_params, z_t, t, t_mid, t_next, cond,
        process=process, prediction=teacher_prediction,
    ))
    x0_hat, _ = _x0_eps(model_fn, params, z_t, t, cond, prediction, process)
    snr = jnp.exp(process.logsnr(t))
    w = jnp.maximum(snr, 1.0) if weighting == "truncated_snr" else snr + 1.0
    per_example = w * _per_example_mse(x0_hat, target)
    return per_example, {"loss": jnp.mean(per_example)}


# ---------------------------------------------------------------- reflow


def reflow_loss(
    model_fn: Callable,
    params,
    noise,
    x0,
    cond,
    key,
    *,
    process,
    prediction: str = "velocity",
    time_sampler: str | Callable = "uniform",
):
    """Flow matching on teacher-coupled pairs (Liu et al. 2023, Algorithm 1, "Reflow").

    ``x_t = alpha_t x0 + sigma_t noise`` with the *paired* noise (not a fresh
    draw) and target the prediction implied by ``(x0, noise)``; on
    ``Flow("linear")`` with ``prediction="velocity"`` that is ``noise - x0``, Eq. 1.

    Args:
      model_fn: ``model_fn(params, x_t, t, cond) -> prediction``.
      params: student parameters (initialised from the teacher in the paper).
      noise, x0: a batch of pairs from :func:`jaxgen.sampling.teacher.reflow_pairs`.
      cond: conditioning pytree with leading axis ``B``, or ``None``.
      key: PRNG key for ``t``.
      process: the flow's process.
      prediction: what the model predicts.
      time_sampler: a name in :data:`jaxgen.diffusion.TIME_SAMPLERS` or a callable.

    Returns:
      ``(per_example [B], {"loss"})``.
    """
    check_prediction(prediction)
    if noise.shape != x0.shape:
        raise InputError(f"reflow pairs differ in shape: noise {noise.shape}, x0 {x0.shape}.")
    t = resolve_option(time_sampler, TIME_SAMPLERS, "time_sampler")(key, x0.shape[0], process)
    x_t = bcast(process.alpha(t), x0) * x0 + bcast(process.sigma(t), x0) * noise
    target = from_x0_eps(x0, noise, prediction, t=t, process=process)
    per_example = _per_example_mse(model_fn(params, x_t, t, cond), target)
    return per_example, {"loss": jnp.mean(per_example)}


# ---------------------------------------------------------------- DMD2


def dmd_loss(
    generator_fn: Callable,
    params,
    noise,
    cond,
    key,
    *,
    real_fn: Callable,
    real_params,
    fake_fn: Callable,
    fake_params,
    process,
    prediction: str,
    time_sampler: str | Callable = "uniform",
):
    """The generator's distribution-matching loss (Yin et al. 2023, Eqs. 7-8; DMD2).

    ``x = G_theta(noise)``, ``x_t = alpha_t x + sigma_t eps``; with the real and fake
    denoisers' ``x0`` estimates, the KL gradient of Eq. 7 is carried by
    ``grad = (x0_fake - x0_real) / mean|x - x0_real|`` (Eq. 8's normaliser, per
    example) and the surrogate ``0.5 mean((x - stop_gradient(x - grad))^2)`` has
    ``d/dx = grad / D``: its gradient in ``theta`` is Eq. 7's, back-propagated
    through ``G`` only. Neither score network receives gradients here.

    The trainer holds the frozen teacher (``real``), the fake-score network
    (initialised from the teacher and trained by :func:`fake_score_loss` on the
    generator's samples, several updates per generator update in DMD2), and the
    generator (initialised from the teacher).

    Args:
      generator_fn: ``generator_fn(params, noise, cond) -> x`` (e.g. :func:`few_step_generator`
        with its key bound).
      params: generator parameters.
      noise: standard normal ``[B, ...]``.
      cond: conditioning pytree with leading axis ``B``, or ``None``.
      key: PRNG key for ``t`` and ``eps``.
      real_fn, real_params: the teacher ``real_fn(params, x_t, t, cond)``.
      fake_fn, fake_params: the fake-score network.
      process: the process of both score networks.
      prediction: what both score networks predict.
      time_sampler: a name in :data:`jaxgen.diffusion.TIME_SAMPLERS` or a callable.

    Returns:
      ``(per_example [B], {"loss", "grad_norm"})``; ``x`` itself is returned by the
      generator, not here: call :func:`fake_score_loss` on it next.
    """
    check_prediction(prediction)
    k_t, k_eps = jax.random.split(key)
    x = generator_fn(params, noise, cond)
    t = resolve_option(time_sampler, TIME_SAMPLERS, "time_sampler")(k_t, x.shape[0], process)
    eps = jax.random.normal(k_eps, x.shape, x.dtype)
    x_t = jax.lax.stop_gradient(bcast(process.alpha(t), x) * x + bcast(process.sigma(t), x) * eps)
    x0_real, _ = _x0_eps(real_fn, real_params, x_t, t, cond, prediction, process)
    x0_fake, _ = _x0_eps(fake_fn, jax.lax.stop_gradient(fake_params), x_t, t, cond, prediction,
                         process)
    scale = jnp.mean(jnp.abs(x - x0_real).reshape(x.shape[0], -1), axis=1)
    # At t = 0 exactly both denoisers return x: 0 / 0. The KL gradient is 0 there.
    safe = bcast(jnp.where(scale > 0, scale, 1.0), x)
    grad = jax.lax.stop_gradient(jnp.where(bcast(scale, x) > 0, (x0_fake - x0_real) / safe, 0.0))
    per_example = 0.5 * _per_example_mse(x, jax.lax.stop_gradient(x - grad))
    grad_norm = jnp.mean(jnp.sqrt(jnp.sum(jnp.square(grad).reshape(x.shape[0], -1), axis=1)))
    return per_example, {"loss": jnp.mean(per_example), "grad_norm": grad_norm}


def fake_score_loss(
    fake_fn: Callable,
    fake_params,
    x,
    cond,
    key,
    *,
    process,
    prediction: str,
    time_sampler: str | Callable = "uniform",
):
    """Denoising loss of the fake score on generator samples (Yin et al. 2023, Eq. 6).

    ``||fake(x_t, t) - target(x, eps)||^2`` in the network's own prediction, with
    ``x = stop_gradient(G(noise))``: the fake score tracks the generator's distribution.

    Returns:
      ``(per_example [B], {"loss"})``.
    """
    check_prediction(prediction)
    x = jax.lax.stop_gradient(x)
    k_t, k_eps = jax.random.split(key)
    t = resolve_option(time_sampler, TIME_SAMPLERS, "time_sampler")(k_t, x.shape[0], process)
    eps = jax.random.normal(k_eps, x.shape, x.dtype)
    x_t = bcast(process.alpha(t), x) * x + bcast(process.sigma(t), x) * eps
    target = from_x0_eps(x, eps, prediction, t=t, process=process)
    per_example = _per_example_mse(fake_fn(fake_params, x_t, t, cond), target)
    return per_example, {"loss": jnp.mean(per_example)}


def few_step_generator(model_fn: Callable, process, *, prediction: str,
                       ts=None) -> Callable:
    """A diffusion model as DMD2's generator of ``N = len(ts)`` steps (Yin et al. 2024, Sec. 4.4).

    Sampling: ``x <- x0(sigma(ts[0]) z, ts[0])``, then for each later time
    ``x <- x0(alpha(t) x + sigma(t) eps, t)`` with fresh ``eps``: its own ``x0`` estimate at
    each time, re-noised by the forward process between them (DMD2's multi-step sampler:
    ``ts`` = DDPM timesteps 999, 749, 499, 249 at 4 steps; see
    :func:`jaxgen.sampling.generator_times`). ``N = 1`` (the default ``ts = (t_max,)``):
    ``G(z) = x0(sigma(t_max) z, t_max)``, the architecture and weights a DMD2 generator
    starts from.

    For ``N > 1`` a call is one training sample by DMD2's *backward simulation*: each
    example draws a step ``n`` uniform in ``{0, ..., N-1}``; its input at ``ts[n]`` is made
    by ``n`` steps of the generator's own sampler from ``z`` with the current weights held
    fixed (``stop_gradient``), and the output is the generator's ``x0`` at that input: the
    gradient reaches ``params`` through this last evaluation only, as the paper's
    ``no_grad`` simulation. The keys: ``k_step, k_eps = split(key)``;
    ``n ~ randint(k_step, [B], 0, N)``; step ``m``'s fresh noise ``eps_m ~
    normal(fold_in(k_eps, m), x.shape)``. DMD2 shares one ``n`` across the batch; drawing
    it per example leaves each example's distribution, and so the expected gradient,
    unchanged. The simulation costs ``N - 1`` forward passes of the batch.

    Needs an ``x0``, ``v`` or ``velocity`` model where ``alpha(ts[0]) = 0``.

    Returns:
      ``generator_fn(params, noise, cond, key=None) -> x``; ``key`` is needed when ``N > 1``.
    """
    check_prediction(prediction)
    ts = (float(process.t_max),) if ts is None else tuple(float(t) for t in ts)
    if not ts or np.any(np.diff(ts) >= 0):
        raise InputError(f"ts={ts}: a generator's times are one or more, strictly decreasing.")

    def x0_at(params, x_t, t, cond):
        return _x0_eps(model_fn, params, x_t, t, cond, prediction, process)[0]

    def generator_fn(params, noise, cond, key=None):
        b = noise.shape[0]
        x_t = process.sigma(ts[0]) * noise
        t = jnp.full((b,), ts[0], noise.dtype)
        if len(ts) == 1:
            return x0_at(params, x_t, t, cond)
        if key is None:
            raise InputError(f"a {len(ts)}-step generator's training sample needs a key "
                             "(its backward simulation draws a step and noise).")
        k_step, k_eps = jax.random.split(key)
        step = jax.random.randint(k_step, (b,), 0, len(ts))
        fixed = jax.lax.stop_gradient(params)
        x_in, t_in, x = x_t, t, x_t
        for m in range(1, len(ts)):  # a handful of steps: unrolled
            x0 = x0_at(fixed, x, jnp.full((b,), ts[m - 1], noise.dtype), cond)
            eps = jax.random.normal(jax.random.fold_in(k_eps, m), x.shape, x.dtype)
            x = process.alpha(ts[m]) * x0 + process.sigma(ts[m]) * eps
            x_in = jnp.where(bcast(step == m, x), x, x_in)
            t_in = jnp.where(step == m, ts[m], t_in)
        return x0_at(params, jax.lax.stop_gradient(x_in), t_in, cond)

    return generator_fn
