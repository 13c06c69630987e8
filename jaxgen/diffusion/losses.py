"""The training loss: one function, with pluggable time samplers, weightings and distances.

Per-example losses are ``[B]``; weighting and the mean over the batch happen
in one place, :func:`loss` (EDM ``training/loss.py``, Karras et al. 2022 Eq. 2).

Every weighting is a weight ``lambda(t)`` on the *x0* squared error, the
common currency of Karras et al. (2022, Eq. 8) and Kingma & Gao (2023); the
loss on the model's own prediction is multiplied by
``lambda(t) / prediction_weight(prediction, t)`` so that, e.g., ``min_snr``
means the same thing for an eps, v or velocity model. ``uniform`` is the
plain mean squared error of the model's own prediction.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxgen.diffusion.predictions import bcast, check_prediction, from_x0_eps, prediction_weight
from jaxgen.errors import InputError

# ---------------------------------------------------------------- time samplers
# A time sampler is ``sampler(key, batch_size, process) -> t [B]``.


def uniform_time() -> Callable:
    """``t ~ U(t_min, t_max)`` of the process (Ho et al. 2020; Song et al. 2021)."""

    def sampler(key, n, process):
        return jax.random.uniform(key, (n,), minval=process.t_min, maxval=process.t_max)

    return sampler


def lognormal_time(p_mean: float = -1.2, p_std: float = 1.2) -> Callable:
    """``ln sigma~ ~ N(p_mean, p_std^2)``, ``sigma~ = sigma / alpha`` (Karras et al. 2022)."""

    def sampler(key, n, process):
        log_sigma = p_mean + p_std * jax.random.normal(key, (n,))
        return process.t_from_logsnr(-2 * log_sigma)

    return sampler


def logit_normal_time(mean: float = 0.0, std: float = 1.0) -> Callable:
    """``t = t_min + (t_max - t_min) sigmoid(n)``, ``n ~ N(mean, std^2)``.

    The logit-normal sampling of Esser et al. (2024), Eq. 19.
    """

    def sampler(key, n, process):
        u = jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,)))
        return process.t_min + (process.t_max - process.t_min) * u

    return sampler


def discrete_time() -> Callable:
    """``t = k / N`` with ``k ~ U{1..N}``: discrete DDPM training (Ho et al. 2020, Algorithm 1)."""

    def sampler(key, n, process):
        if not getattr(process, "num_steps", None):
            raise InputError(
                f"time_sampler='discrete' needs a discrete VP(num_steps=N); got {process!r}."
            )
        k = jax.random.randint(key, (n,), 1, process.num_steps + 1)
        return k / process.num_steps

    return sampler


TIME_SAMPLERS = {
    "uniform": uniform_time,
    "lognormal": lognormal_time,
    "logit_normal": logit_normal_time,
    "discrete": discrete_time,
}

# ---------------------------------------------------------------- weightings
# A weighting is ``weighting(t, process) -> lambda(t) [B]``, a weight on the x0 error;
# ``None`` from the factory means "uniform in the model's own prediction".


def _snr(t, process):
    return jnp.exp(process.logsnr(t))


def min_snr(gamma: float = 5.0) -> Callable:
    """``lambda = min(SNR, gamma)`` on the x0 error (Hang et al. 2023, Eq. 7)."""
    return lambda t, process: jnp.minimum(_snr(t, process), gamma)


def edm_weight(sigma_data: float = 0.5) -> Callable:
    """``lambda = (sigma~^2 + sd^2) / (sigma~ sd)^2``, ``sigma~ = sigma / alpha``.

    EDM's loss weight (Karras et al. 2022, Table 1), here on any process.
    """

    def weight(t, process):
        sigma2 = jnp.exp(-process.logsnr(t))
        return (sigma2 + sigma_data**2) / (sigma2 * sigma_data**2)

    return weight


def p2_weight(k: float = 1.0, gamma: float = 1.0) -> Callable:
    """P2: ``1 / (k + SNR)^gamma`` on the eps error (Choi et al. 2022, Eq. 8).

    That is ``SNR / (k + SNR)^gamma`` on the x0 error.
    """

    def weight(t, process):
        snr = _snr(t, process)
        return snr / (k + snr) ** gamma

    return weight


def uniform_weight() -> None:
    """Unit weight on the squared error of the model's own prediction."""
    return None


WEIGHTINGS = {"uniform": uniform_weight, "min_snr": min_snr, "edm": edm_weight, "p2": p2_weight}

# ---------------------------------------------------------------- distances
# A distance is ``distance(pred, target, t, process) -> [B]``.


def mse() -> Callable:
    """Mean over all non-batch axes of the squared error."""
    return lambda pred, target, t, process: jnp.mean(
        jnp.square(pred - target).reshape(pred.shape[0], -1), axis=1
    )


