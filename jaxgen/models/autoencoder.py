"""KL autoencoder of Latent Diffusion / Stable Diffusion (Rombach et al. 2022, Sec. 3.1, App. G).

The architecture of LDM's ``AutoencoderKL`` and diffusers' ``AutoencoderKL``:
an encoder of ResNet blocks (GroupNorm eps 1e-6, SiLU, 3x3 convolutions; a
1x1 shortcut where the width changes) with a stride-2 convolution after each
level but the last (padded on the bottom/right only, as LDM does), a middle
block ``ResNet → single-head self-attention → ResNet``, and a convolution to
the ``2 * latent_channels`` moments of a diagonal Gaussian posterior
``q(z | x) = N(mean, exp(logvar))``; ``logvar`` is clipped to [-30, 20] (LDM's
``DiagonalGaussianDistribution``). The decoder mirrors it with one more ResNet
block per level and nearest-neighbour 2x upsampling followed by a convolution.
Optional 1x1 ``quant_conv`` / ``post_quant_conv`` sit around the latent.

Presets (:data:`VAE_PRESETS`); the first two have 83,653,863 parameters:

- ``"sd"``: Stable Diffusion's f8 VAE with 4 latent channels (sd-vae-ft-ema /
  sd-vae-ft-mse, the VAE of DiT, SiT and REPA); latent scale 0.18215.
- ``"sdxl"``: SDXL's VAE (diffusers' ``stabilityai/sdxl-vae`` config): the same
  architecture with its own weights; latent scale 0.13025.
- ``"small"``: a toy for gray images trained here (``python -m
  jaxgen.train_autoencoder``, Fashion-MNIST: 28x28x1 -> 7x7x4), factor 4; its
  latent scale is measured on the data (``jaxgen/configs/fashion_mnist_latent.py``).

Images are NHWC in [-1, 1]; latents are NHWC at 1/8 of the resolution.

Usage::

    vae = create_model("vae-sd")
    variables = load_weights("sd-vae-ft-ema/", vae)
    mean, logvar = vae.apply(variables, x, method="encode")
    z = vae.scaling_factor * sample_latent(key, mean, logvar)   # the diffusion model's space
    x = vae.apply(variables, z / vae.scaling_factor, method="decode")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.errors import InputError
from jaxgen.models.layers import Array, Dtype, NearestUpsampleConv, conv, dense, group_norm

LOGVAR_RANGE = (-30.0, 20.0)
"""LDM's clipping of the posterior log-variance."""

_GN_EPS = 1e-6  # LDM's Normalize() and diffusers' resnet_eps for the VAE


def _norm(num_groups: int, name: str, **kw: Any) -> nn.GroupNorm:
    return group_norm(num_groups, epsilon=_GN_EPS, name=name, **kw)


class VAEResBlock(nn.Module):
    """``x + conv(SiLU(GN(conv(SiLU(GN(x))))))``; a 1x1 convolution on ``x`` where widths differ."""

    features: int
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``[B, H, W, C]`` → ``[B, H, W, features]``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(_norm(self.num_groups, "norm1", **kw)(x))
        h = conv(self.features, ("conv_in", "embed"), name="conv1", **kw)(h)
        h = nn.silu(_norm(self.num_groups, "norm2", **kw)(h))
        h = conv(self.features, ("conv_in", "embed"), name="conv2", **kw)(h)
        if x.shape[-1] != self.features:
            x = conv(self.features, ("conv_in", "embed"), kernel=1, padding=0, name="shortcut",
                     **kw)(x)
        return x + h


