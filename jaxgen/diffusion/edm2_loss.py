"""The EDM2 training loss with learned uncertainty weighting (Karras et al., CVPR 2024).

``L = E_{sigma, y, n} [ lambda(sigma) / e^{u(sigma)} ||D(y + n; sigma) - y||^2 + u(sigma) ]``
(Eq. 21; Eq. 14-16 for the rest): ``ln sigma ~ N(P_mean, P_std^2)``, the EDM
weight ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2`` and
``u(sigma)`` the network's learned log-variance of the weighted loss. A
transcription of NVlabs/edm2 ``training/training_loop.py`` ``EDM2Loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def edm2_loss(
    model_fn: Callable[..., tuple[Array, Array]],
    params: Any,
    x0: Array,
    cond: Any,
    key: Array,
    *,
    p_mean: float = -0.4,
    p_std: float = 1.0,
    sigma_data: float = 0.5,
) -> tuple[Array, dict[str, Array]]:
    """Per-example EDM2 loss with the uncertainty ``u(sigma)`` as a learned weight (Eq. 21).

    The official loss is per element, ``lambda / e^u (D - y)^2 + u``, summed
    over the batch and divided by the batch size; the value here for each
    example is its sum over the example's elements, so ``mean`` over the
    batch is exactly the official objective.

    Args:
      model_fn: ``model_fn(params, x_t, sigma, cond) -> (denoised, logvar)`` with
        ``sigma`` ``[B]`` and ``logvar`` broadcastable to ``denoised`` (e.g.
        ``[B, 1, 1, 1]``): :class:`jaxgen.models.EDM2` applied with ``return_logvar=True``.
      params: model parameters (what gradients are taken with respect to).
      x0: clean data ``y`` ``[B, ...]``.
      cond: conditioning pytree with leading axis ``B``, or ``None``.
      key: PRNG key for sigma and the noise.
      p_mean: mean of ``ln sigma`` (-0.4 for ImageNet-512 latents, -0.8 for ImageNet-64).
      p_std: standard deviation of ``ln sigma`` (1.0 latents, 1.6 ImageNet-64).
      sigma_data: standard deviation of the data.

    Returns:
      ``(loss [B], metrics)``; metrics (batch means): ``loss``, ``weighted_mse``
      (``lambda`` times the mean squared error, 1 for the ideal denoiser of
      Gaussian data of standard deviation ``sigma_data``) and ``logvar``.
    """
    k_sigma, k_noise = jax.random.split(key)
    b = x0.shape[0]
    sigma = jnp.exp(p_mean + p_std * jax.random.normal(k_sigma, (b,), jnp.float32))  # [B]
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2  # [B]
    bshape = (b,) + (1,) * (x0.ndim - 1)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32) * sigma.reshape(bshape)
    denoised, logvar = model_fn(params, x0 + noise, sigma, cond)
    sq = jnp.square(denoised.astype(jnp.float32) - x0.astype(jnp.float32))
    logvar = jnp.broadcast_to(logvar.astype(jnp.float32).reshape(bshape), x0.shape)
    per_element = weight.reshape(bshape) / jnp.exp(logvar) * sq + logvar
    axes = tuple(range(1, x0.ndim))
    loss = jnp.sum(per_element, axis=axes)  # [B]
    metrics = {
        "loss": jnp.mean(loss),
        "weighted_mse": jnp.mean(weight * jnp.mean(sq, axis=axes)),
        "logvar": jnp.mean(logvar),
    }
    return loss, metrics
