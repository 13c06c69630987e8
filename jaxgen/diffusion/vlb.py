"""IDDPM's learned variance on a discrete VP process (Nichol & Dhariwal 2021, Secs. 3.1-3.2).

A model with ``learn_sigma=True`` (DiT, ADM's U-Net) outputs ``2C`` channels:
its prediction, then ``v`` in ``[-1, 1]`` that places the reverse step's
log-variance between the posterior's ``log beta~_t`` and ``log beta_t``
(Eq. 15, "learned range"). It is trained by the hybrid objective
``L_simple + L_vlb`` (Eq. 16 with ``lambda = 1``: DiT's ``loss_type=MSE``, so the
bound is not rescaled), the bound seeing the mean prediction through a stop
gradient, and sampled by ancestral steps with that variance
(``jaxgen.sampling`` solver ``ddpm_learned``).

Everything is written in the log-SNR ``lambda = log(alpha^2 / sigma^2)`` of the
process, for any step ``t -> s < t`` (a step of the ``N``-step chain in the
bound, a respaced step when sampling, whose ``beta = 1 - abar_t / abar_s`` is
IDDPM's respaced beta): with ``r = 1 - SNR_t / SNR_s = -expm1(lambda_t - lambda_s)``,

    beta   = sigma_t^2 r                      beta~ = sigma_s^2 r
    mu~    = alpha_s r x0 + (alpha_t sigma_s^2) / (alpha_s sigma_t^2) x_t

(Ho et al. 2020, Eqs. 6-7), which keeps float32 accurate at both ends of the
schedule where ``1 - abar_t / abar_s`` cancels. The bound is in bits per
dimension, as IDDPM reports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxgen.diffusion.predictions import bcast, to_x0_eps
from jaxgen.diffusion.processes import VP
from jaxgen.errors import InputError


def check_discrete_vp(process, what: str) -> int:
    """``N`` of a discrete :class:`VP` process; :class:`InputError` naming ``what`` otherwise."""
    if not (isinstance(process, VP) and process.num_steps):
        raise InputError(
            f"{what} is IDDPM's learned variance of a discrete VP(num_steps=N) process; "
            f"got {process!r} (a config: diffusion.process='vp' with num_steps)."
        )
    return process.num_steps


def posterior(process, t, s):
    """The posterior ``q(x_s | x_t, x0)`` of a VP process (Ho et al. 2020, Eqs. 6-7).

    Args:
      process: a :class:`~jaxgen.diffusion.VP` (``alpha^2 = sigmoid(lambda)``).
      t, s: times with ``s < t``, broadcastable arrays.

    Returns:
      ``(c_x0, c_xt, log_beta, log_var)``: the mean is ``c_x0 x0 + c_xt x_t``,
      ``log_beta = log(1 - abar_t / abar_s)`` and ``log_var = log beta~``. At
      ``s = 0`` (``lambda_s = inf``): ``c_x0 = 1``, ``c_xt = 0``, ``log_var = -inf``.
    """
    lam_t, lam_s = process.logsnr(t), process.logsnr(s)
    r = -jnp.expm1(lam_t - lam_s)  # 1 - SNR_t / SNR_s
    c_x0 = process.alpha(s) * r
    c_xt = jnp.exp(0.5 * (lam_t - lam_s)) * process.sigma(s) / process.sigma(t)
    log_r = jnp.log(r)
    # log sigma^2 = log sigmoid(-lambda) = -softplus(lambda)
    return c_x0, c_xt, log_r - jax.nn.softplus(lam_t), log_r - jax.nn.softplus(lam_s)


def learned_range_log_variance(v, log_beta, log_var):
    """IDDPM Eq. 15: ``frac log beta + (1 - frac) log beta~`` with ``frac = (v + 1) / 2``.

    ``v`` is the model's variance output (``[-1, 1]`` spans the range; it is not clipped,
    as in IDDPM); ``log_beta`` and ``log_var`` broadcast against it.
    """
    frac = (v + 1) / 2
    return frac * log_beta + (1 - frac) * log_var


def normal_kl(mean1, logvar1, mean2, logvar2):
    """``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))`` per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF that IDDPM's bound uses."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """``log`` of the Gaussian's mass on the 8-bit bin of ``x`` in ``[-1, 1]`` (Ho et al.
    2020, Eq. 13), per element, in nats; the outer bins extend to infinity.

    As IDDPM's ``discretized_gaussian_log_likelihood``: bins of half-width ``1/255``,
    the tanh CDF approximation, masses clamped at ``1e-12``.
    """
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(a):
    return jnp.mean(a.reshape(a.shape[0], -1), axis=1)


def vb_terms(x0, x_t, t, x0_pred, v, *, process):
    """IDDPM's ``_vb_terms_bpd``: the term ``L_{t-1}`` of the bound, ``[B]``, in bits/dim.

    For ``t = k / N`` with ``k > 1``, ``KL(q(x_{t-1/N} | x_t, x0) || p(x_{t-1/N} | x_t))``
    (Ho et al. 2020, Eq. 5); for ``k = 1``, the decoder's ``-log p(x0 | x_t)``
    (:func:`discretized_gaussian_log_likelihood`). ``p`` has the posterior mean of
    ``x0_pred`` and the learned-range variance of ``v``; both log-variances are IDDPM's
    "clipped" ones, which at ``k = 1`` take the posterior variance of ``k = 2``.

    Args:
      x0: clean data ``[B, ...]`` (8-bit levels in [-1, 1] for the decoder term).
      x_t: ``alpha(t) x0 + sigma(t) eps``.
      t: ``[B]`` times on the grid ``k / N``.
      x0_pred: the model's ``x0``; the hybrid loss passes it through a stop gradient.
      v: the model's variance channels, like ``x0``.
      process: a discrete :class:`~jaxgen.diffusion.VP`.
    """
    n = check_discrete_vp(process, "vb_terms")
    k = jnp.round(t * n)  # in t's float type
    c_x0, c_xt, log_beta, _ = posterior(process, k / n, (k - 1) / n)
    kc = jnp.maximum(k, 2)  # posterior_log_variance_clipped: beta~ of k = 2 at k = 1
    log_var = posterior(process, kc / n, (kc - 1) / n)[3]
    c_x0, c_xt, log_beta, log_var = (bcast(c, x0) for c in (c_x0, c_xt, log_beta, log_var))
    true_mean = c_x0 * x0 + c_xt * x_t
    model_mean = c_x0 * x0_pred + c_xt * x_t
    model_log_var = learned_range_log_variance(v, log_beta, log_var)
    kl = _mean_flat(normal_kl(true_mean, log_var, model_mean, model_log_var)) / math.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(
        x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
    return jnp.where(k == 1, nll, kl)


def hybrid_loss(model_fn, params, x0, cond, key, *, base_loss: Callable, process,
                prediction: str, **kwargs):
    """IDDPM's ``L_hybrid = L_simple + L_vlb`` (Eq. 16, ``lambda = 1`` as DiT trains).

    ``base_loss`` (:func:`jaxgen.diffusion.loss`, with its time sampler, weighting and
    label dropout) draws ``t`` and ``x_t`` and calls the model once, asking for its
    variance channels (``model_fn(..., keep_variance=True)``, see
    :func:`jaxgen.models.as_model_fn`); it sees the prediction channels only. That one
    output then gives :func:`vb_terms`, with the prediction behind
    ``jax.lax.stop_gradient``: the bound trains ``v`` and never the mean (IDDPM's
    ``frozen_out``). Times must lie on the grid ``k / N`` (``time_sampler="discrete"``).

    Returns:
      ``(loss, metrics)``: ``mean(base) + mean(vb)``; ``metrics["vb"]`` is the batch's
      mean bound term in bits/dim.
    """
    check_discrete_vp(process, "the hybrid loss")
    seen = []

    def with_variance(p, x_t, t, c, **kw):
        out = model_fn(p, x_t, t, c, keep_variance=True, **kw)
        ch = x_t.shape[-1]
        if out.shape[-1] != 2 * ch:
            raise InputError(f"the hybrid loss needs the model's 2 x {ch} output channels "
                             f"(prediction, variance); it gave {out.shape[-1]}.")
        seen.append((x_t, t, out))
        return out[..., :ch]

    value, metrics = base_loss(with_variance, params, x0, cond, key, **kwargs)
    if len(seen) != 1:
        raise InputError(f"the hybrid loss: base_loss called the model {len(seen)} times; "
                         "its bound term reads the one denoising pass.")
    x_t, t, out = seen[0]
    out = out.astype(x0.dtype)
    pred, v = jnp.split(out, 2, axis=-1)
    x0_pred = to_x0_eps(jax.lax.stop_gradient(pred), prediction, x_t=x_t, t=t,
                        process=process)[0]
    vb = jnp.mean(vb_terms(x0, x_t, t, x0_pred, v, process=process))
    value = jnp.mean(value) + vb
    return value, dict(metrics, loss=value, vb=vb)
