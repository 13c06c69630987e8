"""A trained model as a teacher for distillation: one ODE step, and ODE endpoints.

- :func:`solver_step` turns any model and any deterministic jaxgen solver into
  the one-step ODE map that consistency distillation needs (Song et al. 2023,
  Eq. 6), between noise levels ``sigma = sigma(t) / alpha(t)`` so that a
  teacher of any process serves a student on :class:`~jaxgen.diffusion.EDM`.
- :func:`reflow_pairs` draws (noise, sample) pairs joined by the teacher's ODE,
  the data of rectified-flow reflow (Liu et al. 2023, Algorithm 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxgen.diffusion.predictions import check_prediction
from jaxgen.errors import InputError
from jaxgen.sampling.driver import SOLVERS, check_solver, sample
from jaxgen.sampling.guidance import make_denoiser


def _check_deterministic(solver: str, options: tuple) -> dict:
    spec = SOLVERS[solver]
    opts = {**getattr(spec.fn, "keywords", {}), **dict(spec.fixed), **dict(options)}
    if (solver == "euler_maruyama" or spec.learned_variance or opts.get("eta", 0)
            or opts.get("s_churn", 0)):
        raise InputError(
            f"solver={solver!r} with options {dict(options)} adds noise; a teacher's ODE "
            "step must be deterministic: use 'heun', 'euler', 'ddim', 'dpmpp_2m', 'rk4', ..."
        )
    return {**dict(spec.fixed), **dict(options)}


def solver_step(
    model_fn: Callable,
    params: Any,
    process,
    *,
    prediction: str,
    solver: str = "heun",
    solver_options: dict | None = None,
) -> Callable:
    """One step of a jaxgen ODE solver with a teacher model, between per-example noise levels.

    Each example ``b`` moves from noise level ``sigma_from[b]`` to ``sigma_to[b]``
    (``sigma = sigma(t) / alpha(t)``, i.e. the :class:`~jaxgen.diffusion.EDM`
    state ``x / alpha``): its time on ``process`` is ``t = t_from_logsnr(-2 ln sigma)``,
    the solver runs the grid ``[t_from, t_to]`` on ``alpha(t_from) x``, and the
    result is scaled back by ``1 / alpha(t_to)``. Heun is the teacher step of
    Song et al. (2023, Sec. 6); a multistep solver takes its first-order step.

    Args:
      model_fn: the teacher, ``model_fn(params, x_t, t, cond) -> prediction``.
      params: teacher weights (traced).
      process: the process the teacher was trained with.
      prediction: what the teacher predicts.
      solver: a deterministic name in :data:`jaxgen.sampling.SOLVERS`.
      solver_options: its options (``tableau`` is fixed by the name; ``eta`` and
        ``s_churn`` must stay 0).

    Returns:
      ``step(x, sigma_from, sigma_to, cond) -> x`` with ``[B]`` noise levels.
    """
    check_prediction(prediction)
    spec, options = check_solver(solver, solver_options)
    opts = _check_deterministic(solver, options)
    no_keys = jax.random.split(jax.random.key(0), 1)  # deterministic solvers draw nothing

    def one(x, sigma_from, sigma_to, cond):
        ts = process.t_from_logsnr(-2 * jnp.log(jnp.stack([sigma_from, sigma_to])))
        denoise = make_denoiser(lambda x_, t_, c_: model_fn(params, x_, t_, c_), process,
                                prediction, cond)
        x_t = process.alpha(ts[0]) * x[None]
        return spec.fn(denoise, x_t, ts, no_keys, process, **opts)[0] / process.alpha(ts[1])

    def step(x, sigma_from, sigma_to, cond=None):
        # Each example keeps a batch axis of 1 inside the map, as the model expects.
        cond1 = jax.tree.map(lambda c: c[:, None], cond)
        return jax.vmap(one)(x, sigma_from, sigma_to, cond1)

    return step


def reflow_pairs(
    model_fn: Callable,
    params: Any,
    process,
    key: jax.Array,
    shape: tuple[int, ...],
    *,
    prediction: str,
    solver: str = "rk4",
    steps: int = 32,
    cond: Any = None,
    first_index: int = 0,
    **sample_kwargs,
) -> tuple[jax.Array, jax.Array]:
    """Pairs ``(z, x0)`` with ``x0`` the teacher ODE's endpoint from ``x_T = sigma(t_max) z``.

    The coupling of rectified-flow reflow (Liu et al. 2023, Algorithm 1: "draw
    (Z0, Z1) from the current flow"). Pair ``i`` depends only on
    ``(key, first_index + i)``: ``z_i = normal(fold_in(key, first_index + i))``.

    Args:
      model_fn, params, process: the teacher, as for :func:`jaxgen.sampling.sample`.
      key: PRNG key of the run.
      shape: ``(B, ...)``.
      prediction, solver, steps: the teacher ODE solve (deterministic solver).
      cond: conditioning pytree with leading axis ``B``, or ``None``.
      first_index: index of the first pair in the run.
      **sample_kwargs: further :func:`jaxgen.sampling.sample` options (grid, mesh, guidance).

    Returns:
      ``(z, x0)``, both of ``shape``; ``z`` is standard normal.
    """
    _, options = check_solver(solver, sample_kwargs.get("solver_options"))
    _check_deterministic(solver, options)
    ids = first_index + jnp.arange(shape[0])
    draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), tuple(shape[1:]))
    z = jax.vmap(draw)(ids)
    x_T = process.sigma(jnp.asarray(process.t_max)) * z
    x0, _ = sample(
        model_fn=model_fn, params=params, process=process, key=key, shape=tuple(shape),
        prediction=prediction, solver=solver, steps=steps, cond=cond, x_T=x_T, **sample_kwargs,
    )
    return z, x0
