"""REPA in training: "Representation Alignment for Generation: Training Diffusion
Transformers Is Easier Than You Think" (Yu et al., ICLR 2025; sihyun-yu/REPA).

``config.train.repa`` turns it on (``encoder`` non-empty; absent from older
configs: off). The model gains REPA's projector (:class:`jaxgen.models.repa.REPAModel`)
on its tokens after block ``depth``; the loss becomes

    L = L_denoise + lambda * mean_n [ -(1/T) sum_t cos(h_phi(z_t^[n]), y_t^[n]) ]

(the paper's Eq. 8; ``loss.py`` of the reference), ``y`` the frozen encoder's
patch tokens of the clean image, bilinearly interpolated to the model's
token grid when the grids differ (REPA's DINOv2 at 224 gives 16 x 16, the
grid of SiT-XL/2 on 32 x 32 latents; Inception's ``mixed_6/conv`` is 17 x 17).
The encoder's weights reach the loss through the train step's ``frozen``
argument (traced, replicated), so they are never baked into the program.

Encoders (:data:`ENCODERS`): DINOv2 (``dinov2-vitb14`` is the paper's; weights
from :func:`jaxgen.encoders.load_dinov2`, with REPA's preprocessing
:func:`jaxgen.encoders.dinov2.preprocess_repa` and timm's antialiased
position-embedding resampling), or, offline, the FID Inception's spatial
features ``mixed_6/conv`` (192 channels, 17 x 17; the weights of
``bash scripts/install.sh``).

The encoder sees pixels. In a latent run (``latent.vae``; the paper's SiT-XL/2
on SD-VAE latents) it sees the images the latents were encoded from, as in the
reference, whose dataset gives each example's raw image and VAE moments: the
dataset must keep them (``python -m jaxgen.encode --keep-images``; one without
is refused, naming the fix); each batch then carries them next to the moments
(:class:`jaxgen.data.TrainIterator` ``with_images``), mirrored with the mirror
view's latents, and the loss feeds the encoder those uint8 images as it feeds
it a pixel run's while the model denoises the latents
(:class:`jaxgen.train.latent.LatentImages`). The model's token grid is the
latents' (32 x 32 / 2 = 16 x 16 for SiT-XL/2), the encoder's the images'
(DINOv2 at 224 x 224 for 256 x 256 images).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxgen.data.pipeline import to_model_space
from jaxgen.errors import InputError
from jaxgen.models.repa import REPAModel
from jaxgen.train.latent import LatentImages
from jaxgen.train.latent import enabled as trains_on_latents

DINOV2_ENCODERS = ("dinov2-vits14", "dinov2-vitb14", "dinov2-vitl14", "dinov2-vitg14")
ENCODERS = (*DINOV2_ENCODERS, "inception")
"""``train.repa.encoder`` values: torch hub's DINOv2 models, or the FID Inception's
``mixed_6/conv``."""


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` trains with REPA (``train.repa.encoder`` set)."""
    repa = config.train.get("repa")
    return bool(repa and repa.get("encoder"))


