"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, Sec. 4.3, App. D.2).

Along the ODE ``dx/dt = f(x, t) = alpha'(t) x0 + sigma'(t) eps`` the density obeys
``d log p_t(x_t) / dt = -div f(x_t, t)`` (instantaneous change of variables, Chen
et al. 2018, Thm. 1), so for ``x`` at ``t_start``

    ``log p_{t_start}(x) = log p_{t_end}(x_{t_end}) + int_{t_start}^{t_end} div f dt``.

The ODE is integrated with classical RK4 on a grid uniform in ``lambda = logsnr / 2``
(the change of variables ``dt = (dt / dlambda) dlambda`` keeps the integrand smooth
where ``sigma'`` is singular), together with the divergence: exact (the trace of the
Jacobian by ``jacfwd``, for small dimension) or the Hutchinson-Skilling estimate
``v^T J v`` with one Rademacher or Gaussian probe ``v`` per sample held fixed along the
trajectory, as in score_sde's ``likelihood.py``. It is unbiased: ``E[v^T J v] = tr J``.
Example ``i`` draws its probe (and its dequantisation noise) from ``fold_in(key,
first_index + i)`` alone, so a result does not depend on the batch size or devices.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxgen.diffusion.predictions import check_prediction, to_x0_eps
from jaxgen.errors import InputError

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
# Where alpha or sigma vanishes (t = 0; t = 1 of a flow) log-SNR is infinite: the
# default end points stop this far inside, in time relative to t_max.
_EDGE = 1e-5


def _ends(process, t_start, t_end) -> tuple[float, float]:
    if t_start is None:
        t_start = max(process.t_min, _EDGE * process.t_max)
    if t_end is None:
        t_end = process.t_max
        if float(process.alpha(jnp.asarray(t_end))) == 0.0:
            t_end = t_end * (1 - _EDGE)
    return float(t_start), float(t_end)


def _gaussian_prior(process, t_end):
    """``N(0, sigma(t_end)^2 I)``: the terminal marginal up to the data's ``alpha^2`` share."""

    def logp(x):
        s2 = process.sigma(t_end) ** 2
        flat = x.reshape(x.shape[0], -1)
        return -0.5 * jnp.sum(flat * flat, 1) / s2 - 0.5 * flat.shape[1] * jnp.log(2 * jnp.pi * s2)

    return logp


@functools.partial(jax.jit, static_argnums=0)
def _integrate(config, params, x, cond, key, first_index):
    model_fn, process, prediction, divergence, probe, steps, t_start, t_end, prior_logp = config
    lam = jnp.linspace(0.5 * process.logsnr(t_start), 0.5 * process.logsnr(t_end), steps + 1)
    axes = tuple(range(1, x.ndim))

    def drift(x, lam, cond):
        """``dx/dlambda`` for a batch ``x`` at the scalar half-log-SNR ``lam``."""
        t = process.t_from_logsnr(2 * lam)
        tb = jnp.full((x.shape[0],), t, x.dtype)
        pred = model_fn(params, x, tb, cond).astype(x.dtype)
        x0, eps = to_x0_eps(pred, prediction, x_t=x, t=t, process=process)
        velocity = process.d_alpha(t) * x0 + process.d_sigma(t) * eps
        return velocity * (2 / process.d_logsnr(t))

    if divergence == "exact":

        def field(x, lam):
            def one(xi, ci):
                g = lambda z: drift(z[None], lam, jax.tree.map(lambda c: c[None], ci))[0]
                jac = jax.jacfwd(g)(xi).reshape(xi.size, xi.size)
                return g(xi), jnp.trace(jac)

            return jax.vmap(one)(x, cond)

    else:
        draw = jax.random.rademacher if probe == "rademacher" else jax.random.normal
        keys = _example_keys(key, first_index, x.shape[0])
        v = jax.vmap(lambda k: draw(k, x.shape[1:]))(keys).astype(x.dtype)

        def field(x, lam):
            dx, jv = jax.jvp(lambda z: drift(z, lam, cond), (x,), (v,))
            return dx, jnp.sum(v * jv, axes)

    def step(carry, i):
        x, delta = carry
        a, h = lam[i], lam[i + 1] - lam[i]
        k1, d1 = field(x, a)
        k2, d2 = field(x + 0.5 * h * k1, a + 0.5 * h)
        k3, d3 = field(x + 0.5 * h * k2, a + 0.5 * h)
        k4, d4 = field(x + h * k3, a + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return (x, delta + h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)), None

    delta = jnp.zeros(x.shape[0], jnp.result_type(float))
    (x_end, delta), _ = lax.scan(step, (x, delta), jnp.arange(steps))
    prior = prior_logp or _gaussian_prior(process, t_end)
    return prior(x_end) + delta, x_end


