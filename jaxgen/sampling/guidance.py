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
  oversaturates) is weighted by ``eta``. With ``apg_momentum = beta`` the update
  first becomes the running sum ``m <- diff + beta m`` of Algorithm 1 (the paper
  uses ``beta < 0``, e.g. -0.5); ``m`` is state of the denoiser, carried through
  the solver's scan and updated at every guided model evaluation (every stage
  of a multi-stage solver), per sample.
- ``pag_scale`` (Ahn et al. 2024, perturbed-attention guidance, Eq. 11):
  ``+ s (D_cond - D_perturbed)``, where ``D_perturbed`` is the conditional model
  with the self-attention maps of chosen layers replaced by the identity (a
  model with that switch reads ``cond["perturb_attention"]``, ``[B]`` bool). It
  adds to any of the above (or stands alone: ``scale = 1`` without ``uncond``), the
  perturbed pass joins the same batched call (3 B rows with CFG), and
  ``pag_scale = 0`` compiles no perturbed pass at all.
- ``channels``: guide only the first channels of the last axis and take the
  conditional prediction elsewhere (DiT's ``forward_with_cfg`` guides 3 of
  its 4 latent channels).

Outside the guidance interval, and at ``scale = 1`` for ``cfg`` and ``apg``
(without PAG), the denoiser returns the conditional prediction bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
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
      apg_momentum: APG's momentum ``beta`` (0 = none; the paper's is negative).
      pag_scale: perturbed-attention guidance scale ``s`` (0 = none); needs a model
        that reads ``cond["perturb_attention"]`` (jaxgen's DiT and U-Net).
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
    apg_momentum: float = 0.0
    pag_scale: float = 0.0

    def check(self, cond) -> None:
        """Raise :class:`InputError` for an inconsistent guidance configuration."""
        pag_alone = self.uncond is None and self.guide_fn is None and self.pag_scale
        if (self.uncond is None) == (self.guide_fn is None) and not (pag_alone and self.scale == 1):
            raise InputError(
                "Guidance needs exactly one of uncond= (classifier-free guidance) "
                "or guide_fn= (autoguidance); perturbed-attention guidance alone is "
                "Guidance(1.0, pag_scale=s)."
            )
        if not (np.isfinite(self.pag_scale) and -1 < self.apg_momentum < 1):
            raise InputError(
                f"Guidance pag_scale={self.pag_scale}, apg_momentum={self.apg_momentum}: "
                "need a finite pag_scale and a momentum in (-1, 1)."
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
        """``[scale, sigma_lo, sigma_hi, rescale, method, channels, apg_eta, apg_threshold,
        apg_momentum, pag_scale]``.

        What may change without recompiling (the method as its index in :data:`METHODS`);
        only whether ``pag_scale`` is 0 is static (it decides the perturbed pass).
        """
        lo, hi = self.interval or (0.0, float("inf"))
        extra = [METHODS.index(self.method), self.channels, self.apg_eta, self.apg_threshold]
        extra += [self.apg_momentum, self.pag_scale]
        return np.asarray([self.scale, lo, hi, self.rescale, *extra], np.float32)

    @classmethod
    def from_dynamic(cls, values, uncond=None, guide_fn=None, pag: bool = False) -> Guidance:
        """Rebuild a guidance from :meth:`dynamic` values (possibly traced) inside ``jit``.

        ``guide_fn`` here is already bound to its weights: ``guide_fn(x, t, cond)``;
        ``pag``: whether the perturbed pass is compiled in (else ``pag_scale`` is 0).
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
            apg_momentum=values[8],
            pag_scale=values[9] if pag else 0.0,
        )


METHODS = ("cfg", "cfg++", "apg")


def _per_sample(fn, a):
    """``fn`` over all but the leading axis, kept broadcastable against ``a``."""
    return fn(a, axis=tuple(range(1, a.ndim)), keepdims=True)


def _apg_update(diff, x0_c, eta, threshold):
    """Sadat et al. (2024), Algorithm 1 after the momentum: capped, projected ``diff``."""
    norm = lambda a: jnp.sqrt(_per_sample(jnp.sum, a * a))
    capped = diff * jnp.minimum(1.0, threshold / jnp.maximum(norm(diff), 1e-12))
    diff = jnp.where(threshold > 0, capped, diff)
    unit = x0_c / jnp.maximum(norm(x0_c), 1e-12)
    parallel = _per_sample(jnp.sum, diff * unit) * unit
    return diff - parallel + eta * parallel


def _combine(g: Guidance, x, t, process, x0_c, eps_c, x0_w, eps_w, momentum):
    """The guided ``(x0, eps)`` and APG's new running sum (module docstring)."""
    method = METHODS.index(g.method) if isinstance(g.method, str) else g.method
    w, phi = jnp.asarray(g.scale, x.dtype), g.rescale
    lo, hi = g.interval or (0.0, jnp.inf)
    sigma = jnp.exp(-0.5 * process.logsnr(t))
    outside = (sigma <= lo) | (sigma > hi)
    plain = outside | ((w == 1) & (method != 1))
    # Algorithm 1's running sum, advanced only where APG acts.
    summed = x0_c - x0_w + g.apg_momentum * momentum
    momentum = jnp.where((method == 2) & ~plain, summed, momentum)
    x0 = jnp.where(
        method == 2,
        x0_c + (w - 1) * _apg_update(momentum, x0_c, g.apg_eta, g.apg_threshold),
        x0_w + w * (x0_c - x0_w),
    )
    x0 = jnp.where(phi > 0, phi * x0 * _std(x0_c) / (_std(x0) + 1e-12) + (1 - phi) * x0, x0)
    linear = (method == 0) & (phi == 0)  # eps extrapolates like x0; else it follows from x0
    eps = (x - process.alpha(t) * x0) / process.sigma(t)
    eps = jnp.where(method == 1, eps_w, jnp.where(linear, eps_w + w * (eps_c - eps_w), eps))
    keep = _guided_channels(g, x) & ~plain
    return jnp.where(keep, x0, x0_c), jnp.where(keep, eps, eps_c), momentum, outside


def _guided_channels(g: Guidance, x):
    return (g.channels == 0) | (jnp.arange(x.shape[-1]) < g.channels)


def _std(x):
    return jnp.std(x.reshape(x.shape[0], -1), axis=1).reshape((-1,) + (1,) * (x.ndim - 1))


PERTURB_KEY = "perturb_attention"
"""The ``cond`` entry (``[B]`` bool) that switches a model's chosen self-attention maps to
the identity (perturbed-attention guidance); jaxgen's DiT and U-Net read it."""


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """What a solver calls: ``step(x, t, state) -> (x0, eps, state)`` and ``init(x) -> state``.

    The state (APG's running sum, cached features, a learned variance) is a pytree a
    solver carries through its scan from ``init(x_T)``. Calling the denoiser, ``denoise(x, t)``,
    is one evaluation from the initial state: ``(x0, eps)``.
    """

    step: Callable
    init: Callable

    def __call__(self, x, t):
        return self.step(x, t, self.init(x))[:2]


def make_denoiser(
    model_fn,
    process,
    prediction: str,
    cond=None,
    guidance: Guidance | None = None,
    *,
    cache_interval: int | None = None,
    learned_variance: bool = False,
) -> Denoiser:
    """Build the :class:`Denoiser` of a model, its prediction type and guidance.

    At ``sigma(t) = 0`` the model is not called: ``(x / alpha, 0)`` is returned
    and the state kept (``lax.cond``, so nothing is evaluated and wasted).

    Feature caching (``cache_interval = k``): every ``k``-th model call (the first
    included) is a full one, ``model_fn(x, t, cond, fill_cache=True) -> (pred,
    features)``; the calls in between reuse the features, ``model_fn(x, t, cond,
    cache=features)`` (DeepCache for the U-Net, FORA for DiT: see their
    ``fill_cache``). Features and the call count are denoiser state, so any solver
    carries them; ``k = 1`` refreshes at every call. The autoguidance model is not cached.

    Args:
      model_fn: ``model_fn(x, t, cond)``, ``t`` of shape ``[B]``.
      process: the noise process.
      prediction: what ``model_fn`` returns.
      cond: conditioning pytree or ``None``.
      guidance: a :class:`Guidance` (its numbers may be traced; a traced
        ``pag_scale`` means the perturbed pass is compiled in) or ``None``.
      cache_interval: ``k`` above, or ``None`` for no cache.
      learned_variance: call ``model_fn(..., keep_variance=True)`` (``2C`` channels:
        the prediction, then IDDPM's variance interpolation ``v``) and keep ``v`` of the
        conditional pass in ``state["variance"]`` after each evaluation, unguided, as
        DiT's ``forward_with_cfg`` does (the ``ddpm_learned`` solver reads it).
    """
    if learned_variance:
        model_fn = functools.partial(model_fn, keep_variance=True)
    pag = guidance is not None and not (
        isinstance(guidance.pag_scale, int | float) and guidance.pag_scale == 0
    )

    def predict(fn, x, t, c):
        tb = jnp.full((x.shape[0],), t, x.dtype)
        return to_x0_eps(fn(x, tb, c).astype(x.dtype), prediction, x_t=x, t=t, process=process)

    def inputs(x):
        """The rows of the one batched call (``x`` repeated), their conditions, the count."""
        conds = [cond]
        if guidance is not None and guidance.guide_fn is None and guidance.uncond is not None:
            fit = lambda u, c: jnp.broadcast_to(u, c.shape).astype(c.dtype)
            conds.append(jax.tree.map(fit, guidance.uncond, cond))
        if pag:
            flag = lambda on: {PERTURB_KEY: jnp.full((x.shape[0],), on)}
            conds = [{**(c or {}), **flag(False)} for c in conds] + [{**(cond or {}), **flag(True)}]
        if len(conds) == 1:
            return x, cond, 1
        both = jax.tree.map(lambda *c: jnp.concatenate(c), *conds)
        return jnp.concatenate([x] * len(conds)), both, len(conds)

    def call(x, t, state):
        """The ``(x0, eps)`` of every part of the batched call, and the new state."""
        xb, cb, n = inputs(x)
        tb = jnp.full((xb.shape[0],), t, x.dtype)
        if cache_interval is None:
            out = model_fn(xb, tb, cb)
        else:
            features, count = state["cache"]["features"], state["cache"]["count"]
            full = lambda: model_fn(xb, tb, cb, fill_cache=True)
            reuse = lambda: (model_fn(xb, tb, cb, cache=features), features)
            out, features = lax.cond(count % cache_interval == 0, full, reuse)
            state = {**state, "cache": {"features": features, "count": count + 1}}
        if learned_variance:
            out, v = jnp.split(out, 2, axis=-1)
            state = {**state, "variance": jnp.split(v.astype(x.dtype), n)[0]}
        x0, eps = to_x0_eps(out.astype(x.dtype), prediction, x_t=xb, t=t, process=process)
        return list(zip(jnp.split(x0, n), jnp.split(eps, n), strict=True)), state

    def evaluate(x, t, state):
        out, state = call(x, t, state)
        if guidance is None:
            return (*out[0], state)
        (x0_c, eps_c), (x0_w, eps_w) = out[0], out[1 if len(out) > 1 + pag else 0]
        if guidance.guide_fn is not None:
            x0_w, eps_w = predict(guidance.guide_fn, x, t, cond)
        x0, eps, momentum, outside = _combine(
            guidance, x, t, process, x0_c, eps_c, x0_w, eps_w, state["apg"]
        )
        if pag:  # Ahn et al. (2024), Eq. 11: + s (D_cond - D_perturbed), inside the interval
            (x0_p, eps_p), s = out[-1], guidance.pag_scale
            on = _guided_channels(guidance, x) & ~outside
            x0 = x0 + jnp.where(on, s * (x0_c - x0_p), 0)
            eps = eps + jnp.where(on, s * (eps_c - eps_p), 0)
        return x0, eps, {**state, "apg": momentum}

    def clean(x, t, state):
        return x / process.alpha(t), jnp.zeros_like(x), state

    def step(x, t, state):
        return lax.cond(process.sigma(t) > 0, evaluate, clean, x, t, state)

    def init(x):
        state = {} if guidance is None else {"apg": jnp.zeros_like(x)}
        if learned_variance:
            state["variance"] = jnp.zeros_like(x)
        if cache_interval is not None:
            xb, cb, _ = inputs(x)
            tb = jnp.zeros((xb.shape[0],), x.dtype)
            f = jax.eval_shape(lambda: model_fn(xb, tb, cb, fill_cache=True)[1])
            zero = jnp.zeros((), jnp.int32)
            state["cache"] = {"features": jnp.zeros(f.shape, f.dtype), "count": zero}
        return state

    return Denoiser(step, init)