class VAEAttention(nn.Module):
    """Single-head self-attention over pixels, pre-GroupNorm, residual (LDM ``AttnBlock``)."""

    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``[B, H, W, C]`` → ``[B, H, W, C]``."""
        b, height, width, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _norm(self.num_groups, "norm", **kw)(x).reshape(b, height * width, 1, c)
        q, k, v = (dense(c, ("embed", "mlp"), name=n, **kw)(h) for n in ("q", "k", "v"))
        h = jax.nn.dot_product_attention(q, k, v).reshape(b, height * width, c)
        h = dense(c, ("mlp", "embed"), name="proj", **kw)(h)
        return x + h.reshape(x.shape)


class VAEEncoder(nn.Module):
    """Image ``[B, H, W, in]`` → moments ``[B, H/f, W/f, 2 * latent]``, ``f = 2**(levels-1)``."""

    channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    num_groups: int = 32
    mid_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """NHWC image → NHWC ``concat(mean, logvar)`` before ``quant_conv``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        g = self.num_groups
        h = conv(self.channels[0], ("channels", "embed"), name="conv_in", **kw)(x)
        for level, ch in enumerate(self.channels):
            for i in range(self.layers_per_block):
                h = VAEResBlock(ch, g, name=f"down{level}_res{i}", **kw)(h)
            if level != len(self.channels) - 1:
                # LDM pads (0, 1) on H and W, then a valid stride-2 conv.
                h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
                h = conv(ch, ("conv_in", "embed"), stride=2, padding="VALID",
                         name=f"down{level}_down", **kw)(h)
        h = _mid(h, g, self.mid_attention, kw)
        h = nn.silu(_norm(g, "norm_out", **kw)(h))
        return conv(2 * self.latent_channels, ("conv_in", "channels"), name="conv_out", **kw)(h)


class VAEDecoder(nn.Module):
    """Latent ``[B, h, w, latent]`` → image ``[B, h f, w f, out_channels]``."""

    channels: tuple[int, ...]
    layers_per_block: int
    out_channels: int
    num_groups: int = 32
    mid_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: Array) -> Array:
        """NHWC latent (after ``post_quant_conv``) → NHWC image."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        g = self.num_groups
        h = conv(self.channels[-1], ("channels", "embed"), name="conv_in", **kw)(z)
        h = _mid(h, g, self.mid_attention, kw)
        for level in reversed(range(len(self.channels))):
            for i in range(self.layers_per_block + 1):
                h = VAEResBlock(self.channels[level], g, name=f"up{level}_res{i}", **kw)(h)
            if level != 0:
                h = NearestUpsampleConv(h.shape[-1], ("conv_in", "embed"), name=f"up{level}_up",
                                        **kw)(h)
        h = nn.silu(_norm(g, "norm_out", **kw)(h))
        return conv(self.out_channels, ("conv_in", "channels"), name="conv_out", **kw)(h)


def _mid(h: Array, num_groups: int, attention: bool, kw: dict) -> Array:
    """The middle block ``ResNet → attention → ResNet`` (called inside a compact module)."""
    h = VAEResBlock(h.shape[-1], num_groups, name="mid_res0", **kw)(h)
    if attention:
        h = VAEAttention(num_groups, name="mid_attn", **kw)(h)
    return VAEResBlock(h.shape[-1], num_groups, name="mid_res1", **kw)(h)


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (LDM / diffusers ``AutoencoderKL``), NHWC in [-1, 1].

    Attributes:
      channels: width of each level (diffusers' ``block_out_channels``); the
        downsampling factor is ``2**(len(channels) - 1)``.
      layers_per_block: ResNet blocks per encoder level (the decoder has one more).
      latent_channels: channels of the latent ``z``.
      in_channels: image channels (also the decoder's output channels).
      num_groups: GroupNorm groups.
      use_quant_conv: 1x1 convolution on the posterior moments (LDM, SD).
      use_post_quant_conv: 1x1 convolution on ``z`` before the decoder.
      mid_attention: self-attention in the middle blocks.
      scaling_factor: the latent scale a diffusion model trains on
        (``scaling_factor * z``); metadata, not applied by ``encode``/``decode``.
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    in_channels: int = 3
    num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_attention: bool = True
    scaling_factor: float = 0.18215
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def factor(self) -> int:
        """Spatial downsampling factor between image and latent."""
        return 2 ** (len(self.channels) - 1)

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        arch = dict(channels=tuple(self.channels), layers_per_block=self.layers_per_block,
                    num_groups=self.num_groups, mid_attention=self.mid_attention, **kw)
        self.encoder = VAEEncoder(latent_channels=self.latent_channels, **arch)
        self.decoder = VAEDecoder(out_channels=self.in_channels, **arch)
        if self.use_quant_conv:
            self.quant_conv = conv(2 * self.latent_channels, ("channels", "channels"), kernel=1,
                                   padding=0, **kw)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv(self.latent_channels, ("channels", "channels"), kernel=1,
                                        padding=0, **kw)

    def encode(self, x: Array) -> tuple[Array, Array]:
        """Posterior moments of images ``x``.

        Args:
          x: ``[B, H, W, in_channels]`` float in [-1, 1]; ``H``, ``W`` multiples of :attr:`factor`.

        Returns:
          ``(mean, logvar)``, each ``[B, H/f, W/f, latent_channels]`` float32;
          ``logvar`` clipped to :data:`LOGVAR_RANGE`.
        """
        self._check(x, self.in_channels, self.factor, "x")
        moments = self.encoder(x.astype(self.dtype))
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: Array) -> Array:
        """Images from unscaled latents ``z``.

        Args:
          z: ``[B, h, w, latent_channels]`` float; divide a scaled latent by ``scaling_factor``.

        Returns:
          ``[B, h f, w f, in_channels]`` float32 images, nominally in [-1, 1] (not clipped).
        """
        self._check(z, self.latent_channels, 1, "z")
        h = z.astype(self.dtype)
        if self.use_post_quant_conv:
            h = self.post_quant_conv(h)
        return self.decoder(h).astype(jnp.float32)

    def __call__(self, x: Array) -> Array:
        """Reconstruction through the posterior mean: ``decode(encode(x)[0])``."""
        return self.decode(self.encode(x)[0])

    @staticmethod
    def _check(x: Array, channels: int, multiple: int, what: str) -> None:
        if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating) or x.shape[-1] != channels:
            raise InputError(
                f"{what} must be a float NHWC array [B, H, W, {channels}], got {x.dtype}{x.shape}."
            )
        if x.shape[1] % multiple or x.shape[2] % multiple:
            raise InputError(
                f"{what} is {x.shape[1]}x{x.shape[2]}; the autoencoder needs height and width "
                f"divisible by {multiple}: crop or pad the images."
            )


def sample_latent(key: Array, mean: Array, logvar: Array) -> Array:
    """A draw ``z = mean + exp(logvar / 2) * eps`` from the diagonal Gaussian posterior."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


