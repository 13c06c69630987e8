"""EDM2: the magnitude-preserving U-Net of Karras et al. (CVPR 2024), config G.

"Analyzing and Improving the Training Dynamics of Diffusion Models". A Flax
port of NVlabs/edm2 ``training/networks_edm2.py`` (read at commit
4bf8162f601bcc09472ce8a32dd0cbe8889dc8fc); for the same weights it returns
what the official ``Precond`` returns (tests/test_edm2.py pins this on a
fixture made by running the official file).

- :class:`MPConv`: a weight-normalised convolution or linear layer (Eq. 47,
  66): ``w / ||w_o|| * gain / sqrt(fan_in)`` in the forward pass; the
  *forced* normalisation of the stored weights (the official training-mode
  side effect) is the pure :func:`force_normalize`, which the trainer applies
  to the parameters once at initialisation and after every optimizer step.
- :func:`mp_silu` (Eq. 81), :func:`mp_sum` (Eq. 88), :func:`mp_cat` (Eq. 103),
  :func:`normalize` (pixel norm), :class:`MPFourier` (Eq. 75), cosine
  attention (normalised q, k, v), the learned gains ``emb_gain`` and
  ``out_gain`` (zero at initialisation), activation clipping at 256.
- :class:`EDM2` is the official ``Precond``: EDM preconditioning with
  ``sigma_data = 0.5`` and ``c_noise = ln(sigma) / 4`` around the
  :class:`EDM2UNet`, plus the uncertainty ``u(sigma)`` (Eq. 21), returned with
  ``return_logvar=True``.

Variables: ``params`` (trainable; the official parameter count) and
``buffers`` (the fixed random Fourier frequencies and phases, the official
registered buffers). Both are needed by ``apply``; only ``params`` is trained.

Training as the paper does: ``params = force_normalize(variables["params"])``
once, then per step the loss :func:`jaxgen.diffusion.edm2_loss.edm2_loss` over
``model_fn(p, x, sigma, cond) = model.apply({"params": p, "buffers": buffers},
x, sigma, cond, train=True, return_logvar=True, rngs=...)``, Adam (0.9, 0.99)
without weight decay at :func:`jaxgen.train.schedules.inverse_sqrt_schedule`,
``params = force_normalize(params)`` after the update, then
:func:`jaxgen.train.phema.power_ema_update`.

Usage::

    model = edm2("xs")                                   # 64x64x4 latents, 1000 classes
    variables = model.init(key, x, sigma, {"label": y})
    denoised = model.apply(variables, x, sigma, {"label": y})
    denoised, logvar = model.apply(variables, x, sigma, {"label": y}, return_logvar=True)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import InputError
from jaxgen.models.contract import Cond, check_inputs, split_cond
from jaxgen.models.layers import Array, Dtype

EDM2_SIZES: dict[str, dict[str, Any]] = {
    "xs": dict(model_channels=128, dropout=0.0),
    "s": dict(model_channels=192, dropout=0.0),
    "m": dict(model_channels=256, dropout=0.1),
    "l": dict(model_channels=320, dropout=0.1),
    "xl": dict(model_channels=384, dropout=0.1),
    "xxl": dict(model_channels=448, dropout=0.1),
}
"""Width and dropout of the official ``edm2-img512-*`` presets (``train_edm2.py``)."""

EDM2_PRESETS: dict[str, dict[str, Any]] = {
    **{name: dict(img_resolution=64, img_channels=4, num_classes=1000, **size)
       for name, size in EDM2_SIZES.items()},
    **{f"img64-{name}": dict(img_resolution=64, img_channels=3, num_classes=1000, **size)
       for name, size in EDM2_SIZES.items() if name != "xxl"},
}
"""``"xs"`` ... ``"xxl"``: ImageNet-512 in 64x64x4 latents; ``"img64-xs"`` ... ``"img64-xl"``:
ImageNet-64 pixels. All are config G (channel_mult 1,2,3,4, three blocks per level,
attention at 16x16 and 8x8)."""


def normalize(x: Array, axis: int | tuple[int, ...] | None = None, eps: float = 1e-4) -> Array:
    """``x / (eps + ||x|| / sqrt(n))`` over ``axis``: unit mean-square magnitude.

    ``axis=None`` normalises over every axis but the last (a weight's
    fan-in, with the output channels last); ``axis=-1`` is the pixel norm.
    The norm is taken in float32.
    """
    if axis is None:
        axis = tuple(range(x.ndim - 1))
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=axis, keepdims=True))
    n = np.prod([x.shape[a] for a in np.atleast_1d(axis)])
    return x / (eps + norm / np.sqrt(n)).astype(x.dtype)


def mp_silu(x: Array) -> Array:
    """Magnitude-preserving SiLU (Eq. 81): ``silu(x) / 0.596``."""
    return nn.silu(x) / 0.596


def mp_sum(a: Array, b: Array, t: float = 0.5) -> Array:
    """Magnitude-preserving blend (Eq. 88): ``((1 - t) a + t b) / sqrt((1 - t)^2 + t^2)``."""
    return (a + t * (b - a)) / np.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Array, b: Array, t: float = 0.5) -> Array:
    """Magnitude-preserving concatenation over channels (Eq. 103), ``t`` weighting ``b``."""
    na, nb = a.shape[-1], b.shape[-1]
    c = np.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return jnp.concatenate([c / np.sqrt(na) * (1 - t) * a, c / np.sqrt(nb) * t * b], axis=-1)


@jax.jit
def force_normalize(params: Any) -> Any:
    """Forced weight normalisation (Eq. 66): every MPConv weight to unit norm per output.

    The official network does this as a side effect of each training-mode
    forward pass (before using the weight); here it is a pure function of the
    parameter tree, to apply after ``model.init`` and after every optimizer
    step (inside the jitted train step, or alone: it is jitted). Gains
    (scalars) are left alone.

    Args:
      params: ``variables["params"]`` of an :class:`EDM2` (or any subtree), boxed or not.

    Returns:
      The same tree with each ``weight`` leaf replaced by ``normalize(weight)``.
    """

    def fix(path, leaf):
        # The last dict key names the leaf (boxed parameters add a ``.value`` step after it).
        name = next((k.key for k in reversed(path) if hasattr(k, "key")), None)
        return normalize(leaf).astype(leaf.dtype) if name == "weight" else leaf

    return jax.tree_util.tree_map_with_path(fix, params)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (``kernel > 0``) or linear layer (``kernel == 0``).

    Weight layout: ``[k, k, in, out]`` (HWIO) or ``[in, out]``, no bias;
    initialised ``N(0, 1)`` as in the official code. ``axes`` are the logical
    names of the (in, out) dimensions, for sharding (:mod:`jaxgen.models.layers`).
    """

    features: int
    kernel: int = 0
    axes: tuple[str, str] = ("conv_in", "embed")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, gain: Array | float = 1.0) -> Array:
        """``x`` ``[..., in]`` (linear) or ``[B, H, W, in]`` (conv) → ``[..., features]``."""
        shape = (*(self.kernel,) * (2 if self.kernel else 0), x.shape[-1], self.features)
        axes = (*("kernel_h", "kernel_w")[: len(shape) - 2], *self.axes)
        init = nn.with_logical_partitioning(nn.initializers.normal(1.0), axes)
        w = self.param("weight", init, shape, self.param_dtype)
        w = normalize(w.astype(jnp.float32))
        w = (w * (gain / np.sqrt(np.prod(shape[:-1])))).astype(self.dtype)
        x = x.astype(self.dtype)
        if not self.kernel:
            return x @ w
        pad = self.kernel // 2
        return jax.lax.conv_general_dilated(
            x, w, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )


