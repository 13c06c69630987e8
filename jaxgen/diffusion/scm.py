"""Continuous-time consistency models on TrigFlow (sCM; Lu & Song 2024).

"Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models",
Sec. 3-4 and Algorithm 1. TrigFlow is the process ``x_t = cos(t) x0 + sin(t) z``,
``z ~ N(0, sigma_d^2 I)``, ``t in [0, pi/2]``; in jaxgen's convention
``x_t = alpha x0 + sigma eps`` it is ``alpha = cos t``, ``sigma = sigma_d sin t``
(:class:`TrigFlow`). A network ``F_theta(x_t / sigma_d, t)`` gives both

- the diffusion model's velocity ``dx_t/dt = sigma_d F`` (the PF-ODE), and
- the consistency function ``f_theta(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta``,
  with ``f(x, 0) = x`` exact (:func:`trigflow_consistency`),

so a student starts from its teacher's weights. The continuous-time objective
needs the total derivative of ``F_theta-`` along the PF-ODE, one ``jax.jvp``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxgen.diffusion.predictions import bcast, check_prediction, to_x0_eps
from jaxgen.diffusion.processes import ProcessBase
from jaxgen.errors import InputError


@dataclasses.dataclass(frozen=True)
class TrigFlow(ProcessBase):
    """TrigFlow (Lu & Song 2024, Sec. 3): ``alpha = cos t``, ``sigma = sigma_data sin t``.

    Args:
      sigma_data: standard deviation of the data (and of the noise ``z``).
    """

    sigma_data: float = 0.5

    def __post_init__(self):
        if not self.sigma_data > 0:
            raise InputError(f"TrigFlow sigma_data={self.sigma_data} must be > 0.")

    t_max = math.pi / 2
    t_min = 0.0
    default_grid = "uniform"

    def alpha(self, t):
        """cos t, written ``sin(pi/2 - t)`` so that it is exactly 0 at ``t_max``."""
        return jnp.sin(jnp.pi / 2 - jnp.asarray(t, jnp.result_type(float)))

    def sigma(self, t):
        """sigma_data sin t."""
        return self.sigma_data * jnp.sin(jnp.asarray(t, jnp.result_type(float)))

    def logsnr(self, t):
        """2 log(cos t / (sigma_data sin t))."""
        return 2 * (jnp.log(self.alpha(t)) - jnp.log(self.sigma(t)))

    def t_from_logsnr(self, lam):
        """arctan(exp(-lam / 2) / sigma_data): sCM's ``t = arctan(sigma / sigma_d)``."""
        lam = jnp.asarray(lam, jnp.result_type(float))
        return jnp.arctan(jnp.exp(-lam / 2) / self.sigma_data)


def trigflow_consistency(raw_fn: Callable, sigma_data: float = 0.5) -> Callable:
    """``f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t)`` (Lu & Song 2024, Sec. 3).

    Also the ``x0`` prediction of a TrigFlow diffusion model with the same ``F``.

    Args:
      raw_fn: ``raw_fn(params, x_in, t, cond) -> F`` (``t`` is ``[B]`` TrigFlow time;
        any noise embedding such as ``1000 t`` lives inside it).
      sigma_data: standard deviation of the data.

    Returns:
      ``model_fn(params, x_t, t, cond) -> x0`` estimate, on :class:`TrigFlow` times.
    """

    def model_fn(params, x, t, cond):
        tb = bcast(t, x)
        return jnp.cos(tb) * x - jnp.sin(tb) * sigma_data * raw_fn(params, x / sigma_data, t, cond)

    return model_fn