def pseudo_huber(c: float = 0.00054, scheduled: bool = False) -> Callable:
    """``sqrt(mse + c^2) - c`` per example (Song & Dhariwal 2024, Sec. 3.3, with c / sqrt(d)).

    Args:
      c: the Huber scale for the mean squared error; Song & Dhariwal's
        ``0.00054 sqrt(d)`` for the summed error becomes ``0.00054``.
      scheduled: let ``c`` fall with noise, ``c(t) = (1 - c) / (1 + sigma~)^2 + c``
        (Khrapov et al. 2024, the "snr" schedule), robust to corrupted data.
    """

    def distance(pred, target, t, process):
        err = mse()(pred, target, t, process)
        ct = c
        if scheduled:
            sigma = jnp.exp(-0.5 * process.logsnr(t))
            ct = (1 - c) / (1 + sigma) ** 2 + c
        return jnp.sqrt(err + ct**2) - ct

    return distance


DISTANCES = {"mse": mse, "pseudo_huber": pseudo_huber}


def resolve_option(value, registry: dict, argument: str):
    """``registry[value]()`` for a name, ``value`` itself for a callable or ``None``.

    Raises:
      InputError: an unknown name, or neither a name nor a callable, naming ``argument``.
    """
    if isinstance(value, str):
        if value not in registry:
            raise InputError(
                f"{argument}={value!r}: use one of {', '.join(registry)} or a callable."
            )
        return registry[value]()
    if value is None or callable(value):
        return value
    raise InputError(f"{argument}={value!r}: use one of {', '.join(registry)} or a callable.")


# ---------------------------------------------------------------- label dropout


def drop_labels(cond, null_cond, key, p: float):
    """Replace each example's condition by ``null_cond`` with probability ``p``.

    Classifier-free guidance training (Ho & Salimans 2022, Algorithm 1): the
    same model learns the unconditional score from the dropped examples.

    Args:
      cond: pytree of arrays with leading batch axis ``B``.
      null_cond: pytree of the same structure; leaves broadcast to ``cond``'s
        (a leading axis of 1 is fine), e.g. ``{"label": jnp.array([num_classes])}``.
      key: PRNG key.
      p: drop probability in [0, 1].
    """
    leaves = jax.tree.leaves(cond)
    drop = jax.random.bernoulli(key, p, (leaves[0].shape[0],))
    return jax.tree.map(
        lambda c, n: jnp.where(bcast(drop, c), jnp.broadcast_to(n, c.shape), c), cond, null_cond
    )


# ---------------------------------------------------------------- the loss


def loss(
    model_fn,
    params,
    x0,
    cond,
    key,
    *,
    process,
    prediction: str,
    time_sampler: str | Callable = "uniform",
    weighting: str | Callable | None = "uniform",
    distance: str | Callable = "mse",
    label_dropout: float = 0.0,
    null_cond=None,
):
    """Denoising / flow-matching loss ``E_t [ w(t) d(F(x_t, t), target) ]``.

    Args:
      model_fn: ``model_fn(params, x_t, t, cond) -> prediction`` (``t`` is ``[B]``).
      params: model parameters (what gradients are taken with respect to).
      x0: clean data ``[B, ...]``.
      cond: conditioning pytree with leading axis ``B``, or ``None``.
      key: PRNG key for time, noise and label dropout.
      process: the noise process.
      prediction: what the model predicts (``eps``, ``x0``, ``v``, ``velocity``, ``score``).
      time_sampler: name in :data:`TIME_SAMPLERS` (defaults) or ``sampler(key, B, process)``.
      weighting: name in :data:`WEIGHTINGS`, ``weight(t, process)`` giving the
        weight on the x0 error, or ``None`` for uniform.
      distance: ``"mse"``, ``"pseudo_huber"`` or ``distance(pred, target, t, process) -> [B]``.
      label_dropout: probability of replacing ``cond`` by ``null_cond`` per example.
      null_cond: the "no condition" pytree used by label dropout (and by CFG at sampling).

    Returns:
      ``(scalar loss, metrics)``; metrics holds ``loss`` and the unweighted ``distance``.
    """
    check_prediction(prediction)
    sample_t = resolve_option(time_sampler, TIME_SAMPLERS, "time_sampler")
    weight_x0 = resolve_option(weighting, WEIGHTINGS, "weighting")
    dist = resolve_option(distance, DISTANCES, "distance")
    if not 0.0 <= label_dropout <= 1.0:
        raise InputError(f"label_dropout={label_dropout} must lie in [0, 1].")
    if label_dropout > 0 and (cond is None or null_cond is None):
        raise InputError(
            "label_dropout > 0 needs both cond and null_cond (the condition that means 'none')."
        )
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    t = sample_t(k_t, x0.shape[0], process)  # [B], float32 even for bf16 data
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    x_t = bcast(process.alpha(t), x0) * x0 + bcast(process.sigma(t), x0) * eps
    if label_dropout > 0:
        cond = drop_labels(cond, null_cond, k_drop, label_dropout)
    pred = model_fn(params, x_t, t, cond)
    target = from_x0_eps(x0, eps, prediction, t=t, process=process)
    per_example = dist(pred.astype(x0.dtype), target, t, process)  # [B]
    w = 1.0
    if weight_x0 is not None:
        w = weight_x0(t, process) / prediction_weight(prediction, t, process)
    weighted = w * per_example  # [B]
    value = jnp.mean(weighted)
    return value, {"loss": value, "distance": jnp.mean(per_example)}
