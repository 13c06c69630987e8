"""Flax linen models: DiT, the DDPM/ADM U-Net, shared layers and inspection tools.

Every model is called as ``module.apply(variables, x_t, t, cond, train=False)``
with ``x_t`` NHWC float, ``t`` a float ``[B]`` array and ``cond`` ``None`` or
``{"label": [B] int}`` — the ``model_fn(x_t, t, cond)`` contract of
``jaxgen.diffusion`` and ``jaxgen.sampling``; :func:`as_model_fn` binds the
variables. :func:`create_model` builds any named model.
"""

from typing import Any

import flax.linen as nn

from jaxgen.errors import InputError
from jaxgen.models.dit import DIT_PATCHES, DIT_SIZES, DiT, DiTBlock, dit
from jaxgen.models.layers import (
    LOGICAL_AXIS_RULES,
    Attention,
    LabelEmbedder,
    TimestepEmbedder,
    abstract_init,
    as_model_fn,
    count_params,
    forward_flops,
    param_shardings,
    param_table,
    sincos_pos_embed_2d,
    sinusoidal_embedding,
)
from jaxgen.models.unet import UNET_PRESETS, AttnBlock, ResBlock, UNet, unet

MODEL_NAMES: tuple[str, ...] = (
    *(f"DiT-{s}/{p}" for s in DIT_SIZES for p in DIT_PATCHES),
    *(f"unet-{name}" for name in UNET_PRESETS),
)
"""Every name :func:`create_model` accepts."""


def create_model(name: str, **overrides: Any) -> nn.Module:
    """A model by name: ``"DiT-S/2"`` ... ``"DiT-XL/8"``, or ``"unet-"`` + a U-Net preset.

    U-Net presets: ``"unet-ddpm-cifar10"``, ``"unet-adm-imagenet64"``, ``"unet-small"``.

    Keyword arguments override the preset's fields (e.g. ``num_classes=10``,
    ``dtype=jnp.bfloat16``).

    Raises:
      InputError: for a name not in :data:`MODEL_NAMES`.
    """
    if name not in MODEL_NAMES:
        raise InputError(f"unknown model {name!r}; expected one of {list(MODEL_NAMES)}.")
    if name.startswith("DiT-"):
        return dit(name, **overrides)
    return unet(name.removeprefix("unet-"), **overrides)


__all__ = [
    "DIT_PATCHES",
    "DIT_SIZES",
    "LOGICAL_AXIS_RULES",
    "MODEL_NAMES",
    "UNET_PRESETS",
    "Attention",
    "AttnBlock",
    "DiT",
    "DiTBlock",
    "LabelEmbedder",
    "ResBlock",
    "TimestepEmbedder",
    "UNet",
    "abstract_init",
    "as_model_fn",
    "count_params",
    "create_model",
    "dit",
    "forward_flops",
    "param_shardings",
    "param_table",
    "sincos_pos_embed_2d",
    "sinusoidal_embedding",
    "unet",
]