def log_likelihood(
    model_fn: Callable,
    params: Any,
    process,
    x: jax.Array,
    *,
    prediction: str,
    cond: Any = None,
    divergence: str = "exact",
    probe: str = "rademacher",
    key: jax.Array | None = None,
    steps: int = 256,
    t_start: float | None = None,
    t_end: float | None = None,
    prior_logp: Callable | None = None,
    first_index: int = 0,
) -> tuple[jax.Array, dict]:
    """``log p_{t_start}(x)`` in nats per example, by the probability-flow ODE.

    Args:
      model_fn: ``model_fn(params, x_t, t, cond) -> prediction``.
      params: its weights (a traced argument).
      process: the noise process the model was trained with.
      x: ``[B, ...]`` points at ``t_start`` (the data: ``t_start`` is near 0).
      prediction: what ``model_fn`` returns.
      cond: conditioning pytree with leading axis ``B``, or ``None``.
      divergence: ``"exact"`` (Jacobian trace, ``d`` forward passes per
        evaluation; for small ``d``) or ``"hutchinson"`` (one probe per sample).
      probe: Hutchinson probe distribution, ``"rademacher"`` or ``"gaussian"``.
      key: PRNG key of the Hutchinson probes.
      steps: RK4 steps (4 model evaluations each) on the uniform half-log-SNR grid.
      t_start, t_end: integration interval; default ``t_min`` (at least ``1e-5``
        of ``t_max``) to ``t_max`` (pulled ``1e-5`` inside where ``alpha(t_max) = 0``).
      prior_logp: ``logp(x_end) -> [B]`` at ``t_end``; default ``N(0, sigma(t_end)^2 I)``,
        which misses the data's share ``alpha(t_end) x0`` of the terminal marginal: an
        error ~ ``alpha |E x0| / sigma`` nats per dimension (VP: 0.0066, EDM: 1/80 per
        unit of data mean).
      first_index: index of ``x[0]`` in the whole run (module docstring).

    Returns:
      ``(logp [B], info)`` with ``info = {"x_end", "nfe", "t_start", "t_end"}``; ``nfe``
      counts model evaluations (an exact divergence evaluation costs ``d`` of them).
    """
    check_prediction(prediction)
    if divergence not in DIVERGENCES or probe not in PROBES:
        raise InputError(
            f"divergence={divergence!r}, probe={probe!r}: use one of {DIVERGENCES} and {PROBES}."
        )
    if divergence == "hutchinson" and key is None:
        raise InputError("divergence='hutchinson' needs key= for its probes.")
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps={steps!r} must be an int >= 1.")
    x = jnp.asarray(x)
    if x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputError(f"x has shape {x.shape} and dtype {x.dtype}: need float [B, ...].")
    t0, t1 = _ends(process, t_start, t_end)
    lam0, lam1 = (0.5 * float(process.logsnr(jnp.asarray(t))) for t in (t0, t1))
    if not (math.isfinite(lam0) and math.isfinite(lam1) and lam0 > lam1):
        raise InputError(
            f"t_start={t0:g}, t_end={t1:g} on {process!r}: need finite log-SNR, "
            "decreasing from t_start to t_end (0 < t_start < t_end < where alpha = 0)."
        )
    config = (model_fn, process, prediction, divergence, probe, steps, t0, t1, prior_logp)
    logp, x_end = _integrate(config, params, x, cond, key, first_index)
    per_eval = int(np.prod(x.shape[1:])) if divergence == "exact" else 1
    info = {"x_end": x_end, "nfe": 4 * steps * per_eval, "t_start": t0, "t_end": t1}
    return logp, info


def _example_keys(key, first_index, batch):
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(first_index + jnp.arange(batch))


def dequantize(images: jax.Array, key: jax.Array, first_index: int = 0) -> jax.Array:
    """uint8 images to model space with uniform dequantisation, ``[B, ...]`` float32.

    Pixel ``y`` is the bin ``floor((x + 1) 127.5 + 0.5) = y`` of jaxgen's one
    uint8 rule: ``x = (y + u - 1/2) / 127.5 - 1`` with ``u ~ U[0, 1)``, bins of
    width ``2/255``; image ``i`` draws ``u`` from ``fold_in(key, first_index + i)``.
    """
    if images.dtype != jnp.uint8:
        raise InputError(f"images have dtype {images.dtype}; dequantize takes uint8.")
    keys = _example_keys(key, first_index, images.shape[0])
    u = jax.vmap(lambda k: jax.random.uniform(k, images.shape[1:]))(keys)
    return (images.astype(jnp.float32) + u - 0.5) / 127.5 - 1.0


def bits_per_dim(
    model_fn: Callable,
    params: Any,
    process,
    images: jax.Array,
    key: jax.Array,
    *,
    prediction: str,
    **kwargs,
) -> tuple[jax.Array, dict]:
    """Negative log-likelihood of uint8 images in bits per dimension, ``[B]``.

    ``log P(y) >= E_u[log p(x(y, u))] + D log(2/255)`` for the dequantised
    ``x`` of :func:`dequantize` (Theis et al. 2016, Sec. 3.1, with the bin width
    of jaxgen's uint8 rule); one ``u`` per image. score_sde instead dequantises to
    ``(y + u)/256`` on ``[-1, 1)``, which reads ``log2(256/255) = 0.0056`` bits lower.

    Args:
      model_fn, params, process, prediction: as for :func:`log_likelihood`.
      images: ``[B, ...]`` uint8.
      key: PRNG key (dequantisation noise and Hutchinson probes).
      **kwargs: passed to :func:`log_likelihood` (``first_index`` also places the
        dequantisation noise).
    """
    k_u, k_v = jax.random.split(key)
    first = kwargs.get("first_index", 0)
    x = dequantize(jnp.asarray(images), k_u, first)
    logp, info = log_likelihood(
        model_fn, params, process, x, prediction=prediction, key=k_v, **kwargs
    )
    d = int(np.prod(x.shape[1:]))
    return -(logp + d * math.log(2 / 255)) / (d * math.log(2)), info