MICRO_BATCH_PIXELS = 128 * 128
"""Images of at least this many pixels are encoded/decoded one per device at a time.

On the 2-core CPU the SD VAE's large-activation convolutions run faster on
one image than on a batch (``benchmarks/bench_vae.py``, BENCHMARKS.md): decode
of 4 at 128x128 +15 %, 2 at 256x256 +9 %; at 64x64 the batch is faster. One
image at a time also bounds the activations' memory by one image's.
"""


def micro_batched(fn: Callable[[Array], Any], x: Array, *, pixels: int, shards: int = 1) -> Any:
    """``fn(x)`` for a function that treats the images of a batch independently,
    computed under ``lax.map`` one image per shard at a time when the images are large.

    Args:
      fn: ``[b, ...] -> pytree`` of arrays with leading axis ``b`` (an autoencoder's
        ``encode`` or ``decode``), each output row depending on its input row only.
      x: ``[B, ...]``, split (if sharded) in ``shards`` contiguous blocks of its batch axis.
      pixels: pixels of one image at full resolution; below :data:`MICRO_BATCH_PIXELS`
        (or when ``B`` is not a multiple of ``shards``, or is ``shards``) this is ``fn(x)``.
      shards: devices the batch axis is split over; each map step takes one row
        from every block, so no device waits on another's rows.

    Returns:
      ``fn(x)``, up to float rounding (a convolution over one image sums in
      another order than over a batch).
    """
    b = x.shape[0]
    if pixels < MICRO_BATCH_PIXELS or b % shards or b == shards:
        return fn(x)
    rows = x.reshape(shards, b // shards, *x.shape[1:]).swapaxes(0, 1)  # [B/shards, shards, ...]
    out = jax.lax.map(fn, rows)
    return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape(b, *y.shape[2:]), out)


VAE_PRESETS: dict[str, dict[str, Any]] = {
    "sd": dict(channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
               scaling_factor=0.18215),
    "sdxl": dict(channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                 scaling_factor=0.13025),
    "small": dict(channels=(16, 32, 64), layers_per_block=1, latent_channels=4, in_channels=1,
                  num_groups=8, scaling_factor=1.0),
}
"""Named autoencoder configurations; see the module docstring."""


def vae(name: str, **overrides: Any) -> AutoencoderKL:
    """An autoencoder preset from :data:`VAE_PRESETS` (``"sd"``, ``"sdxl"``), fields overridable.

    Raises:
      InputError: for an unknown name.
    """
    if name not in VAE_PRESETS:
        raise InputError(
            f"unknown autoencoder preset {name!r}; expected one of {sorted(VAE_PRESETS)}."
        )
    return AutoencoderKL(**{**VAE_PRESETS[name], **overrides})