class MPFourier(nn.Module):
    """Fourier features ``sqrt(2) cos(f x + p)`` (Eq. 75), ``f ~ 2 pi N(0, 1)``, ``p ~ 2 pi U``.

    ``f`` and ``p`` (``U`` uniform on [0, 1)) are drawn at ``init`` and kept in ``buffers``.
    """

    num_channels: int
    bandwidth: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``[B]`` → ``[B, num_channels]`` float32."""
        freqs = self.variable(
            "buffers", "freqs",
            lambda: 2 * np.pi * self.bandwidth * jax.random.normal(
                self.make_rng("params"), (self.num_channels,)))
        phases = self.variable(
            "buffers", "phases",
            lambda: 2 * np.pi * jax.random.uniform(self.make_rng("params"), (self.num_channels,)))
        y = x.astype(jnp.float32)[:, None] * freqs.value + phases.value
        return jnp.cos(y) * np.sqrt(2)


class Block(nn.Module):
    """Encoder or decoder block with optional cosine self-attention (the paper's Figure 21)."""

    features: int
    flavor: str = "enc"
    resample: str = "keep"
    attention: bool = False
    channels_per_head: int = 64
    dropout: float = 0.0
    res_balance: float = 0.3
    attn_balance: float = 0.3
    clip_act: float | None = 256.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
        """``x`` ``[B, H, W, C]``, ``emb`` ``[B, E]`` → ``[B, H', W', features]``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        skip = x.shape[-1] != self.features
        # The official resampling filter [1, 1]: 2x2 box down, nearest up.
        if self.resample == "down":
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        elif self.resample == "up":
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if self.flavor == "enc":
            if skip:
                x = MPConv(self.features, 1, name="conv_skip", **kw)(x)
            x = normalize(x, axis=-1)  # pixel norm

        y = MPConv(self.features, 3, name="conv_res0", **kw)(mp_silu(x))
        emb_gain = self.param("emb_gain", nn.initializers.zeros_init(), (), self.param_dtype)
        c = MPConv(self.features, axes=("mlp", "embed"), name="emb_linear", **kw)(
            emb, gain=emb_gain) + 1
        y = mp_silu(y * c[:, None, None, :].astype(y.dtype))
        y = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0)(y)
        y = MPConv(self.features, 3, name="conv_res1", **kw)(y)

        if self.flavor == "dec" and skip:
            x = MPConv(self.features, 1, name="conv_skip", **kw)(x)
        x = mp_sum(x, y, self.res_balance)

        heads = self.features // self.channels_per_head if self.attention else 0
        if heads:
            b, h, w, c = x.shape
            y = MPConv(3 * c, 1, name="attn_qkv", **kw)(x)
            # Official channel layout: (head, channel, q/k/v); pixel norm per head.
            y = normalize(y.reshape(b, h * w, heads, c // heads, 3), axis=3)
            q, k, v = y[..., 0], y[..., 1], y[..., 2]
            logits = jnp.einsum("bqhc,bkhc->bhqk", q, k / np.sqrt(c // heads))
            y = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(logits, axis=-1), v)
            y = MPConv(c, 1, name="attn_proj", **kw)(y.reshape(b, h, w, c))
            x = mp_sum(x, y, self.attn_balance)

        if self.clip_act is not None:
            x = jnp.clip(x, -self.clip_act, self.clip_act)
        return x


class EDM2UNet(nn.Module):
    """The EDM2 U-Net backbone ``F(c_in x, c_noise, labels)`` (Figure 21).

    Submodule names follow the official ``enc``/``dec`` keys with ``.`` → ``_``
    (``enc_64x64_block0``), so :func:`jaxgen.models.load_weights` maps state
    dicts by name.
    """

    img_resolution: int
    img_channels: int
    label_dim: int
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    channel_mult_noise: int | None = None
    channel_mult_emb: int | None = None
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (16, 8)
    label_balance: float = 0.5
    concat_balance: float = 0.5
    channels_per_head: int = 64
    dropout: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c_noise: Array, labels: Array | None, train: bool) -> Array:
        """``x`` ``[B, H, W, C]``, ``c_noise`` ``[B]``, ``labels`` ``[B, label_dim]`` float."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = dict(channels_per_head=self.channels_per_head, dropout=self.dropout, **kw)
        # remat: each block's activations are recomputed in the backward pass, not stored
        # (``train``, argument 3 counting ``self``, is a Python bool: static).
        block_cls = nn.remat(Block, static_argnums=(3,)) if self.remat else Block
        cblock = [self.model_channels * m for m in self.channel_mult]
        cnoise = self.model_channels * (self.channel_mult_noise or self.channel_mult[0])
        cemb = self.model_channels * self.channel_mult_emb if self.channel_mult_emb else max(cblock)

        fourier = MPFourier(cnoise, name="emb_fourier")(c_noise)
        emb = MPConv(cemb, axes=("freq", "mlp"), name="emb_noise", **kw)(fourier)
        if labels is not None:
            y = MPConv(cemb, axes=("vocab", "mlp"), name="emb_label", **kw)(
                labels * np.sqrt(labels.shape[1]))
            emb = mp_sum(emb, y, self.label_balance)
        emb = mp_silu(emb)

        x = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)
        skips = []
        for level, channels in enumerate(cblock):
            res = self.img_resolution >> level
            if level == 0:
                x = MPConv(channels, 3, axes=("channels", "embed"), name=f"enc_{res}x{res}_conv",
                           **kw)(x)
            else:
                x = block_cls(x.shape[-1], "enc", "down", name=f"enc_{res}x{res}_down", **block)(
                    x, emb, train)
            skips.append(x)
            for idx in range(self.num_blocks):
                x = block_cls(channels, "enc", attention=res in self.attn_resolutions,
                          name=f"enc_{res}x{res}_block{idx}", **block)(x, emb, train)
                skips.append(x)

        for level, channels in reversed(list(enumerate(cblock))):
            res = self.img_resolution >> level
            if level == len(cblock) - 1:
                x = block_cls(x.shape[-1], "dec", attention=True, name=f"dec_{res}x{res}_in0",
                          **block)(x, emb, train)
                x = block_cls(x.shape[-1], "dec", name=f"dec_{res}x{res}_in1", **block)(
                    x, emb, train)
            else:
                x = block_cls(x.shape[-1], "dec", "up", name=f"dec_{res}x{res}_up", **block)(
                    x, emb, train)
            for idx in range(self.num_blocks + 1):
                x = mp_cat(x, skips.pop(), self.concat_balance)
                x = block_cls(channels, "dec", attention=res in self.attn_resolutions,
                          name=f"dec_{res}x{res}_block{idx}", **block)(x, emb, train)
        out_gain = self.param("out_gain", nn.initializers.zeros_init(), (), self.param_dtype)
        return MPConv(self.img_channels, 3, axes=("conv_in", "channels"), name="out_conv",
                      **kw)(x, gain=out_gain)


