"""Guidance and the one denoiser the solvers see.

Classifier-free guidance (Ho & Salimans 2022, Eq. 6) and autoguidance
(Karras et al. 2024, Eq. 1) are the same extrapolation
``D = D_weak + w (D_cond - D_weak)``; they differ in what ``D_weak`` is: the
same model without its condition, or a second, weaker model. Because every
prediction type is affine in ``x0`` at fixed ``x_t``, extrapolating ``x0`` and
``eps`` is the same as extrapolating the raw predictions.
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
      guide_fn: autoguidance: a weaker ``model_fn(x, t, cond)`` with the same
        prediction type (e.g. a smaller or less-trained model).
      interval: ``(sigma_lo, sigma_hi)``: guide only where
        ``sigma_lo < sigma(t)/alpha(t) <= sigma_hi`` and use the conditional
        model elsewhere (Kynkaanniemi et al. 2024, Eq. 3).
      rescale: CFG rescale ``phi`` in [0, 1] (Lin et al. 2024, Eqs. 15-16), on
        the x0 prediction: ``x0 <- phi x0 std(x0_cond)/std(x0) + (1 - phi) x0``.
    """

    scale: float
    uncond: Any = None
    guide_fn: Callable | None = None
    interval: tuple[float, float] | None = None
    rescale: float = 0.0

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

    def dynamic(self) -> np.ndarray:
        """``[scale, sigma_lo, sigma_hi, rescale]``: what may change without recompiling."""
        lo, hi = self.interval or (0.0, float("inf"))
        return np.asarray([self.scale, lo, hi, self.rescale], np.float32)

    @classmethod
    def from_dynamic(cls, values, uncond=None, guide_fn=None) -> Guidance:
        """Rebuild a guidance from :meth:`dynamic` values (possibly traced) inside ``jit``."""
        return cls(values[0], uncond, guide_fn, (values[1], values[2]), values[3])


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
        scale, phi = guidance.scale, guidance.rescale
        lo, hi = guidance.interval or (0.0, jnp.inf)
        sigma = jnp.exp(-0.5 * process.logsnr(t))
        w = jnp.where((sigma > lo) & (sigma <= hi), scale, 1.0).astype(x.dtype)
        x0, eps = x0_w + w * (x0_c - x0_w), eps_w + w * (eps_c - eps_w)
        rescaled = phi * x0 * _std(x0_c) / (_std(x0) + 1e-12) + (1 - phi) * x0
        eps_r = (x - process.alpha(t) * rescaled) / process.sigma(t)
        return jnp.where(phi > 0, rescaled, x0), jnp.where(phi > 0, eps_r, eps)

    def clean(x, t):
        return x / process.alpha(t), jnp.zeros_like(x)

    def denoise(x, t):
        return lax.cond(process.sigma(t) > 0, evaluate, clean, x, t)

    return denoise
