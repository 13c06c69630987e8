"""Building blocks shared by the DiT, the U-Net and the autoencoder.

Every parameter carries logical axis names (``nn.with_logical_partitioning``)
so that training can shard weights over an ``fsdp`` mesh axis without
touching the model code. The names are:

- ``embed``: a layer's output width (DiT hidden size, U-Net channels);
- ``mlp``: a wide or inner width (DiT MLP/QKV/adaLN, U-Net time embedding);
- ``conv_in``: a U-Net convolution's input channels;
- ``channels``, ``vocab``, ``freq``, ``kernel_h``, ``kernel_w``, ``norm``:
  small or oddly sized dimensions that stay replicated.

:data:`jaxgen.models.sharding.LOGICAL_AXIS_RULES` maps them onto the ``fsdp``
axis of :func:`jaxgen.parallel.make_mesh`.

Modules take ``dtype`` (the compute dtype, e.g. ``jnp.bfloat16``) apart from
``param_dtype`` (the storage dtype of parameters, normally ``float32``).
Normalisation statistics, the sinusoidal embeddings and the final output are
kept in ``float32``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import InputError

Dtype = Any
Array = jax.Array

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()


def dense(
    features: int,
    axes: tuple[str, str],
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    kernel_init: nn.initializers.Initializer = xavier_uniform,
    name: str | None = None,
) -> nn.Dense:
    """A ``nn.Dense`` (with bias) whose kernel and bias carry logical axis names."""
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(zeros, axes[1:]),
        name=name,
    )


def conv(
    features: int,
    axes: tuple[str, str],
    *,
    kernel: int = 3,
    stride: int = 1,
    padding: int | str = 1,
    dtype: Dtype,
    param_dtype: Dtype,
    kernel_init: nn.initializers.Initializer = xavier_uniform,
    name: str | None = None,
) -> nn.Conv:
    """A square 2-D ``nn.Conv`` over NHWC with logical axis names on its parameters.

    Args:
      features: output channels.
      axes: logical names of the (input channels, output channels) dimensions.
      kernel: kernel size.
      stride: stride in both directions.
      padding: zero padding on every side, or a Flax padding string.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      kernel_init: initialiser of the kernel.
      name: module name.
    """
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding if isinstance(padding, str) else ((padding, padding), (padding, padding)),
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, ("kernel_h", "kernel_w", *axes)),
        bias_init=nn.with_logical_partitioning(zeros, axes[1:]),
        name=name,
    )


class NearestUpsampleConv(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution (zero padding 1).

    The same function and parameters (``kernel [3, 3, in, features]``,
    ``bias``) as ``nn.Conv`` applied to ``repeat(repeat(x, 2, H), 2, W)``,
    computed at the input's resolution: every output pixel ``(2i + p, 2j + q)``
    sees only input rows ``i - 1 + p, i + p`` and columns ``j - 1 + q, j + q``,
    so each of the four phases ``(p, q)`` is a 2x2 convolution of ``x`` whose
    taps are sums of the 3x3 kernel's (rows: ``p = 0`` takes ``(w0, w1 + w2)``,
    ``p = 1`` takes ``(w0 + w1, w2)``; columns alike). 16 instead of 36
    multiply-adds per output pixel and channel pair, on a quarter of the
    activations; the outputs differ from the upsample-then-convolve form only
    by float rounding (the summed taps).
    """

    features: int
    axes: tuple[str, str]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = xavier_uniform

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``[B, H, W, C]`` → ``[B, 2H, 2W, features]``."""
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, ("kernel_h", "kernel_w", *self.axes)),
            (3, 3, x.shape[-1], self.features),
            self.param_dtype,
        )
        bias = self.param("bias", nn.with_logical_partitioning(zeros, self.axes[1:]),
                          (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        rows = []
        for row_taps, row_pad in _phase_taps(kernel, 0):
            cols = [
                jax.lax.conv_general_dilated(x, taps, (1, 1), (row_pad, col_pad),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
                for taps, col_pad in _phase_taps(row_taps, 1)
            ]
            rows.append(jnp.stack(cols, axis=3))  # [B, H, W, q, C]
        y = jnp.stack(rows, axis=2)  # [B, H, p, W, q, C]
        b, h, _, w, _, c = y.shape
        return y.reshape(b, 2 * h, 2 * w, c) + bias


def _phase_taps(kernel: Array, axis: int) -> tuple[tuple[Array, tuple[int, int]], ...]:
    """The two 2-tap kernels along ``axis`` of a 3-tap one, with their zero padding.

    Phase 0 reads input offsets (-1, 0) with taps ``(w0, w1 + w2)``; phase 1
    reads (0, +1) with taps ``(w0 + w1, w2)``.
    """
    w0, w1, w2 = (jnp.take(kernel, i, axis=axis) for i in range(3))
    return ((jnp.stack([w0, w1 + w2], axis), (1, 0)),
            (jnp.stack([w0 + w1, w2], axis), (0, 1)))


def group_norm(
    num_groups: int,
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str | None = None,
    epsilon: float = 1e-5,
):
    """GroupNorm (eps 1e-5 as in ADM; the LDM autoencoder uses 1e-6) with affine params ``norm``."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(zeros, ("norm",)),
        name=name,
    )