def trigflow_velocity(
    model_fn: Callable, process, *, prediction: str, sigma_data: float = 0.5
) -> Callable:
    """A diffusion model of any process seen as a TrigFlow model: its PF-ODE velocity ``dx_t/dt``.

    The model is evaluated at the time of equal log-SNR on its own process, on
    ``x_t`` rescaled to its ``alpha``; its ``(x0, eps)`` give
    ``dx_t/dt = -sin(t) x0 + sigma_d cos(t) eps`` (TrigFlow's ``sigma_d F(x_t / sigma_d, t)``,
    Lu & Song 2024, Sec. 3). Exact for every process: TrigFlow and the model's
    process share ``x0``, ``eps`` and the PF-ODE, only their clocks and scales differ.
    So the model's consistency function ``cos(t) x_t - sin(t) sigma_d F`` is its own
    ``x0`` prediction, and an sCM student can start from any teacher's weights.

    Args:
      model_fn: ``model_fn(params, x_t, t, cond, **kw) -> prediction``, or a tuple whose
        first entry is the prediction (e.g. with an adaptive-weight head's ``u``).
      process: the model's process (a :class:`TrigFlow` of the same ``sigma_data``
        is used as is).
      prediction: what the model predicts.
      sigma_data: TrigFlow's ``sigma_d``.

    Returns:
      ``velocity(params, x_t, t, cond, **kw) -> dx_t/dt`` (a tuple with the model's
      other outputs after it) with ``[B]`` TrigFlow times.
    """
    check_prediction(prediction)
    trig = TrigFlow(sigma_data)

    def velocity(params, x, t, cond, **kw):
        if process == trig:
            t_model, x_model = t, x
        else:
            t_model = process.t_from_logsnr(trig.logsnr(t))
            x_model = bcast(process.alpha(t_model) / trig.alpha(t), x) * x
        out = model_fn(params, x_model, t_model, cond, **kw)
        pred, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        x0, eps = to_x0_eps(pred, prediction, x_t=x_model, t=t_model, process=process)
        tb = bcast(t, x)
        v = -jnp.sin(tb) * x0 + sigma_data * jnp.cos(tb) * eps
        return v if rest is None else (v, *rest)

    return velocity


def teacher_velocity(
    model_fn: Callable, params, process, *, prediction: str, sigma_data: float = 0.5
) -> Callable:
    """The TrigFlow PF-ODE velocity ``dx_t/dt`` of a frozen teacher of any process.

    :func:`trigflow_velocity` with the teacher's weights bound: Algorithm 1's
    ``sigma_d F_pretrain(x_t / sigma_d, t)``.

    Args:
      model_fn: the teacher, ``model_fn(params, x_t, t, cond) -> prediction``.
      params: teacher weights.
      process: the teacher's process.
      prediction: what the teacher predicts.
      sigma_data: the student's TrigFlow ``sigma_d``.

    Returns:
      ``velocity(x_t, t, cond) -> dx_t/dt`` with ``[B]`` TrigFlow times.
    """
    velocity = trigflow_velocity(model_fn, process, prediction=prediction, sigma_data=sigma_data)
    return lambda x, t, cond: velocity(params, x, t, cond)


def scm_tangent(raw_fn: Callable, params, x_t, t, dxdt, cond, sigma_data: float = 0.5):
    """``(F_theta-, sigma_d cos(t) sin(t) dF_theta-/dt)`` along the PF-ODE, by one ``jax.jvp``.

    ``dF/dt = d_x F . dx_t/dt / sigma_d + d_t F`` at ``(x_t / sigma_d, t)``. The
    tangents are pre-multiplied by ``cos(t) sin(t)`` (Lu & Song 2024, Sec. 4.2,
    "JVP rearrangement"), which keeps the product finite where ``d_t F`` is large
    near ``t = pi/2``. The weights are held fixed (``stop_gradient``).
    """
    scale = jnp.cos(t) * jnp.sin(t)
    frozen = jax.lax.stop_gradient(params)
    fn = lambda x_in, tt: raw_fn(frozen, x_in, tt, cond)
    tangents = (bcast(scale, x_t) * dxdt / sigma_data, scale)
    f_minus, df = jax.jvp(fn, (x_t / sigma_data, t), tangents)
    return f_minus, sigma_data * df


