"""Guidance and the one denoiser the solvers see.

Classifier-free guidance (Ho & Salimans 2022, Eq. 6) and autoguidance
(Karras et al. 2024, Eq. 1) are the same extrapolation
``D = D_weak + w (D_cond - D_weak)``; they differ in what ``D_weak`` is: the
same model without its condition, or a second, weaker model. Because every
prediction type is affine in ``x0`` at fixed ``x_t``, extrapolating ``x0`` and
``eps`` is the same as extrapolating the raw predictions.

Variants of the combination (``Guidance.method``), all from the same one
batched call per step, so they cost what CFG costs:

- ``"cfg++"`` (Chung et al. 2024, CFG++): ``x0`` is extrapolated with
  ``lambda`` (usually in [0, 1]) but the solver re-noises with the weak
  ``eps``: the DDIM step becomes ``alpha_s x0_lambda + sigma_s eps_weak``.
  Solvers that use ``x0`` only (DPM-Solver++, UniPC) see plain CFG at ``lambda``.
  ``lambda = 0`` is the unguided (weak) model.
- ``"apg"`` (Sadat et al. 2024, adaptive projected guidance, Sec. 4):
  the update ``D_cond - D_weak`` on ``x0``, its norm capped at ``r``, is split
  into parts parallel and orthogonal to ``D_cond``; the parallel part (which
  oversaturates) is weighted by ``eta``. The paper's momentum on the update is not
  available: the denoiser is stateless across solver steps.
- ``channels``: guide only the first channels of the last axis and take the
  conditional prediction elsewhere (DiT's ``forward_with_cfg`` guides 3 of
  its 4 latent channels).

Outside the guidance interval, and at ``scale = 1`` for ``cfg`` and ``apg``,
the denoiser returns the conditional prediction bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxgen.diffusion.predictions import to_x0_eps
from jaxgen.errors import InputError


@dataclasses.dataclass(frozen=True, eq=False)
class Guidance:
    """How to guide the denoiser.

    Args:
      scale: guidance weight ``w`` (1 = no guidance).
      uncond: classifier-free guidance: the "no condition" pytree (same
        structure as ``cond``; a leading axis of 1 broadcasts). The conditional
        and unconditional passes run as one model call on a doubled batch.
      guide_fn: autoguidance: a weaker ``model_fn(params, x, t, cond)`` with the same
        prediction type (e.g. a smaller or less-trained model).
      interval: ``(sigma_lo, sigma_hi)``: guide only where
        ``sigma_lo < sigma(t)/alpha(t) <= sigma_hi`` and use the conditional
        model elsewhere (Kynkaanniemi et al. 2024, Eq. 3).
      rescale: CFG rescale ``phi`` in [0, 1] (Lin et al. 2024, Eqs. 15-16), on
        the x0 prediction: ``x0 <- phi x0 std(x0_cond)/std(x0) + (1 - phi) x0``.
      guide_params: the weights of ``guide_fn`` (traced, like the main model's).
      method: ``"cfg"`` (the extrapolation above), ``"cfg++"`` or ``"apg"`` (module
        docstring); inside ``jit`` its index in :data:`METHODS`.
      channels: guide only the first ``channels`` channels (last axis); 0 = all.
      apg_eta: APG's weight ``eta`` of the update's part parallel to ``D_cond``.
      apg_threshold: APG's norm threshold ``r`` on the update (0 = no cap).
    """

    scale: float
    uncond: Any = None
    guide_fn: Callable | None = None
    interval: tuple[float, float] | None = None
    rescale: float = 0.0
    guide_params: Any = None
    method: str = "cfg"
    channels: int = 0
    apg_eta: float = 0.0
    apg_threshold: float = 0.0

    def check(self, cond) -> None:
        """Raise :class:`InputError` for an inconsistent guidance configuration."""
        if (self.uncond is None) == (self.guide_fn is None):
            raise InputError(
                "Guidance needs exactly one of uncond= (classifier-free guidance) "
                "or guide_fn= (autoguidance)."
            )
        if self.uncond is not None and cond is None:
            raise InputError("classifier-free guidance needs cond=: there is nothing to guide by.")
        if self.interval is not None and not 0 <= self.interval[0] < self.interval[1]:
            raise InputError(f"Guidance interval={self.interval}: need 0 <= lo < hi.")
        if not 0.0 <= self.rescale <= 1.0:
            raise InputError(f"Guidance rescale={self.rescale} must lie in [0, 1].")
        if self.method not in METHODS:
            raise InputError(f"Guidance method={self.method!r}: use one of {', '.join(METHODS)}.")
        if not (isinstance(self.channels, int) and self.channels >= 0):
            raise InputError(f"Guidance channels={self.channels!r}: an int >= 0 (0 = all).")
        if not (self.apg_threshold >= 0 and np.isfinite(self.apg_eta)):
            raise InputError(
                f"Guidance apg_threshold={self.apg_threshold}, apg_eta={self.apg_eta}: "
                "need a threshold >= 0 (0 = none) and a finite eta."
            )

    def dynamic(self) -> np.ndarray:
        """``[scale, sigma_lo, sigma_hi, rescale, method, channels, apg_eta, apg_threshold]``.

        What may change without recompiling (the method as its index in :data:`METHODS`).
        """
        lo, hi = self.interval or (0.0, float("inf"))
        extra = [METHODS.index(self.method), self.channels, self.apg_eta, self.apg_threshold]
        return np.asarray([self.scale, lo, hi, self.rescale, *extra], np.float32)

    @classmethod
    def from_dynamic(cls, values, uncond=None, guide_fn=None) -> Guidance:
        """Rebuild a guidance from :meth:`dynamic` values (possibly traced) inside ``jit``.

        ``guide_fn`` here is already bound to its weights: ``guide_fn(x, t, cond)``.
        """
        return cls(
            values[0],
            uncond,
            guide_fn,
            (values[1], values[2]),
            values[3],
            method=values[4],
            channels=values[5],
            apg_eta=values[6],
            apg_threshold=values[7],
        )


METHODS = ("cfg", "cfg++", "apg")


def _per_sample(fn, a):
    """``fn`` over all but the leading axis, kept broadcastable against ``a``."""
    return fn(a, axis=tuple(range(1, a.ndim)), keepdims=True)


def _apg_update(diff, x0_c, eta, threshold):
    """Sadat et al. (2024), APG without momentum: capped, projected ``diff``."""
    norm = lambda a: jnp.sqrt(_per_sample(jnp.sum, a * a))
    capped = diff * jnp.minimum(1.0, threshold / jnp.maximum(norm(diff), 1e-12))
    diff = jnp.where(threshold > 0, capped, diff)
    unit = x0_c / jnp.maximum(norm(x0_c), 1e-12)
    parallel = _per_sample(jnp.sum, diff * unit) * unit
    return diff - parallel + eta * parallel


def _combine(g: Guidance, x, t, process, x0_c, eps_c, x0_w, eps_w):
    """The guided ``(x0, eps)`` from the conditional and weak predictions (module docstring)."""
    method = METHODS.index(g.method) if isinstance(g.method, str) else g.method
    w, phi = jnp.asarray(g.scale, x.dtype), g.rescale
    x0 = jnp.where(
        method == 2,
        x0_c + (w - 1) * _apg_update(x0_c - x0_w, x0_c, g.apg_eta, g.apg_threshold),
        x0_w + w * (x0_c - x0_w),
    )
    x0 = jnp.where(phi > 0, phi * x0 * _std(x0_c) / (_std(x0) + 1e-12) + (1 - phi) * x0, x0)
    linear = (method == 0) & (phi == 0)  # eps extrapolates like x0; else it follows from x0
    eps = (x - process.alpha(t) * x0) / process.sigma(t)
    eps = jnp.where(method == 1, eps_w, jnp.where(linear, eps_w + w * (eps_c - eps_w), eps))
    channel = jnp.arange(x.shape[-1])
    guided = (g.channels == 0) | (channel < g.channels)
    lo, hi = g.interval or (0.0, jnp.inf)
    sigma = jnp.exp(-0.5 * process.logsnr(t))
    plain = (sigma <= lo) | (sigma > hi) | ((w == 1) & (method != 1))
    keep = guided & ~plain
    return jnp.where(keep, x0, x0_c), jnp.where(keep, eps, eps_c)


def _std(x):
    return jnp.std(x.reshape(x.shape[0], -1), axis=1).reshape((-1,) + (1,) * (x.ndim - 1))


def make_denoiser(model_fn, process, prediction: str, cond=None, guidance: Guidance | None = None):
    """Build ``denoise(x, t) -> (x0, eps)`` from a model, its prediction type and guidance.

    At ``sigma(t) = 0`` the model is not called: ``(x / alpha, 0)`` is returned
    (``lax.cond``, so nothing is evaluated and wasted).

    Args:
      model_fn: ``model_fn(x, t, cond)``, ``t`` of shape ``[B]``.
      process: the noise process.
      prediction: what ``model_fn`` returns.
      cond: conditioning pytree or ``None``.
      guidance: a :class:`Guidance` (its numbers may be traced) or ``None``.
    """

    def predict(fn, x, t, c):
        tb = jnp.full((x.shape[0],), t, x.dtype)
        return to_x0_eps(fn(x, tb, c).astype(x.dtype), prediction, x_t=x, t=t, process=process)

    def evaluate(x, t):
        if guidance is None:
            return predict(model_fn, x, t, cond)
        if guidance.guide_fn is None:
            fit = lambda u, c: jnp.broadcast_to(u, c.shape).astype(c.dtype)
            null = jax.tree.map(fit, guidance.uncond, cond)
            both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, null)
            x0, eps = predict(model_fn, jnp.concatenate([x, x]), t, both)
            (x0_c, x0_w), (eps_c, eps_w) = jnp.split(x0, 2), jnp.split(eps, 2)
        else:
            x0_c, eps_c = predict(model_fn, x, t, cond)
            x0_w, eps_w = predict(guidance.guide_fn, x, t, cond)
        return _combine(guidance, x, t, process, x0_c, eps_c, x0_w, eps_w)

    def clean(x, t):
        return x / process.alpha(t), jnp.zeros_like(x)

    def denoise(x, t):
        return lax.cond(process.sigma(t) > 0, evaluate, clean, x, t)

    return denoise
