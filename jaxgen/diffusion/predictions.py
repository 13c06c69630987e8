"""Exact conversions between prediction types, and EDM preconditioning.

With ``x_t = alpha x0 + sigma eps`` every prediction is an affine function of
``(x0, eps)`` given ``x_t``:

=========  ==============================================  =========================
name       definition                                      reference
=========  ==============================================  =========================
eps        eps                                             Ho et al. 2020
x0         x0                                              Karras et al. 2022 (D)
v          alpha eps - sigma x0                            Salimans & Ho 2022, Eq. 9
velocity   alpha'(t) x0 + sigma'(t) eps  (= d x_t / dt)    Lipman et al. 2023; SiT
score      -eps / sigma  (= grad log p_t(x_t))             Song et al. 2021
=========  ==============================================  =========================

Conversions go through ``(x0, eps)`` and never divide by a quantity that is
zero where the source prediction is well defined, except the two that are
undefined in principle: ``x0`` from ``eps``/``score`` where ``alpha = 0``, and
``eps`` from ``x0`` where ``sigma = 0`` (there the t -> 0 limit ``eps = 0`` of a
data density with finite score is used).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxgen.errors import InputError

PREDICTIONS = ("eps", "x0", "v", "velocity", "score")


def check_prediction(name: str, argument: str = "prediction") -> None:
    """Raise :class:`InputError` unless ``name`` is one of :data:`PREDICTIONS`."""
    if name not in PREDICTIONS:
        raise InputError(f"{argument}={name!r}: use one of {', '.join(PREDICTIONS)}.")


def bcast(c, x):
    """Reshape a per-example coefficient ``c`` ([B] or scalar) to broadcast against ``x``."""
    c = jnp.asarray(c)
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim)) if c.ndim else c


def _coefs(process, t, x):
    return bcast(process.alpha(t), x), bcast(process.sigma(t), x)


def to_x0_eps(pred, kind: str, *, x_t, t, process):
    """The pair ``(x0, eps)`` implied by a prediction of type ``kind`` at ``(x_t, t)``."""
    a, s = _coefs(process, t, x_t)
    if kind == "x0":
        safe_s = jnp.where(s > 0, s, 1)
        return pred, jnp.where(s > 0, (x_t - a * pred) / safe_s, 0)
    if kind in ("eps", "score"):
        eps = pred if kind == "eps" else -s * pred
        return (x_t - s * eps) / a, eps
    if kind == "v":
        n = a * a + s * s
        return (a * x_t - s * pred) / n, (s * x_t + a * pred) / n
    if kind == "velocity":
        da, ds = bcast(process.d_alpha(t), x_t), bcast(process.d_sigma(t), x_t)
        det = a * ds - s * da  # > 0 whenever logsnr strictly decreases
        return (ds * x_t - s * pred) / det, (a * pred - da * x_t) / det
    check_prediction(kind, "src")
    raise AssertionError  # unreachable: check_prediction raised


def from_x0_eps(x0, eps, kind: str, *, t, process):
    """The prediction of type ``kind`` given the pair ``(x0, eps)``."""
    if kind == "x0":
        return x0
    if kind == "eps":
        return eps
    a, s = _coefs(process, t, x0)
    if kind == "v":
        return a * eps - s * x0
    if kind == "velocity":
        return bcast(process.d_alpha(t), x0) * x0 + bcast(process.d_sigma(t), x0) * eps
    if kind == "score":
        return -eps / s
    check_prediction(kind, "dst")
    raise AssertionError


def convert(pred, src: str = "eps", dst: str = "x0", *, x_t, t, process):
    """Convert a model prediction from type ``src`` to type ``dst``.

    Args:
      pred: prediction of type ``src``, same shape as ``x_t``.
      src, dst: one of ``eps``, ``x0``, ``v``, ``velocity``, ``score``.
      x_t: the noisy input the prediction was made at.
      t: time, scalar or ``[B]``.
      process: a :mod:`jaxgen.diffusion.processes` process.

    Returns:
      The prediction of type ``dst``.
    """
    check_prediction(src, "src")
    check_prediction(dst, "dst")
    if src == dst:
        return pred
    x0, eps = to_x0_eps(pred, src, x_t=x_t, t=t, process=process)
    return from_x0_eps(x0, eps, dst, t=t, process=process)


def prediction_weight(kind: str, t, process):
    """``(d pred / d x0)^2`` at fixed ``x_t``: squared error in ``kind`` = this x squared x0 error.

    Used to express every loss weighting as a weight on the x0 error (EDM's
    ``lambda(sigma)``, Karras et al. 2022 Eq. 8) whatever the model predicts.
    """
    a, s = process.alpha(t), process.sigma(t)
    return {
        "x0": lambda: jnp.ones_like(a),
        "eps": lambda: (a / s) ** 2,
        "v": lambda: ((a * a + s * s) / s) ** 2,
        "velocity": lambda: (process.d_alpha(t) - process.d_sigma(t) * a / s) ** 2,
        "score": lambda: (a / (s * s)) ** 2,
    }[kind]()


def edm_precond(raw_fn, process, sigma_data: float = 0.5):
    """Wrap a raw network ``F`` into an ``x0`` predictor (Karras et al. 2022, Eq. 7 and Table 1).

    ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` with
    ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
    ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4``, applied to
    the scaled variable ``x / alpha`` with ``sigma = sigma(t) / alpha(t)`` so the
    same wrapper serves every process (for :class:`EDM` it is exactly Table 1).

    Args:
      raw_fn: ``raw_fn(*leading, x_in, c_noise, cond)``; ``leading`` is whatever
        comes before ``x`` (e.g. ``params`` for training), passed through.
      process: the process whose ``t`` the wrapped model receives.
      sigma_data: standard deviation of the data.

    Returns:
      ``model_fn(*leading, x_t, t, cond) -> x0`` prediction.
    """

    def model_fn(*args):
        *leading, x, t, cond = args
        a, s = _coefs(process, t, x)
        norm = jnp.sqrt(s * s + (a * sigma_data) ** 2)  # alpha * sqrt(sigma~^2 + sd^2)
        c_skip = a * sigma_data**2 / norm**2  # includes the 1/alpha of x / alpha
        c_out = s * sigma_data / norm
        c_noise = (jnp.log(process.sigma(t)) - jnp.log(process.alpha(t))) / 4
        return c_skip * x + c_out * raw_fn(*leading, x / norm, c_noise, cond)

    return model_fn
