"""Multistep consistency sampling (Song et al. 2023, Algorithm 1).

``x <- f(x_T, T)``; then for each ``tau_n`` of a decreasing sequence: re-noise
``x_tau = alpha(tau) x + sqrt(sigma(tau)^2 - (alpha(tau) s_min)^2) z`` and set
``x <- f(x_tau, tau)``. ``s_min = sigma(t_min) / alpha(t_min)`` is the noise
level the consistency function's output carries (Algorithm 1's
``sqrt(tau^2 - eps^2)`` on EDM; 0 on TrigFlow, whose boundary is ``t = 0``,
giving sCM's ``cos(tau) x + sin(tau) z`` with ``z ~ N(0, sigma_d^2)``).
A model of another prediction (sCM's TrigFlow velocity) is read as its ``x0``.

A DMD2 generator of several steps samples the same way on its own times
(:func:`generator_times`) with clean outputs (``s_min = 0``): DMD2's re-noising by the
forward process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxgen.diffusion.predictions import check_prediction, to_x0_eps
from jaxgen.diffusion.processes import EDM
from jaxgen.diffusion.scm import TrigFlow
from jaxgen.errors import InputError
from jaxgen.parallel import batch_sharding, pad_batch
from jaxgen.sampling.grids import karras
from jaxgen.sampling.solvers import step_noise

# sCM's sampling times (Lu & Song 2024, Sec. 5 and App.): start at T = arctan(sigma_max /
# sigma_d) with EDM's sigma_max = 80, and the 2-step sampler's intermediate time 1.1.
SCM_SIGMA_MAX = 80.0
SCM_T_MID = 1.1


def consistency_times(process, steps: int, *, scm_sigma_data: float | None = None) -> np.ndarray:
    """The ``steps`` times of multistep sampling: the first ``steps`` points of the Karras
    grid of ``steps + 1`` noisy levels (Karras et al. 2022, Eq. 5), i.e. all but ``t_min``,
    where a step would change nothing.

    On ``EDM()``: 1 step ``(80,)``, 2 ``(80, 2.51)``, 4 ``(80, 17.5, 2.51, 0.169)``.
    On :class:`~jaxgen.diffusion.TrigFlow` (sCM) the paper's times: 1 step
    ``T = arctan(80 / sigma_d)`` (1.5645 for ``sigma_d = 0.5``), 2 steps ``(T, 1.1)``;
    more steps (not given in the paper) take the Karras levels of ``[0.002, 80]`` as
    TrigFlow times ``arctan(sigma / sigma_d)``. An sCM trained on another process
    (``scm_sigma_data``: its TrigFlow ``sigma_d``) samples at the times of that process
    with the same log-SNR as those TrigFlow times.
    """
    if not isinstance(steps, int | np.integer) or steps < 1:
        raise InputError(f"steps={steps!r}: a consistency model samples in steps >= 1.")
    steps = int(steps)
    if isinstance(process, TrigFlow):
        return _scm_times(process.sigma_data, steps)
    if scm_sigma_data is None:
        return karras(process, steps + 1)[:steps]
    trig = TrigFlow(scm_sigma_data)
    ts = process.t_from_logsnr(trig.logsnr(_scm_times(scm_sigma_data, steps)))
    return np.asarray(ts, np.float64)


def _scm_times(sigma_data: float, steps: int) -> np.ndarray:
    """sCM's sampling times on ``TrigFlow(sigma_data)`` (see :func:`consistency_times`)."""
    t_max = np.arctan(SCM_SIGMA_MAX / sigma_data)
    if steps <= 2:
        return np.asarray((t_max, SCM_T_MID)[:steps], np.float64)
    sigmas = karras(EDM(sigma_min=0.002, sigma_max=SCM_SIGMA_MAX), steps + 1)[:steps]
    return np.arctan(sigmas / sigma_data)


def generator_times(process, steps: int) -> np.ndarray:
    """The ``steps`` times of a DMD2 generator (Yin et al. 2024, Sec. 4.4): uniform in the
    process's time from ``t_max``, ``t_max (1 - n / steps)`` for ``n < steps``, as DMD2's
    DDPM timesteps 999, 749, 499, 249 at 4 steps. On the flow: 1 step ``(1,)``, 2
    ``(1, 0.5)``, 4 ``(1, 0.75, 0.5, 0.25)``. On EDM, whose time is ``sigma`` (uniform
    in it would leave ``sigma = 40`` as the second step's), the Karras levels of
    :func:`consistency_times`.
    """
    if not isinstance(steps, int | np.integer) or steps < 1:
        raise InputError(f"steps={steps!r}: a DMD2 generator samples in steps >= 1.")
    if isinstance(process, EDM):
        return consistency_times(process, int(steps))
    return process.t_max * (1.0 - np.arange(int(steps), dtype=np.float64) / int(steps))