def scm_loss(
    raw_fn: Callable,
    params,
    x0,
    cond,
    key,
    *,
    sigma_data: float = 0.5,
    p_mean: float = -1.0,
    p_std: float = 1.4,
    teacher: Callable | None = None,
    step=0,
    warmup_steps: int = 10_000,
    tangent_c: float = 0.1,
    raw_logvar_fn: Callable | None = None,
):
    """sCT (``teacher=None``) and sCD: Lu & Song (2024), Algorithm 1 and Sec. 4.

    ``tau ~ N(P_mean, P_std^2)``, ``t = arctan(e^tau / sigma_d)``,
    ``x_t = cos(t) x0 + sin(t) z``; ``dx_t/dt`` from the teacher (sCD) or
    ``cos(t) z - sin(t) x0`` (sCT). With ``r = min(1, step / warmup_steps)``
    (tangent warmup),
    ``g = -cos^2(t) (sigma_d F- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF-/dt)``,
    normalised ``g <- g / (||g|| + c)``; the loss is
    ``||F_theta - F- - g||^2 / D``, or with adaptive weighting (Sec. 4.3)
    ``e^{-u(t)} ||F_theta - F- - g||^2 / D + u(t)`` for a learned ``u`` (the
    paper's ``w_phi = -u``), which ``raw_logvar_fn`` returns with ``F_theta``. Its
    gradient is the paper's Eq. for ``grad E[w(t) sigma_d sin(t) F_theta^T df-/dt]``
    up to ``g``'s normalisation.

    Args:
      raw_fn: ``raw_fn(params, x_in, t, cond) -> F`` (see :func:`trigflow_consistency`).
      params: student parameters (those of ``logvar_fn`` too, if any).
      x0: clean data ``[B, ...]``.
      cond: conditioning pytree with leading axis ``B``, or ``None``.
      key: PRNG key for ``t`` and ``z``.
      sigma_data: ``sigma_d``.
      p_mean, p_std: the log-normal proposal of ``tan(t) sigma_d``.
      teacher: ``velocity(x_t, t, cond) -> dx_t/dt`` (:func:`teacher_velocity`) for
        sCD; ``None`` for sCT.
      step: training iteration (traced is fine), for the warmup.
      warmup_steps: ``H``, iterations of tangent warmup; 0 for none.
      tangent_c: ``c`` of the tangent normalisation (0.1).
      raw_logvar_fn: ``raw_logvar_fn(params, x_in, t, cond) -> (F, u [B])``, the
        student's pass with its learned log-variance (e.g. an
        :class:`jaxgen.models.adaptive_weight.AdaptiveWeightModel`); ``None``: unit
        weight, ``F_theta`` from ``raw_fn``.

    Returns:
      ``(per_example [B], {"loss", "mse", "tangent_norm"})``.
    """
    k_t, k_z = jax.random.split(key)
    b = x0.shape[0]
    t = jnp.arctan(jnp.exp(p_mean + p_std * jax.random.normal(k_t, (b,))) / sigma_data)
    z = sigma_data * jax.random.normal(k_z, x0.shape, x0.dtype)
    tb = bcast(t, x0)
    x_t = jnp.cos(tb) * x0 + jnp.sin(tb) * z
    dxdt = jnp.cos(tb) * z - jnp.sin(tb) * x0 if teacher is None else teacher(x_t, t, cond)
    dxdt = jax.lax.stop_gradient(dxdt)
    r = jnp.minimum(1.0, jnp.asarray(step) / warmup_steps) if warmup_steps > 0 else 1.0
    f_minus, df = scm_tangent(raw_fn, params, x_t, t, dxdt, cond, sigma_data)
    g = -(jnp.cos(tb) ** 2) * (sigma_data * f_minus - dxdt) - r * (
        jnp.cos(tb) * jnp.sin(tb) * x_t + df
    )
    norm = jnp.sqrt(jnp.sum(jnp.square(g).reshape(b, -1), axis=1))
    target = jax.lax.stop_gradient(f_minus + g / bcast(norm + tangent_c, g))
    if raw_logvar_fn is None:
        f_theta, u = raw_fn(params, x_t / sigma_data, t, cond), None
    else:
        f_theta, u = raw_logvar_fn(params, x_t / sigma_data, t, cond)
    mse = jnp.mean(jnp.square(f_theta - target).reshape(b, -1), axis=1)
    per_example = mse if u is None else jnp.exp(-u) * mse + u
    metrics = {"loss": jnp.mean(per_example), "mse": jnp.mean(mse), "tangent_norm": jnp.mean(norm)}
    return per_example, metrics
