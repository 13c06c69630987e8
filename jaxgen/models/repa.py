"""REPA's projector on a DiT / SiT: "Representation Alignment for Generation: Training
Diffusion Transformers Is Easier Than You Think" (Yu et al., ICLR 2025; sihyun-yu/REPA).

:class:`REPAModel` wraps a transformer whose call takes ``return_hidden=k``
(:class:`jaxgen.models.DiT`) and adds REPA's projector, an MLP ``hidden ->
projector_dim -> projector_dim -> z_dim`` with SiLU between the layers
(``build_mlp`` in the reference's ``models/sit.py``), applied to every token
after block ``depth``. The backbone's parameters stay where the bare model
keeps them (the wrapper shares its scope), so they are initialised exactly
as the bare model's and a released DiT/SiT checkpoint fits unchanged; the
projector's sit beside them under ``repa_projector`` and train with them.
A plain call returns the backbone's prediction (same computation as the bare
model); ``return_repa=True`` returns ``(prediction, projected tokens [B, T, z_dim])``.
"""

from __future__ import annotations

import flax.linen as nn

from jaxgen.models.contract import Cond
from jaxgen.models.layers import Array


class REPAProjector(nn.Module):
    """``Linear(projector_dim) - SiLU - Linear(projector_dim) - SiLU - Linear(z_dim)`` per token.

    Initialised as PyTorch's ``nn.Linear`` is (uniform with bound ``1/sqrt(fan_in)``
    for weights and biases), as in the reference.
    """

    projector_dim: int
    z_dim: int

    @nn.compact
    def __call__(self, h: Array) -> Array:
        """``[..., hidden]`` tokens -> ``[..., z_dim]``."""
        for i, width in enumerate((self.projector_dim, self.projector_dim, self.z_dim)):
            if i:
                h = nn.silu(h)
            fan_in = h.shape[-1]
            h = nn.Dense(width, kernel_init=_torch_uniform(fan_in),
                         bias_init=_torch_uniform(fan_in), name=f"fc{i + 1}")(h)
        return h


def _torch_uniform(fan_in: int):
    bound = fan_in**-0.5
    return lambda key, shape, dtype: nn.initializers.uniform(2 * bound)(key, shape, dtype) - bound


class REPAModel(nn.Module):
    """A DiT/SiT with REPA's projector on the tokens after block ``depth``.

    Attributes:
      backbone: the transformer; its call takes ``return_hidden=depth``.
      depth: the block whose output is projected (1-based; 8 for SiT-XL/2 in the paper).
      projector_dim: the projector's hidden width (2048 in the paper).
      z_dim: the encoder's feature width (768 for DINOv2 ViT-B/14).
    """

    backbone: nn.Module
    depth: int
    projector_dim: int
    z_dim: int

    def setup(self) -> None:
        nn.share_scope(self, self.backbone)  # the backbone's parameters at the top level
        self.repa_projector = REPAProjector(self.projector_dim, self.z_dim)

    @property
    def num_classes(self) -> int:
        """The backbone's classes (0: unconditional)."""
        return int(getattr(self.backbone, "num_classes", 0) or 0)

    @property
    def learn_sigma(self) -> bool:
        """Whether the backbone's output holds a learned variance after the prediction."""
        return bool(getattr(self.backbone, "learn_sigma", False))

    def __call__(self, x: Array, t: Array, cond: Cond = None, *, train: bool = False,
                 return_repa: bool = False) -> Array | tuple[Array, Array]:
        """The backbone's prediction; with ``return_repa``, also the projected tokens."""
        if not (return_repa or self.is_initializing()):
            return self.backbone(x, t, cond, train=train)
        out, hidden = self.backbone(x, t, cond, train=train, return_hidden=self.depth)
        z = self.repa_projector(hidden)
        return (out, z) if return_repa else out
