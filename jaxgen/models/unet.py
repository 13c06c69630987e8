"""U-Net of the DDPM / ADM family (Ho et al. 2020; Dhariwal & Nichol 2021).

Residual blocks with GroupNorm and a timestep embedding that is either added
(DDPM) or applied as a scale and shift after the second norm (ADM's
``use_scale_shift_norm``); self-attention at chosen levels and always in the
middle; dropout; downsampling by a stride-2 convolution or average pooling and
upsampling by nearest neighbour (+ convolution), or residual up/down blocks
(ADM's ``resblock_updown``); channel multipliers per level; class
conditioning with a null class. The last convolution of every residual
branch, attention output and the output layer are zero-initialised, as in
both papers.

Presets (:data:`UNET_PRESETS`):

- ``"ddpm-cifar10"``: the DDPM CIFAR-10 model (ch 128, mult 1,2,2,2, two
  blocks per level, attention at 16x16, dropout 0.1): 35,746,307
  parameters, the paper's 35.7M.
- ``"adm-imagenet64"``: ADM's class-conditional ImageNet 64x64 model (ch 192,
  mult 1,2,3,4, three blocks, attention at 32/16/8 with 64-channel heads,
  scale-shift norm, residual up/down, learned sigma): 295,905,222
  parameters, the paper's 296M (768 of them the null-class row).
- ``"small"``: a CPU-friendly model for 28x28 and 32x32 (ch 32, mult 1,2,2,
  attention at 7x7/8x8 and in the middle, ADM scale-shift): 1,742,881
  parameters for 1-channel input.

Usage::

    model = unet("ddpm-cifar10")
    variables = model.init({"params": key}, x, t)
    eps = model.apply(variables, x, t, None, train=True, rngs={"dropout": key})
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxgen.errors import InputError
from jaxgen.models.contract import Cond, check_inputs, split_cond, split_perturb
from jaxgen.models.layers import (
    Array,
    Attention,
    Dtype,
    LabelEmbedder,
    NearestUpsampleConv,
    TimestepEmbedder,
    conv,
    dense,
    group_norm,
    zeros,
)


def _resample(x: Array, mode: str | None) -> Array:
    """Nearest-neighbour 2x upsampling, 2x2 average pooling, or nothing."""
    if mode == "up":
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if mode == "down":
        return nn.avg_pool(x, (2, 2), strides=(2, 2))
    return x


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding in between; optional up/down.

    With ``scale_shift`` the embedding gives ``(scale, shift)`` applied as
    ``GN(h) * (1 + scale) + shift`` (ADM); otherwise it is added before the
    second norm (DDPM). With ``resample`` the block resamples both branches
    between the first norm and conv (ADM's residual up/down).
    """

    features: int
    dropout: float = 0.0
    scale_shift: bool = False
    resample: str | None = None
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, emb: Array, train: bool) -> Array:
        """``x`` ``[B, H, W, C]``, ``emb`` ``[B, E]`` → ``[B, H', W', features]``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(group_norm(self.num_groups, name="norm1", **kw)(x))
        h, x = _resample(h, self.resample), _resample(x, self.resample)
        h = conv(self.features, ("conv_in", "embed"), name="conv1", **kw)(h)
        e = dense(self.features * (2 if self.scale_shift else 1), ("mlp", "embed"),
                  name="emb_proj", **kw)(nn.silu(emb))[:, None, None, :]
        if self.scale_shift:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = group_norm(self.num_groups, name="norm2", **kw)(h) * (1 + scale) + shift
        else:
            h = group_norm(self.num_groups, name="norm2", **kw)(h + e)
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
        h = conv(self.features, ("conv_in", "embed"), kernel_init=zeros, name="conv2", **kw)(h)
        if x.shape[-1] != self.features:
            x = dense(self.features, ("conv_in", "embed"), name="skip", **kw)(x)
        return x + h


class AttnBlock(nn.Module):
    """Pre-norm self-attention over the pixels of a feature map, with a residual."""

    num_heads: int
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, perturb: Array | None = None) -> Array:
        """``[B, H, W, C]`` → ``[B, H, W, C]``; ``perturb``: ``[B]`` bool, identity maps (PAG)."""
        b, height, width, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = group_norm(self.num_groups, name="norm", **kw)(x).reshape(b, height * width, c)
        h = Attention(self.num_heads, zero_out=True, name="attn", **kw)(h, perturb)
        return x + h.reshape(x.shape)


class UNet(nn.Module):
    """DDPM/ADM U-Net over NHWC images.

    Level ``i`` works at resolution ``H / 2**i`` with ``ch * ch_mult[i]``
    channels; there are ``len(ch_mult) - 1`` downsamplings, so ``H`` and ``W``
    must be multiples of ``2**(len(ch_mult) - 1)``.

    Attributes:
      ch: base channels.
      ch_mult: channel multiplier per level.
      num_res_blocks: residual blocks per level on the way down (one more on
        the way up, as in DDPM/ADM).
      attention_levels: levels with self-attention after each residual block
        (DDPM CIFAR-10: ``(1,)``, i.e. 16x16 on 32x32 input); the middle
        always has one.
      num_heads: attention heads (DDPM: 1).
      head_channels: if set, heads = channels // head_channels (ADM's
        ``num_head_channels``), overriding ``num_heads``.
      dropout: dropout rate in residual blocks (training mode only).
      scale_shift: ADM scale-shift norm for the time embedding; else added.
      resblock_updown: residual blocks do the up/down sampling (ADM).
      conv_resample: plain resampling uses convolutions (stride-2 conv down,
        nearest + conv up) instead of average pooling / nearest only.
      num_groups: GroupNorm groups.
      num_classes: classes for conditioning (0: unconditional); the null
        class is ``num_classes``.
      class_dropout: probability of the null class per label in training.
      learn_sigma: output ``2C`` channels (prediction, variance interpolation).
      out_channels: output channels before ``learn_sigma`` doubling; default: the input's.
      pag_layers: names of the attention blocks (``"mid_attn"``, ``"up1_attn0"``, ...)
        whose map becomes the identity where ``cond["perturb_attention"]`` is true
        (perturbed-attention guidance, Ahn et al. 2024, who perturb the middle block).
      dtype: compute dtype.
      param_dtype: parameter dtype.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (1,)
    num_heads: int = 1
    head_channels: int | None = None
    dropout: float = 0.1
    scale_shift: bool = False
    resblock_updown: bool = False
    conv_resample: bool = True
    num_groups: int = 32
    num_classes: int = 0
    class_dropout: float = 0.0
    learn_sigma: bool = False
    out_channels: int | None = None
    pag_layers: tuple[str, ...] = ("mid_attn",)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _heads(self, channels: int) -> int:
        return channels // self.head_channels if self.head_channels else self.num_heads

    @nn.compact
    def __call__(self, x: Array, t: Array, cond: Cond = None, *, train: bool = False,
                 fill_cache: bool = False, cache: Array | None = None) -> Array | tuple:
        """Predict from noisy ``x`` ``[B, H, W, C]`` at times ``t`` ``[B]``.

        Args:
          x: NHWC float input; ``H``, ``W`` multiples of ``2**(len(ch_mult)-1)``.
          t: ``[B]`` (or scalar) time / noise level, embedded as given.
          cond: ``None`` or ``{"label": [B] int}``; missing labels mean the null class.
          train: training mode (dropout, label dropout; needs the ``dropout`` RNG).
          fill_cache: also return DeepCache's features (Ma et al. 2024, Sec. 3.2): the
            input of the last up block, everything computed below the shallowest
            skip branch (the one from ``conv_in``), ``[B, H, W, ch * ch_mult[0]]``.
          cache: those features from an earlier call: only ``conv_in``, the last up
            block and the output layer run (DeepCache's cheap call; the prediction
            changes).

        Returns:
          ``[B, H, W, C']`` float32, ``C' = (out_channels or C) * (2 if learn_sigma else 1)``;
          with ``fill_cache``, ``(prediction, features)``.
        """
        t = check_inputs(x, t)
        b, height, width, channels = x.shape
        factor = 2 ** (len(self.ch_mult) - 1)
        if height % factor or width % factor:
            raise InputError(
                f"UNet with {len(self.ch_mult)} levels needs height and width divisible by "
                f"{factor}, got {height}x{width}; pad the input or use fewer levels (ch_mult)."
            )
        bad = [lvl for lvl in self.attention_levels if not 0 <= lvl < len(self.ch_mult)]
        if bad:
            raise InputError(f"attention_levels {bad} out of range for ch_mult={self.ch_mult}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res = dict(dropout=self.dropout, scale_shift=self.scale_shift,
                   num_groups=self.num_groups, **kw)
        cond, perturb = split_perturb(cond, b)
        names = []  # the attention blocks built, to check pag_layers against

        def attn(n, name):
            names.append(name)
            block = AttnBlock(self._heads(n), self.num_groups, name=name, **kw)
            return lambda h: block(h, perturb if name in self.pag_layers else None)

        emb = TimestepEmbedder(4 * self.ch, freq_dim=self.ch, name="t_embedder", **kw)(t)
        label = split_cond(cond, self.num_classes, b)
        if label is not None:
            emb = emb + LabelEmbedder(self.num_classes, 4 * self.ch, self.class_dropout,
                                      name="y_embedder", **kw)(label, train)

        def up(h, skip, level, i):
            h = jnp.concatenate([h, skip], axis=-1)
            h = ResBlock(self.ch * self.ch_mult[level], name=f"up{level}_res{i}", **res)(
                h, emb, train
            )
            if level in self.attention_levels:
                h = attn(h.shape[-1], f"up{level}_attn{i}")(h)
            return h

        h = conv(self.ch, ("channels", "embed"), name="conv_in", **kw)(x.astype(self.dtype))
        if cache is not None:
            features = cache
            h = up(cache.astype(h.dtype), h, 0, self.num_res_blocks)
        else:
            h, features = self._deep(h, emb, train, res, attn, up)
            if perturb is not None and not set(self.pag_layers) <= set(names):
                raise InputError(
                    f"pag_layers {sorted(set(self.pag_layers) - set(names))} are not attention "
                    f"blocks of this U-Net; it has {names}."
                )
        h = nn.silu(group_norm(self.num_groups, name="norm_out", **kw)(h))
        out_ch = (self.out_channels or channels) * (2 if self.learn_sigma else 1)
        h = conv(out_ch, ("conv_in", "channels"), kernel_init=zeros, name="conv_out", **kw)(h)
        out = h.astype(jnp.float32)
        return (out, features) if fill_cache else out

    def _deep(self, h: Array, emb: Array, train: bool, res: dict, attn, up) -> tuple:
        """Every block after ``conv_in``: the output and DeepCache's features on the way."""
        skips = [h]
        last = len(self.ch_mult) - 1
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = ResBlock(self.ch * mult, name=f"down{level}_res{i}", **res)(h, emb, train)
                if level in self.attention_levels:
                    h = attn(h.shape[-1], f"down{level}_attn{i}")(h)
                skips.append(h)
            if level != last:
                h = self._downsample(h, emb, train, res, f"down{level}_resample")
                skips.append(h)

        h = ResBlock(h.shape[-1], name="mid_res0", **res)(h, emb, train)
        h = attn(h.shape[-1], "mid_attn")(h)
        h = ResBlock(h.shape[-1], name="mid_res1", **res)(h, emb, train)

        features = None
        for level in reversed(range(len(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                features = h if (level, i) == (0, self.num_res_blocks) else features
                h = up(h, skips.pop(), level, i)
            if level != 0:
                h = self._upsample(h, emb, train, res, f"up{level}_resample")
        return h, features

    def _downsample(self, h: Array, emb: Array, train: bool, res: dict, name: str) -> Array:
        if self.resblock_updown:
            return ResBlock(h.shape[-1], resample="down", name=name, **res)(h, emb, train)
        if self.conv_resample:
            return conv(h.shape[-1], ("conv_in", "embed"), stride=2, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=name)(h)
        return _resample(h, "down")

    def _upsample(self, h: Array, emb: Array, train: bool, res: dict, name: str) -> Array:
        if self.resblock_updown:
            return ResBlock(h.shape[-1], resample="up", name=name, **res)(h, emb, train)
        if self.conv_resample:
            return NearestUpsampleConv(h.shape[-1], ("conv_in", "embed"), dtype=self.dtype,
                                       param_dtype=self.param_dtype, name=name)(h)
        return _resample(h, "up")


UNET_PRESETS: dict[str, dict[str, Any]] = {
    "ddpm-cifar10": dict(
        ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attention_levels=(1,), dropout=0.1
    ),
    "adm-imagenet64": dict(
        ch=192,
        ch_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attention_levels=(1, 2, 3),
        head_channels=64,
        dropout=0.1,
        scale_shift=True,
        resblock_updown=True,
        num_classes=1000,
        learn_sigma=True,
    ),
    "small": dict(
        ch=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_levels=(2,),
        head_channels=32,
        num_groups=8,
        dropout=0.1,
        scale_shift=True,
    ),
}
"""Named U-Net configurations; see the module docstring."""


def unet(name: str, **overrides: Any) -> UNet:
    """A U-Net preset from :data:`UNET_PRESETS`, fields overridable by keyword.

    Example: ``unet("small", num_classes=10)``.

    Raises:
      InputError: for an unknown name.
    """
    if name not in UNET_PRESETS:
        raise InputError(f"unknown U-Net preset {name!r}; expected one of {sorted(UNET_PRESETS)}.")
    return UNet(**{**UNET_PRESETS[name], **overrides})

