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
from jaxgen.models.autoencoder import (
    VAE_PRESETS,
    AutoencoderKL,
    micro_batched,
    sample_latent,
    vae,
)
from jaxgen.models.checkpoints import export_weights, load_weights
from jaxgen.models.contract import as_model_fn
from jaxgen.models.dit import DIT_PATCHES, DIT_SIZES, DiT, DiTBlock, dit
from jaxgen.models.edm2 import EDM2, EDM2_PRESETS, edm2, force_normalize
from jaxgen.models.inspection import abstract_init, count_params, forward_flops, param_table
from jaxgen.models.layers import (
    Attention,
    LabelEmbedder,
    TimestepEmbedder,
    sincos_pos_embed_2d,
    sinusoidal_embedding,
)
from jaxgen.models.sharding import LOGICAL_AXIS_RULES, param_shardings
from jaxgen.models.unet import UNET_PRESETS, AttnBlock, ResBlock, UNet, unet

MODEL_NAMES: tuple[str, ...] = (
    *(f"DiT-{s}/{p}" for s in DIT_SIZES for p in DIT_PATCHES),
    *(f"unet-{name}" for name in UNET_PRESETS),
    *(f"edm2-{name}" for name in EDM2_PRESETS),
    *(f"vae-{name}" for name in VAE_PRESETS),
)
"""Every name :func:`create_model` accepts."""


def create_model(name: str, **overrides: Any) -> nn.Module:
    """A model by name: ``"DiT-S/2"`` ... ``"DiT-XL/8"``, or ``"unet-"`` + a U-Net preset.

    U-Net presets: ``"unet-ddpm-cifar10"``, ``"unet-adm-imagenet64"``, ``"unet-small"``.
    Autoencoders (:class:`AutoencoderKL`): ``"vae-sd"``, ``"vae-sdxl"``.

    Keyword arguments override the preset's fields (e.g. ``num_classes=10``,
    ``dtype=jnp.bfloat16``).

    Raises:
      InputError: for a name not in :data:`MODEL_NAMES`.
    """
    if name not in MODEL_NAMES:
        raise InputError(f"unknown model {name!r}; expected one of {list(MODEL_NAMES)}.")
    if name.startswith("DiT-"):
        return dit(name, **overrides)
    if name.startswith("edm2-"):
        return edm2(name.removeprefix("edm2-"), **overrides)
    if name.startswith("vae-"):
        return vae(name.removeprefix("vae-"), **overrides)
    return unet(name.removeprefix("unet-"), **overrides)


__all__ = [
    "DIT_PATCHES",
    "DIT_SIZES",
    "EDM2",
    "EDM2_PRESETS",
    "LOGICAL_AXIS_RULES",
    "MODEL_NAMES",
    "UNET_PRESETS",
    "VAE_PRESETS",
    "Attention",
    "AttnBlock",
    "AutoencoderKL",
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
    "edm2",
    "export_weights",
    "force_normalize",
    "forward_flops",
    "load_weights",
    "micro_batched",
    "param_shardings",
    "param_table",
    "sample_latent",
    "sincos_pos_embed_2d",
    "sinusoidal_embedding",
    "unet",
    "vae",
]
