"""sCM's learned adaptive weighting beside any model (Lu & Song 2024, Sec. 4.3).

"Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models" trains
a weighting ``w_phi(t)`` with the network, so that the loss
``e^{w_phi(t)} / D ||F_theta - F_theta- - g||^2 - w_phi(t)`` balances its variance
across times (the uncertainty weighting of EDM2, Karras et al. 2024, Eq. 21, there
``u = -w``). :class:`AdaptiveWeightModel` wraps a model and adds that head: a
log-variance ``u(c_noise) = Linear(sinusoidal(c_noise))`` of the time the model
sees, zero at initialisation (unit weight). The backbone's parameters stay where
the bare model keeps them (the wrapper shares its scope, as
:class:`jaxgen.models.repa.REPAModel` does), so a teacher's weights fit it
unchanged; the head sits beside them under ``logvar_head``.
A plain call returns the backbone's output (the same computation as the bare
model); ``return_logvar=True`` returns ``(output, u [B])``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxgen.models.contract import Cond
from jaxgen.models.layers import Array, sinusoidal_embedding

LOGVAR_CHANNELS = 128  # EDM2's logvar_channels: the width of the time features


class LogvarHead(nn.Module):
    """``u = Linear(sinusoidal(c_noise, 128))``, zero-initialised (``u = 0``: unit weight)."""

    channels: int = LOGVAR_CHANNELS

    @nn.compact
    def __call__(self, c_noise: Array) -> Array:
        """``[B]`` noise embeddings -> ``[B]`` log-variances."""
        h = sinusoidal_embedding(c_noise, self.channels)
        zeros = nn.initializers.zeros_init()
        return nn.Dense(1, kernel_init=zeros, bias_init=zeros, name="linear")(h)[:, 0]


class AdaptiveWeightModel(nn.Module):
    """A model with sCM's adaptive-weight head (:class:`LogvarHead`) on the time it sees.

    Attributes:
      backbone: the network, called as ``backbone(x, t, cond, train=...)``.
    """

    backbone: nn.Module

    def setup(self) -> None:
        nn.share_scope(self, self.backbone)  # the backbone's parameters at the top level
        self.logvar_head = LogvarHead()

    @property
    def num_classes(self) -> int:
        """The backbone's classes (0: unconditional)."""
        return int(getattr(self.backbone, "num_classes", 0) or 0)

    def __call__(self, x: Array, t: Array, cond: Cond = None, *, train: bool = False,
                 return_logvar: bool = False) -> Array | tuple[Array, Array]:
        """The backbone's output; with ``return_logvar``, also ``u(t)`` of shape ``[B]``."""
        out = self.backbone(x, t, cond, train=train)
        if not (return_logvar or self.is_initializing()):
            return out
        u = self.logvar_head(jnp.broadcast_to(t, x.shape[:1]))
        return (out, u) if return_logvar else out