@functools.partial(jax.jit, static_argnums=(0, 2, 5, 9, 10, 11))
def _run(model_fn, params, process, key, ids, shape, ts, x_T, cond, mesh, prediction,
         clean_output):
    per_sample = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
    init_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(per_sample)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(per_sample)
    if x_T is None:
        draw = lambda k: jax.random.normal(k, shape[1:], ts.dtype)
        x_T = process.sigma(ts[0]) * jax.vmap(draw)(init_keys)
    if mesh is not None:
        shard = lambda a: jax.lax.with_sharding_constraint(a, batch_sharding(mesh))
        x_T, step_keys = shard(x_T), shard(step_keys)
        cond = jax.tree.map(shard, cond)
    t_min = jnp.asarray(process.t_min, ts.dtype)
    s_min = 0.0 if clean_output else process.sigma(t_min) / process.alpha(t_min)

    def f(x, t):
        t = jnp.full((shape[0],), t)
        out = model_fn(params, x, t, cond)
        return out if prediction == "x0" else to_x0_eps(out, prediction, x_t=x, t=t,
                                                         process=process)[0]

    x = f(x_T, ts[0])
    for n in range(1, len(ts)):  # a handful of steps: unrolled
        a, s = process.alpha(ts[n]), process.sigma(ts[n])
        std = jnp.sqrt(jnp.maximum(s * s - (a * s_min) ** 2, 0.0))
        x = f(a * x + std * step_noise(step_keys, n, x), ts[n])
    return x


def consistency_sample(
    model_fn: Callable,
    params: Any,
    process,
    key: jax.Array,
    shape: tuple[int, ...],
    *,
    ts: Sequence[float] | None = None,
    cond: Any = None,
    x_T: jax.Array | None = None,
    mesh: Mesh | None = None,
    first_index: int = 0,
    prediction: str = "x0",
    clean_output: bool = False,
) -> tuple[jax.Array, dict]:
    """Draw samples with a consistency function in ``len(ts)`` evaluations.

    Sample ``i`` depends only on ``(key, first_index + i)``, as in
    :func:`jaxgen.sampling.sample`: its starting noise is drawn from
    ``fold_in(fold_in(key, first_index + i), 0)`` and the noise of step ``n``
    from ``fold_in(fold_in(fold_in(key, first_index + i), 1), n)``.

    Args:
      model_fn: the consistency function ``model_fn(params, x_t, t, cond) -> x0``.
        Compiled programs are cached on its identity: build it once, not per call.
      params: its weights (traced: a new checkpoint never recompiles).
      process: the process of its times (e.g. ``EDM()`` or ``TrigFlow()``).
      key: PRNG key of the run.
      shape: ``(B, ...)``.
      ts: strictly decreasing times ``T = tau_0 > tau_1 > ... > t_min``; the
        first is where sampling starts (default ``(process.t_max,)``: one step).
      cond: conditioning pytree with leading axis ``B``, or ``None``.
      x_T: starting point at ``ts[0]`` (already scaled); overrides the noise from ``key``.
      mesh: shard the batch over this mesh (it is padded to a multiple of its size).
      first_index: index of the first sample of this batch within the run.
      prediction: what ``model_fn`` returns; its ``x0`` is the consistency function
        (``"velocity"`` for sCM's TrigFlow model: ``cos(t) x_t - sin(t) v``).
      clean_output: the function's output carries no noise (a DMD2 generator): re-noise
        by the forward process, ``alpha(tau) x + sigma(tau) z``, not from ``s_min``.

    Returns:
      ``(x0, {"nfe": len(ts), "timesteps": ts})``.
    """
    check_prediction(prediction)
    ts = np.asarray((process.t_max,) if ts is None else ts, np.float64)
    if ts.ndim != 1 or ts.size < 1:
        raise InputError(f"ts={ts}: give at least one time (steps >= 1).")
    if not (np.all(np.diff(ts) < 0) and ts[-1] > process.t_min - 1e-12):
        raise InputError(f"ts={ts} must decrease strictly and stay >= t_min={process.t_min:g}.")
    if ts[0] > process.t_max * (1 + 1e-6):
        raise InputError(f"ts starts at {ts[0]:g}, past t_max={process.t_max:g} of {process!r}.")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise InputError(f"shape={shape}: need (batch, ...) with every size >= 1.")
    if x_T is not None and tuple(x_T.shape) != shape:
        raise InputError(f"x_T has shape {tuple(x_T.shape)}; shape={shape}.")
    batch = shape[0]
    devices = mesh.size if mesh is not None else 1
    rows = -(-batch // devices) * devices
    if rows != batch:
        x_T = None if x_T is None else pad_batch(jnp.asarray(x_T), devices)[0]
        cond = None if cond is None else pad_batch(jax.tree.map(jnp.asarray, cond), devices)[0]
    ids = first_index + jnp.arange(rows)
    ts_in = jnp.asarray(ts, jnp.result_type(float))
    x = _run(model_fn, params, process, key, ids, (rows, *shape[1:]), ts_in, x_T, cond, mesh,
             prediction, bool(clean_output))
    return x[:batch], {"nfe": int(ts.size), "timesteps": ts.copy()}