def aligns(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` trains with REPA and a weight lambda > 0 (the encoder runs)."""
    return enabled(config) and _options(config)["lam"] > 0


def _options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``train.repa`` checked: encoder, depth, lambda, projector_dim, weights."""
    r = config.train.repa
    if r.encoder not in ENCODERS:
        raise InputError(f"train.repa.encoder={r.encoder!r}: use one of {', '.join(ENCODERS)} "
                         "(or '' for no REPA).")
    lam = r["lambda"]
    if not (isinstance(lam, int | float) and math.isfinite(lam) and lam >= 0):
        raise InputError(f"train.repa.lambda={r['lambda']!r}: give a finite weight >= 0 "
                         "(the paper: 0.5).")
    for key in ("depth", "projector_dim"):
        if not isinstance(r[key], int) or r[key] < 1:
            raise InputError(f"train.repa.{key}={r[key]!r}: give a positive integer.")
    if config.diffusion.precond != "none":
        raise InputError(f"train.repa with diffusion.precond={config.diffusion.precond!r}: REPA "
                         "aligns a DiT/SiT's tokens; use precond 'none' (as SiT does).")
    return dict(encoder=r.encoder, depth=r.depth, lam=float(lam), projector_dim=r.projector_dim,
                weights=r.get("weights") or None)


def encoder_module(name: str) -> tuple[nn.Module, int]:
    """The frozen encoder's module for REPA (no weights) and its feature width."""
    if name == "inception":
        from jaxgen.metrics.inception import MIXED_6_CONV_CHANNELS, InceptionV3

        return InceptionV3(with_logits=False, until_mixed_6=True), MIXED_6_CONV_CHANNELS
    from jaxgen.encoders import dinov2

    arch = name.removeprefix("dinov2-")
    module = dinov2.model(arch).clone(pos_offset=0.0, pos_antialias=True)  # timm's, as REPA
    return module, dinov2.ARCHS[arch].width


def wrap_model(config: ml_collections.ConfigDict, module: nn.Module) -> nn.Module:
    """``module`` with REPA's projector when ``config`` trains with REPA, else unchanged."""
    if not enabled(config) or isinstance(module, REPAModel):
        return module
    o = _options(config)
    if not hasattr(module, "scan_blocks"):  # DiT's field: blocks whose tokens can be returned
        raise InputError(f"train.repa needs a DiT/SiT backbone (model.name 'DiT-*'); "
                         f"{config.model.name} has no transformer blocks to align.")
    if o["depth"] > module.depth:
        raise InputError(f"train.repa.depth={o['depth']}: {config.model.name} has "
                         f"{module.depth} blocks.")
    return REPAModel(module, o["depth"], o["projector_dim"], encoder_module(o["encoder"])[1])


def load_encoder(config: ml_collections.ConfigDict) -> dict:
    """The encoder's variables (``train.repa.weights``, else the default lookup)."""
    o = _options(config)
    if o["encoder"] == "inception":
        from jaxgen.metrics.weights import load_inception

        return load_inception(o["weights"])[1]
    from jaxgen.encoders import load_dinov2

    return load_dinov2(o["weights"], o["encoder"].removeprefix("dinov2-"))[1]


def encoder_tokens(name: str, module: nn.Module, variables: dict, x0: jax.Array) -> jax.Array:
    """The encoder's spatial features ``[B, g_h, g_w, D]`` of model-space images ``x0``.

    The images are ``(x0 + 1) * 127.5`` (the inverse of ``to_model_space``, flips
    included). DINOv2: REPA's ``preprocess_raw_image`` to ``224 * max(1, H // 256)``,
    the normed patch tokens; Inception: the TF-FID resize to 299, ``mixed_6/conv``.
    """
    pixels = (x0.astype(jnp.float32) + 1.0) * 127.5
    if name == "inception":
        from jaxgen.metrics.inception import preprocess

        return module.apply(variables, preprocess(pixels))["mixed_6_conv"]
    from jaxgen.encoders.dinov2 import INPUT_SIZE, PATCH, preprocess_repa

    size = INPUT_SIZE * max(1, x0.shape[1] // 256)
    tokens = module.apply(variables, preprocess_repa(pixels, size))["patch"]
    return tokens.reshape(x0.shape[0], size // PATCH, size // PATCH, -1)


def match_grid(y: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Encoder features ``[B, g_h, g_w, D]`` on the model's ``grid`` as tokens ``[B, T, D]``.

    Bilinear (``jax.image.resize``, antialiased when shrinking); unchanged when the
    grids agree.
    """
    b, gh, gw, d = y.shape
    if (gh, gw) != tuple(grid):
        y = jax.image.resize(y, (b, *grid, d), "bilinear")
    return y.reshape(b, grid[0] * grid[1], d)


def alignment_loss(z: jax.Array, y: jax.Array) -> jax.Array:
    """REPA's projection loss per example ``[B]``: ``-mean_t cos(z_t, y_t)``.

    ``z``, ``y``: ``[B, T, D]``. Each token is normalised as torch's
    ``F.normalize`` does (``x / max(|x|, 1e-12)``), as the reference's ``loss.py``.
    """
    unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    return -jnp.mean(jnp.sum(unit(z.astype(jnp.float32)) * unit(y.astype(jnp.float32)), -1), -1)


def repa_loss(model_fn: Callable, params: Any, x0: jax.Array | LatentImages, cond: Any,
              key: jax.Array, *, frozen: dict, base_loss: Callable, tokens: Callable,
              lam: float, latent: bool = False, **kwargs) -> tuple[jax.Array, dict]:
    """``base_loss + lam * alignment_loss`` from one forward pass of the model.

    Args:
      model_fn: the train step's model, called with ``return_repa=True``.
      params, x0, cond, key: as for every :data:`jaxgen.train.state.LossFn`; in a latent
        run ``x0`` is a :class:`jaxgen.train.latent.LatentImages`: the model denoises
        its latents, the encoder sees its images (in model space, as a pixel run's).
      frozen: ``{"repa_encoder": variables}``.
      base_loss: the denoising loss; it must call the model once.
      tokens: ``tokens(variables, images) -> [B, g_h, g_w, D]`` of model-space images
        (:func:`encoder_tokens`).
      lam: the weight lambda.
      latent: the run trains on latents; an ``x0`` without images is refused.
      **kwargs: passed to ``base_loss`` (e.g. ``step``).

    Returns:
      ``(loss, metrics)`` with ``metrics["repa"]`` the batch's mean alignment loss.

    Raises:
      InputError: a latent run's ``x0`` without its images.
    """
    pixels = x0
    if isinstance(x0, LatentImages):
        x0, pixels = x0.latents, to_model_space(x0.images)
    elif latent:
        raise InputError("train.repa in a latent run: the batch holds no images for REPA's "
                         "encoder; serve them with TrainIterator(..., with_images=True) from a "
                         "dataset of python -m jaxgen.encode --keep-images.")
    seen = []

    def model_with_tokens(p, x_t, t, c, **kw):
        out, z = model_fn(p, x_t, t, c, return_repa=True, **kw)
        seen.append(z)
        return out

    value, metrics = base_loss(model_with_tokens, params, x0, cond, key, **kwargs)
    if len(seen) != 1:
        raise InputError(f"train.repa: the loss called the model {len(seen)} times; REPA aligns "
                         "the tokens of its one denoising pass.")
    z = seen[0]
    p = round(math.sqrt(x0.shape[1] * x0.shape[2] / z.shape[1]))
    y = jax.lax.stop_gradient(tokens(frozen["repa_encoder"], pixels))
    proj = alignment_loss(z, match_grid(y, (x0.shape[1] // p, x0.shape[2] // p)))
    return jnp.mean(value) + lam * jnp.mean(proj), dict(metrics, repa=jnp.mean(proj))


def with_repa(parts, encoder_variables: dict | None = None):
    """``parts`` (a :class:`jaxgen.train.state.RunParts`) training with REPA: the loss
    wrapped by :func:`repa_loss`, the encoder's weights as :attr:`RunParts.frozen`.

    With ``lambda = 0`` nothing is aligned and no encoder is loaded: the run trains
    exactly as without REPA (the projector's parameters exist but receive no gradient).
    In a latent run the step's ``x0`` must carry the images (see the module's notes).

    Args:
      parts: the run's parts; their module is a :class:`REPAModel`.
      encoder_variables: the encoder's variables; default :func:`load_encoder`.
    """
    o = _options(parts.config)
    if parts.frozen is not None:
        raise InputError("train.repa: the run already has frozen weights; REPA's encoder "
                         "takes that place (pass frozen=None).")
    if not isinstance(parts.module, REPAModel):
        raise InputError("train.repa: the model has no REPA projector; build it from the "
                         "config (jaxgen.train.state.make_model) or wrap it with "
                         "jaxgen.train.repa.wrap_model.")
    if o["lam"] == 0:  # no alignment: the projector stays (and idles), the rest is plain
        return parts
    module = encoder_module(o["encoder"])[0]
    variables = load_encoder(parts.config) if encoder_variables is None else encoder_variables
    tokens = lambda v, x0: encoder_tokens(o["encoder"], module, v, x0)
    loss = functools.partial(repa_loss, base_loss=parts.loss_fn, tokens=tokens, lam=o["lam"],
                             latent=trains_on_latents(parts.config))
    return dataclasses.replace(parts, loss_fn=loss, frozen={"repa_encoder": variables})
