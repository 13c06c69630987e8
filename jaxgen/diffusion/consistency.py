"""Consistency models: the boundary parametrisation, consistency training (iCT) and distillation.

A consistency function maps every point of a probability-flow ODE trajectory
to the trajectory's point at ``sigma_min``: ``f(x_sigma, sigma) = x_{sigma_min}``
(Song et al. 2023, "Consistency Models", Sec. 3). Both objectives here compare
the model at two neighbouring noise levels of a Karras discretisation
``sigma_min = sigma_1 < ... < sigma_N = sigma_max`` (Karras et al. 2022, Eq. 5)
on the VE process :class:`~jaxgen.diffusion.EDM` (``x_sigma = x0 + sigma z``,
``t = sigma``):

- consistency training, as improved by Song & Dhariwal (2024, "Improved
  Techniques for Training Consistency Models", iCT): no teacher; the target is
  the stop-gradient of the student itself at ``sigma_i`` on the *same* noise;
- consistency distillation (Song et al. 2023, Algorithm 2): the target is the
  student at the point one ODE step of a teacher takes from ``sigma_{i+1}`` to
  ``sigma_i``; any jaxgen solver makes that step
  (:func:`jaxgen.sampling.teacher.solver_step`).

Losses return per-example values ``[B]`` and a metrics dict; reduction is
the caller's.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxgen.diffusion.losses import DISTANCES, resolve_option
from jaxgen.diffusion.predictions import bcast, check_prediction, to_x0_eps
from jaxgen.diffusion.processes import EDM
from jaxgen.errors import InputError

# iCT's pseudo-Huber constant: c = 0.00054 sqrt(d) on the summed squared error
# (Song & Dhariwal 2024, Sec. 3.3) is c = 0.00054 on the mean squared error.
ICT_HUBER_C = 0.00054


def consistency_precond(raw_fn: Callable, process, *, sigma_data: float = 0.5) -> Callable:
    """Wrap a raw network ``F`` into a consistency function with ``f(x, t_min) = x / alpha`` exact.

    Song et al. (2023), Eq. 5 and App. C:
    ``f(x, s) = c_skip(s) x~ + c_out(s) F(c_in(s) x~, c_noise(s))`` on the scaled
    variable ``x~ = x / alpha(t)`` at noise level ``s = sigma(t) / alpha(t)``, with
    ``c_skip = sd^2 / ((s - s_min)^2 + sd^2)``, ``c_out = sd (s - s_min) / sqrt(s^2 + sd^2)``,
    ``c_in = 1 / sqrt(s^2 + sd^2)`` and ``c_noise = ln(s) / 4`` (EDM, Table 1). At
    ``t = t_min`` the output is ``1 * x~ + 0 * F``: bit for bit ``x`` on :class:`EDM`.

    Args:
      raw_fn: ``raw_fn(*leading, x_in, c_noise, cond)``; ``leading`` (e.g. ``params``)
        is passed through.
      process: the process whose time ``t`` the wrapped model receives; its
        ``t_min`` (``sigma_min`` on :class:`EDM`) is the boundary and must be a
        positive noise level.
      sigma_data: standard deviation of the data.

    Returns:
      ``model_fn(*leading, x_t, t, cond) -> x0`` estimate.
    """
    with jax.ensure_compile_time_eval():  # a Python check, also when built inside a trace
        positive = float(process.sigma(jnp.asarray(process.t_min))) > 0
    if not positive:
        raise InputError(
            f"consistency_precond needs a boundary t_min with sigma(t_min) > 0; {process!r} "
            "has sigma(t_min) = 0 (use EDM(sigma_min=...) or a process with t_min > 0)."
        )

    def noise_level(t):
        return process.sigma(t) / process.alpha(t)

    def model_fn(*args):
        *leading, x, t, cond = args
        s = bcast(noise_level(t), x)
        s_min = noise_level(jnp.asarray(process.t_min, s.dtype))
        x_scaled = x / bcast(process.alpha(t), x)
        c_skip = sigma_data**2 / ((s - s_min) ** 2 + sigma_data**2)
        c_out = sigma_data * (s - s_min) / jnp.sqrt(s * s + sigma_data**2)
        c_in = 1 / jnp.sqrt(s * s + sigma_data**2)
        c_noise = jnp.log(noise_level(t)) / 4
        return c_skip * x_scaled + c_out * raw_fn(*leading, c_in * x_scaled, c_noise, cond)

    return model_fn


def consistency_view(model_fn: Callable, process, *, prediction: str, sigma_min: float = 0.002,
                     sigma_data: float = 0.5) -> Callable:
    """A diffusion model of any process seen as a consistency function on :class:`EDM`.

    The model's ``x0`` at noise level ``sigma`` (evaluated at the time of equal log-SNR
    on its own process, on ``alpha x``) is EDM's denoiser ``D(x, sigma) = c_skip^E x +
    c_out^E F_E`` of some raw network ``F_E`` (EDM, Table 1: ``c_skip^E = sd^2 /
    (sigma^2 + sd^2)``, ``c_out^E = sigma sd / sqrt(sigma^2 + sd^2)``). This returns
    :func:`consistency_precond`'s function of that same ``F_E`` (Song et al. 2023,
    Eq. 5 and App. C)::

        f(x, sigma) = c_skip(sigma) x + c_out(sigma) (D(x, sigma) - c_skip^E x) / c_out^E

    which is how the paper starts CD from an EDM teacher's weights, written for any
    model. ``f(x, sigma_min) = x`` bit for bit (``c_skip = 1``, ``c_out = 0``); away from
    it ``f - D = -(sigma_min / sigma) (D - c_skip^E x)`` to first order in
    ``sigma_min / sigma`` (``8e-4`` of it at ``sigma = 2.5``), so a student built on a
    teacher's weights starts as the teacher's denoiser.

    Args:
      model_fn: ``model_fn(params, x_t, t, cond) -> prediction`` on ``process``.
      process: the model's process; it must reach the levels the caller evaluates.
      prediction: what the model predicts.
      sigma_min: the consistency boundary (0.002 in the paper).
      sigma_data: the data's standard deviation ``sd``.

    Returns:
      ``f(params, x, sigma, cond) -> x0`` with ``[B]`` EDM noise levels ``sigma``.
    """
    check_prediction(prediction)
    sd2 = sigma_data**2

    def f(params, x, sigma, cond):
        t = process.t_from_logsnr(-2.0 * jnp.log(sigma))
        x_t = bcast(process.alpha(t), x) * x
        d = to_x0_eps(model_fn(params, x_t, t, cond), prediction, x_t=x_t, t=t,
                      process=process)[0]
        s = bcast(sigma, x)
        c_skip = sd2 / ((s - sigma_min) ** 2 + sd2)
        c_out = sigma_data * (s - sigma_min) / jnp.sqrt(s * s + sd2)
        f_edm = (d - sd2 / (s * s + sd2) * x) / (s * sigma_data / jnp.sqrt(s * s + sd2))
        return c_skip * x + c_out * f_edm

    return f


def karras_sigmas(n, sigma_min: float, sigma_max: float, rho: float = 7.0, size: int | None = None):
    """``sigma_i = (sigma_min^(1/rho) + (i-1)/(n-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``.

    Karras et al. (2022), Eq. 5, increasing, ``i = 1..n``; the ends are exactly
    ``sigma_min`` and ``sigma_max``.

    Args:
      n: number of noise levels (may be traced, e.g. iCT's curriculum ``N(k)``).
      sigma_min, sigma_max, rho: the discretisation's parameters.
      size: length of the returned array (``>= n``; entries past ``n`` repeat
        ``sigma_max``); default ``n``, which must then be a Python int.

    Returns:
      ``[size]`` noise levels.
    """
    size = n if size is None else size
    i = jnp.arange(size, dtype=jnp.result_type(float))
    u = jnp.minimum(i / (n - 1), 1.0)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (lo + u * (hi - lo)) ** rho
    return jnp.where(i == 0, sigma_min, jnp.where(u >= 1, sigma_max, sigmas))


def ict_num_scales(step, total_steps: int, s0: int = 10, s1: int = 1280):
    """iCT's exponential curriculum (Song & Dhariwal 2024, Sec. 3.4).

    ``N(k) = min(s0 2^floor(k / K'), s1) + 1`` with ``K' = floor(K / (log2 floor(s1/s0) + 1))``.

    Args:
      step: training iteration ``k`` (may be traced).
      total_steps: total training iterations ``K``.
      s0, s1: initial and final number of discretisation intervals.

    Returns:
      ``N(k)``, an int32 array.
    """
    k_prime = math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1))
    if k_prime < 1:
        raise InputError(
            f"total_steps={total_steps} is too short for the curriculum s0={s0} -> s1={s1}: "
            f"it needs at least {math.ceil(math.log2(s1 / s0) + 1)} steps."
        )
    doublings = jnp.minimum(jnp.asarray(step) // k_prime, 30).astype(jnp.int32)
    return jnp.minimum(s0 * 2**doublings, s1) + 1


def ict_sigma_logits(sigmas, n, p_mean: float = -1.1, p_std: float = 2.0):
    """Log-probabilities of the pairs ``(sigma_i, sigma_{i+1})`` (Song & Dhariwal 2024, Sec. 3.5).

    ``p(sigma_i) ∝ erf((ln sigma_{i+1} - P_mean) / (sqrt(2) P_std))
    - erf((ln sigma_i - P_mean) / (sqrt(2) P_std))`` for ``i = 1..n-1``: the
    log-normal proposal's mass between the two levels. Entries from ``n - 1`` on are ``-inf``.
    """
    cdf = jax.scipy.special.erf((jnp.log(sigmas) - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    valid = jnp.arange(mass.shape[0]) < n - 1
    return jnp.where(valid & (mass > 0), jnp.log(jnp.where(mass > 0, mass, 1.0)), -jnp.inf)


def consistency_pair_loss(
    model_fn, params, target_params, x, x_next, sigma, sigma_next, cond, *, distance, process
):
    """``d(f_theta(x_next, sigma_next), f_theta-(x, sigma))`` per example, without weighting.

    The target side is evaluated with ``stop_gradient(target_params)``; ``sigma``
    and ``sigma_next`` are ``[B]``.
    """
    f_next = model_fn(params, x_next, sigma_next, cond)
    target = model_fn(jax.lax.stop_gradient(target_params), x, sigma, cond)
    return distance(f_next, jax.lax.stop_gradient(target), sigma_next, process)


def _check_edm(process, name: str) -> None:
    if not isinstance(process, EDM):
        raise InputError(
            f"{name} runs on the VE process EDM(sigma_min, sigma_max) of the paper; got "
            f"{process!r}. Distil a teacher of another process through solver_step, which "
            "maps noise levels between processes."
        )


def ict_loss(
    model_fn: Callable,
    params,
    x0,
    cond,
    key,
    *,
    step,
    total_steps: int,
    process: EDM,
    s0: int = 10,
    s1: int = 1280,
    rho: float = 7.0,
    p_mean: float = -1.1,
    p_std: float = 2.0,
    distance: str | Callable = "pseudo_huber",
):
    """Improved consistency training (Song & Dhariwal 2024; Song et al. 2023, Algorithm 3).

    ``lambda(sigma_i) d(f_theta(x0 + sigma_{i+1} z, sigma_{i+1}), f_theta-(x0 + sigma_i z,
    sigma_i))`` with ``theta- = stop_gradient(theta)`` (no EMA teacher, Sec. 3.2),
    ``lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i)`` (Sec. 3.1), ``i`` drawn by
    :func:`ict_sigma_logits` over the Karras levels of :func:`karras_sigmas` with
    ``N = N(k)`` of :func:`ict_num_scales` (one compilation for the whole curriculum:
    ``N`` is traced, the levels live in an array of size ``s1 + 1``).

    The default distance, ``pseudo_huber`` with ``c = 0.00054`` on the mean squared
    error, is the paper's ``sqrt(||.||^2 + c^2 d) - c sqrt(d)`` divided by ``sqrt(d)``.

    Args:
      model_fn: the consistency function ``model_fn(params, x_t, sigma, cond) -> x0``
        (e.g. from :func:`consistency_precond`), ``sigma`` of shape ``[B]``.
      params: student parameters (what gradients are taken with respect to).
      x0: clean data ``[B, ...]``.
      cond: conditioning pytree with leading axis ``B``, or ``None``.
      key: PRNG key for the noise level and the noise.
      step: training iteration ``k`` (traced is fine).
      total_steps: total iterations ``K`` of the curriculum.
      process: the :class:`EDM` process giving ``sigma_min`` and ``sigma_max``.
      s0, s1, rho, p_mean, p_std: the paper's constants (10, 1280, 7, -1.1, 2.0).
      distance: ``"pseudo_huber"``, ``"mse"`` or ``distance(pred, target, t, process) -> [B]``.

    Returns:
      ``(per_example [B], {"loss", "num_scales", "sigma"})``.
    """
    _check_edm(process, "ict_loss")
    dist = resolve_option(distance, DISTANCES, "distance")
    n = ict_num_scales(step, total_steps, s0, s1)
    sigmas = karras_sigmas(n, process.sigma_min, process.sigma_max, rho, size=s1 + 1)
    k_i, k_z = jax.random.split(key)
    logits = ict_sigma_logits(sigmas, n, p_mean, p_std)
    i = jax.random.categorical(k_i, logits, shape=(x0.shape[0],))
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    z = jax.random.normal(k_z, x0.shape, x0.dtype)
    x, x_next = x0 + bcast(sigma, x0) * z, x0 + bcast(sigma_next, x0) * z
    d = consistency_pair_loss(
        model_fn, params, params, x, x_next, sigma, sigma_next, cond, distance=dist, process=process
    )
    per_example = d / (sigma_next - sigma)
    return per_example, {"loss": jnp.mean(per_example), "num_scales": n, "sigma": jnp.mean(sigma)}


def cd_loss(
    model_fn: Callable,
    params,
    x0,
    cond,
    key,
    *,
    teacher_step: Callable,
    target_params=None,
    process: EDM,
    num_scales: int = 18,
    rho: float = 7.0,
    distance: str | Callable = "mse",
    weighting: str = "uniform",
):
    """Consistency distillation (Song et al. 2023, Algorithm 2, Eq. 7).

    ``n ~ U{1..N-1}``, ``x_{n+1} = x0 + sigma_{n+1} z``, ``x^_n = teacher_step(x_{n+1},
    sigma_{n+1}, sigma_n)`` (one ODE step of the teacher, Eq. 6), then
    ``lambda(sigma_n) d(f_theta(x_{n+1}, sigma_{n+1}), f_theta-(x^_n, sigma_n))``.

    Args:
      model_fn: the student consistency function ``model_fn(params, x_t, sigma, cond) -> x0``.
      params: student parameters.
      x0: clean data ``[B, ...]``.
      cond: conditioning pytree with leading axis ``B``, or ``None``.
      key: PRNG key for ``n`` and ``z``.
      teacher_step: ``teacher_step(x, sigma_from, sigma_to, cond) -> x`` with ``[B]``
        noise levels, e.g. :func:`jaxgen.sampling.teacher.solver_step` (Heun in the paper).
      target_params: parameters of the target network ``theta-`` (the EMA of the
        student in the paper, ``mu = 0.95`` on CIFAR-10); ``None`` uses the
        stop-gradient of ``params`` (``mu = 0``, as iCT).
      process: the :class:`EDM` process giving ``sigma_min``, ``sigma_max``.
      num_scales: ``N`` of the discretisation (18 on CIFAR-10).
      rho: Karras exponent.
      distance: ``"mse"`` (the paper's l2, as a mean), ``"pseudo_huber"`` or a callable.
      weighting: ``"uniform"`` (``lambda = 1``, the paper) or ``"inverse_gap"``
        (``1 / (sigma_{n+1} - sigma_n)``, iCT's).

    Returns:
      ``(per_example [B], {"loss"})``.
    """
    _check_edm(process, "cd_loss")
    if not isinstance(num_scales, int) or num_scales < 2:
        raise InputError(f"num_scales={num_scales!r} must be an int >= 2.")
    if weighting not in ("uniform", "inverse_gap"):
        raise InputError(f"weighting={weighting!r}: use 'uniform' or 'inverse_gap'.")
    dist = resolve_option(distance, DISTANCES, "distance")
    sigmas = karras_sigmas(num_scales, process.sigma_min, process.sigma_max, rho)
    k_n, k_z = jax.random.split(key)
    n = jax.random.randint(k_n, (x0.shape[0],), 0, num_scales - 1)
    sigma, sigma_next = sigmas[n], sigmas[n + 1]
    x_next = x0 + bcast(sigma_next, x0) * jax.random.normal(k_z, x0.shape, x0.dtype)
    x_hat = jax.lax.stop_gradient(teacher_step(x_next, sigma_next, sigma, cond))
    target_params = params if target_params is None else target_params
    d = consistency_pair_loss(
        model_fn, params, target_params, x_hat, x_next, sigma, sigma_next, cond,
        distance=dist, process=process,
    )
    per_example = d / (sigma_next - sigma) if weighting == "inverse_gap" else d
    return per_example, {"loss": jnp.mean(per_example)}