def sinusoidal_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
    """Sinusoidal embedding of a scalar per example, as in ADM and DiT.

    ``[cos(t f_0), ..., cos(t f_{d/2-1}), sin(t f_0), ...]`` with frequencies
    ``f_i = max_period^(-i / (d/2))``, from 1 down to ``1/max_period``; ``t`` of
    order 1 to 1000 (a DDPM step index, ``1000 t`` for ``t`` in [0, 1], or EDM's
    ``ln(sigma) / 4``) is resolved by these frequencies.

    Args:
      t: ``[B]`` times or noise levels (any float scale; see above).
      dim: embedding width (even).
      max_period: the slowest period.

    Returns:
      ``[B, dim]`` float32 embedding.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_pos_embed_2d(dim: int, height: int, width: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding of a ``height x width`` grid (MAE/DiT layout).

    The first ``dim/2`` features encode the column and the last ``dim/2`` the
    row, each as ``[sin, cos]`` with frequencies ``10000^(-i / (dim/4))`` —
    the exact table of DiT's ``get_2d_sincos_pos_embed``, so that ported
    checkpoints line up.

    Returns:
      ``[height * width, dim]`` float32 array, row-major over the grid.
    """
    if dim % 4:
        raise InputError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}.")

    def embed_1d(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=float))
    return np.concatenate([embed_1d(cols), embed_1d(rows)], axis=1).astype(np.float32)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of ``t`` followed by a 2-layer SiLU MLP (DiT, DDPM, ADM)."""

    features: int
    freq_dim: int = 256
    kernel_init: nn.initializers.Initializer = xavier_uniform
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: Array) -> Array:
        """``[B]`` times → ``[B, features]``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
        h = sinusoidal_embedding(t, self.freq_dim)
        h = dense(self.features, ("freq", "mlp"), name="fc1", **kw)(h)
        return dense(self.features, ("mlp", "embed"), name="fc2", **kw)(nn.silu(h))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row, the null class ``num_classes``.

    The null class is what classifier-free guidance uses for the
    unconditional branch. In training, each label is replaced by the null
    class with probability ``drop_rate`` (DiT's ``class_dropout_prob``), using
    the ``dropout`` RNG stream.
    """

    num_classes: int
    features: int
    drop_rate: float = 0.0
    param_dtype: Dtype = jnp.float32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, labels: Array, train: bool = False) -> Array:
        """``[B]`` int labels in ``[0, num_classes]`` → ``[B, features]``."""
        if train and self.drop_rate > 0:
            drop = jax.random.bernoulli(self.make_rng("dropout"), self.drop_rate, labels.shape)
            labels = jnp.where(drop, self.num_classes, labels)
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
        table = nn.Embed(
            self.num_classes + 1,
            self.features,
            embedding_init=init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="table",
        )
        return table(labels)


class Attention(nn.Module):
    """Multi-head self-attention over ``[B, T, C]`` via ``jax.nn.dot_product_attention``.

    A fused QKV projection (same parameter count as separate Q, K, V) and an
    output projection; ``zero_out`` zero-initialises the output projection
    (DDPM/ADM), so a fresh block is the identity around its residual.
    XLA picks the fused attention kernel where the platform has one (cuDNN
    flash attention on GPU for bf16/fp16). ``perturb`` (``[B]`` bool) replaces
    the attention map of those samples by the identity, so the output is the
    projected values: the perturbed pass of PAG (Ahn et al. 2024, Sec. 3.3).
    """

    num_heads: int
    zero_out: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, perturb: Array | None = None) -> Array:
        """``[B, T, C]`` → ``[B, T, C]``; ``perturb``: ``[B]`` bool or ``None``."""
        b, n, c = x.shape
        if c % self.num_heads:
            raise InputError(f"attention width {c} is not divisible by num_heads={self.num_heads}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = dense(3 * c, ("embed", "mlp"), name="qkv", **kw)(x)
        q, k, v = jnp.split(qkv.reshape(b, n, 3 * self.num_heads, c // self.num_heads), 3, axis=2)
        h = jax.nn.dot_product_attention(q, k, v)
        if perturb is not None:
            h = jnp.where(perturb[:, None, None, None], v, h)
        h = h.reshape(b, n, c)
        out_init = zeros if self.zero_out else xavier_uniform
        return dense(c, ("mlp", "embed"), kernel_init=out_init, name="proj", **kw)(h)