class EDM2(nn.Module):
    """The official ``Precond``: EDM preconditioning and uncertainty around :class:`EDM2UNet`.

    ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` with
    ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
    ``c_in = 1 / sqrt(sd^2 + sigma^2)``, ``c_noise = ln(sigma) / 4`` (EDM Table 1,
    EDM2 Appendix B.6). Labels are one-hot, scaled by ``sqrt(num_classes)``
    inside the U-Net; the null label ``num_classes`` (or no label) is the zero
    vector, what the official network receives for ``class_labels=None``.

    Attributes:
      img_resolution: input height and width (the layer names depend on it).
      img_channels: input channels (4 for SD-VAE latents, 3 for pixels).
      num_classes: classes (0: unconditional).
      sigma_data: standard deviation of the training data.
      logvar_channels: Fourier features of the uncertainty head.
      model_channels, channel_mult, num_blocks, attn_resolutions,
      channels_per_head, dropout, label_balance, concat_balance: see
        :class:`EDM2UNet` and the official ``UNet``/``Block``.
      remat: recompute each block's activations in the backward pass (``nn.remat``)
        instead of storing them: less memory for a second forward pass per block;
        same parameters (names and values) and, to rounding, the same gradients.
      dtype: compute dtype of the U-Net (the official net uses fp16 on GPU);
        preconditioning and the output stay float32.
      param_dtype: parameter dtype.
    """

    img_resolution: int = 64
    img_channels: int = 4
    num_classes: int = 1000
    sigma_data: float = 0.5
    logvar_channels: int = 128
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (16, 8)
    channels_per_head: int = 64
    dropout: float = 0.0
    label_balance: float = 0.5
    concat_balance: float = 0.5
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: Array,
        sigma: Array,
        cond: Cond = None,
        *,
        train: bool = False,
        return_logvar: bool = False,
    ) -> Array | tuple[Array, Array]:
        """Denoise ``x`` ``[B, H, W, C]`` at noise levels ``sigma`` ``[B]``.

        Args:
          x: NHWC float input, ``H = W = img_resolution``, ``C = img_channels``.
          sigma: ``[B]`` (or scalar) noise standard deviations, > 0.
          cond: ``None`` or ``{"label": [B] int}``; ``num_classes`` is the null label.
          train: training mode (dropout; needs the ``dropout`` RNG).
          return_logvar: also return the uncertainty ``u(sigma)`` ``[B, 1, 1, 1]``.

        Returns:
          The denoised ``[B, H, W, C]`` float32, and the logvar if asked for.
        """
        sigma = check_inputs(x, sigma)
        expected = (self.img_resolution, self.img_resolution, self.img_channels)
        if x.shape[1:] != expected:
            raise InputError(
                f"EDM2 built for {expected[0]}x{expected[1]}x{expected[2]} inputs got x of shape "
                f"{tuple(x.shape)}; pick the preset for this data (img_resolution, img_channels)."
            )
        label = split_cond(cond, self.num_classes, x.shape[0])
        onehot = None if label is None else jax.nn.one_hot(label, self.num_classes)
        x = x.astype(jnp.float32)
        sd = self.sigma_data
        s = sigma[:, None, None, None]
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / jnp.sqrt(s**2 + sd**2)
        c_in = 1 / jnp.sqrt(sd**2 + s**2)
        c_noise = jnp.log(sigma) / 4
        unet = EDM2UNet(
            self.img_resolution, self.img_channels, self.num_classes,
            model_channels=self.model_channels, channel_mult=self.channel_mult,
            num_blocks=self.num_blocks, attn_resolutions=self.attn_resolutions,
            label_balance=self.label_balance, concat_balance=self.concat_balance,
            channels_per_head=self.channels_per_head, dropout=self.dropout,
            remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype, name="unet",
        )
        f_x = unet((c_in * x).astype(self.dtype), c_noise, onehot, train)
        d_x = c_skip * x + c_out * f_x.astype(jnp.float32)
        # Always built (the head is part of the parameters), returned on request.
        fourier = MPFourier(self.logvar_channels, name="logvar_fourier")(c_noise)
        logvar = MPConv(1, axes=("freq", "channels"), name="logvar_linear",
                        param_dtype=self.param_dtype)(fourier)
        return (d_x, logvar.reshape(-1, 1, 1, 1)) if return_logvar else d_x


def edm2(name: str, **overrides: Any) -> EDM2:
    """An EDM2 preset from :data:`EDM2_PRESETS`, fields overridable by keyword.

    Example: ``edm2("xs")``, ``edm2("img64-s", num_classes=0)``.

    Raises:
      InputError: for an unknown name.
    """
    if name not in EDM2_PRESETS:
        raise InputError(f"unknown EDM2 preset {name!r}; expected one of {list(EDM2_PRESETS)}.")
    return EDM2(**{**EDM2_PRESETS[name], **overrides})
