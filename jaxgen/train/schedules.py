"""Learning-rate schedules beyond optax's: EDM2's inverse square-root decay."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jaxgen.errors import InputError


def inverse_sqrt_schedule(
    ref_lr: float, ref_steps: float, rampup_steps: float = 0.0
) -> optax.Schedule:
    """EDM2's decay ``alpha_ref / sqrt(max(t / t_ref, 1))``, with an optional linear ramp-up.

    At update ``t`` (optax's count, the number of updates already applied)
    the rate is ``ref_lr / sqrt(max(t / ref_steps, 1)) * min(t / rampup_steps, 1)``;
    NVlabs/edm2's ``learning_rate_schedule`` with ``cur_nimg = t * batch``,
    ``ref_steps = ref_batches`` (70k for ImageNet-512, 35k for ImageNet-64)
    and ``rampup_steps = rampup_Mimg * 1e6 / batch`` (10 Mimg: 4882.8 updates
    at batch 2048). Used with Adam (betas 0.9, 0.99) and no weight decay.

    Args:
      ref_lr: ``alpha_ref``, e.g. 0.012 for EDM2-XS.
      ref_steps: ``t_ref`` in updates; 0 disables the decay.
      rampup_steps: length of the linear warm-up from 0, in updates (may be fractional).

    Raises:
      InputError: for a negative ``ref_steps`` or ``rampup_steps``.
    """
    if ref_steps < 0 or rampup_steps < 0:
        raise InputError(
            f"inverse_sqrt_schedule: ref_steps={ref_steps} and rampup_steps={rampup_steps} "
            "must be >= 0."
        )

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        lr = jnp.asarray(ref_lr, jnp.float32)
        if ref_steps > 0:
            lr = lr / jnp.sqrt(jnp.maximum(t / ref_steps, 1.0))
        if rampup_steps > 0:
            lr = lr * jnp.minimum(t / rampup_steps, 1.0)
        return lr

    return schedule
