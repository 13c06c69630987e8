"""Inception-v3 as in TensorFlow's ``inception-2015-12-05`` graph (the FID network).

This is the graph TTUR's original FID code, the ADM evaluator,
torch-fidelity and clean-fid's legacy mode use; it differs from
torchvision's Inception-v3 in its pooling details. Reproduced here:

* input uint8 NHWC of any size -> float -> TF1 *legacy* bilinear resize to
  299x299 (``align_corners=False`` and no half-pixel offset: the source
  coordinate of output pixel ``i`` is ``i * in / out``) -> ``(x - 128) / 128``;
* every convolution is followed by a BatchNorm without scale (eps 1e-3) and a
  ReLU; the BatchNorm is folded into the convolution's kernel and bias when
  the weights are converted (``weights.py``);
* the 3x3 average pools inside the blocks exclude the padding; the last block
  (``mixed_10``) has a 3x3 *max* pool in its pool branch;
* outputs: ``pool3`` [N, 2048] (global average of ``mixed_10``), ``logits``
  [N, 1008] = ``pool3 @ W`` *without* the softmax bias, as the original
  Inception Score code computes them, and ``spatial`` [N, 2023]: the first 7
  channels of ``mixed_6/conv`` (17x17), flattened in (H, W, C) order as the
  ADM evaluator does for sFID.

Layer names follow the TF graph (``conv``, ``conv_1``, ..., ``mixed``,
``mixed_1``, ..., ``mixed_10``; branches ``tower``, ``tower_1``, ...).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
POOL3_DIM = 2048
NUM_LOGITS = 1008
MIXED_6_CONV_CHANNELS = 192  # mixed_6/conv: the first (1x1 conv) branch of mixed_6
SPATIAL_CHANNELS = 7  # sFID keeps the first 7 channels of mixed_6/conv (ADM evaluator)


def conv_bn(
    x: jax.Array,
    features: int,
    kernel: tuple[int, int],
    stride: int = 1,
    padding: str | tuple[int, int] = "VALID",
    *,
    name: str,
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """Convolution + (folded) BatchNorm + ReLU: one ``conv`` node of the TF graph.

    Call inside a compact module; ``padding`` is "VALID" or symmetric (pad_h, pad_w).
    """
    if not isinstance(padding, str):
        padding = ((padding[0], padding[0]), (padding[1], padding[1]))
    # HIGHEST: TPUs and recent GPUs would otherwise multiply float32 in bf16/TF32,
    # moving FID by far more than the 1e-4 we promise against TF.
    conv = nn.Conv(
        features, kernel, (stride, stride), padding=padding, dtype=dtype,
        precision=jax.lax.Precision.HIGHEST, name=name,
    )
    return nn.relu(conv(x))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # TF's 3x3/1 SAME average pool divides by the number of *valid* inputs.
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class InceptionA(nn.Module):
    """``mixed``, ``mixed_1``, ``mixed_2`` (35x35)."""

    pool_features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = lambda y, f, k, p, name: conv_bn(y, f, k, 1, p, name=name, dtype=self.dtype)
        b0 = c(x, 64, (1, 1), "VALID", "conv")
        b1 = c(x, 48, (1, 1), "VALID", "tower/conv")
        b1 = c(b1, 64, (5, 5), (2, 2), "tower/conv_1")
        b2 = c(x, 64, (1, 1), "VALID", "tower_1/conv")
        b2 = c(b2, 96, (3, 3), (1, 1), "tower_1/conv_1")
        b2 = c(b2, 96, (3, 3), (1, 1), "tower_1/conv_2")
        b3 = c(_avg_pool_3x3(x), self.pool_features, (1, 1), "VALID", "tower_2/conv")
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionB(nn.Module):
    """``mixed_3``: 35x35 -> 17x17."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = lambda y, f, k, p, s, name: conv_bn(y, f, k, s, p, name=name, dtype=self.dtype)
        b0 = c(x, 384, (3, 3), "VALID", 2, "conv")
        b1 = c(x, 64, (1, 1), "VALID", 1, "tower/conv")
        b1 = c(b1, 96, (3, 3), (1, 1), 1, "tower/conv_1")
        b1 = c(b1, 96, (3, 3), "VALID", 2, "tower/conv_2")
        return jnp.concatenate([b0, b1, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """``mixed_4`` .. ``mixed_7`` (17x17, factorised 7x7)."""

    channels_7x7: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = lambda y, f, k, p, name: conv_bn(y, f, k, 1, p, name=name, dtype=self.dtype)
        c7 = self.channels_7x7
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding)
        b0 = c(x, 192, (1, 1), "VALID", "conv")
        b1 = c(x, c7, (1, 1), "VALID", "tower/conv")
        b1 = c(b1, c7, *row, "tower/conv_1")
        b1 = c(b1, 192, *col, "tower/conv_2")
        b2 = c(x, c7, (1, 1), "VALID", "tower_1/conv")
        b2 = c(b2, c7, *col, "tower_1/conv_1")
        b2 = c(b2, c7, *row, "tower_1/conv_2")
        b2 = c(b2, c7, *col, "tower_1/conv_3")
        b2 = c(b2, 192, *row, "tower_1/conv_4")
        b3 = c(_avg_pool_3x3(x), 192, (1, 1), "VALID", "tower_2/conv")
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionD(nn.Module):
    """``mixed_8``: 17x17 -> 8x8."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = lambda y, f, k, p, s, name: conv_bn(y, f, k, s, p, name=name, dtype=self.dtype)
        b0 = c(x, 192, (1, 1), "VALID", 1, "tower/conv")
        b0 = c(b0, 320, (3, 3), "VALID", 2, "tower/conv_1")
        b1 = c(x, 192, (1, 1), "VALID", 1, "tower_1/conv")
        b1 = c(b1, 192, (1, 7), (0, 3), 1, "tower_1/conv_1")
        b1 = c(b1, 192, (7, 1), (3, 0), 1, "tower_1/conv_2")
        b1 = c(b1, 192, (3, 3), "VALID", 2, "tower_1/conv_3")
        return jnp.concatenate([b0, b1, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """``mixed_9`` (average pool branch) and ``mixed_10`` (max pool branch), 8x8."""

    max_pool: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = lambda y, f, k, p, name: conv_bn(y, f, k, 1, p, name=name, dtype=self.dtype)
        row, col = ((1, 3), (0, 1)), ((3, 1), (1, 0))
        b0 = c(x, 320, (1, 1), "VALID", "conv")
        a = c(x, 384, (1, 1), "VALID", "tower_conv")
        b1 = [c(a, 384, *row, "tower_mixed_conv"), c(a, 384, *col, "tower_mixed_conv_1")]
        b = c(x, 448, (1, 1), "VALID", "tower_1_conv")
        b = c(b, 384, (3, 3), (1, 1), "tower_1_conv_1")
        b2 = [c(b, 384, *row, "tower_1_mixed_conv"), c(b, 384, *col, "tower_1_mixed_conv_1")]
        if self.max_pool:  # the 2015 graph's mixed_10 pools with max, not average
            pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        b3 = c(pooled, 192, (1, 1), "VALID", "tower_2_conv")
        return jnp.concatenate([b0, *b1, *b2, b3], axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception-v3 on normalised 299x299 input; see the module docstring.

    Call with float NHWC in [-1, 1) (use :func:`preprocess`); returns a dict
    with ``pool3``, ``spatial`` and, when ``with_logits``, ``logits``.
    """

    with_logits: bool = True
    dtype: jnp.dtype = jnp.float32
    source: str = ""  # which weight file the parameters came from (for reports)
    # Stop after mixed_6 and return only {"mixed_6_conv": [N, 17, 17, 192]}, the spatial
    # features REPA aligns to when no DINOv2 is at hand (jaxgen.train.repa).
    until_mixed_6: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        d = self.dtype
        x = conv_bn(x, 32, (3, 3), 2, dtype=d, name="conv")
        x = conv_bn(x, 32, (3, 3), dtype=d, name="conv_1")
        x = conv_bn(x, 64, (3, 3), padding=(1, 1), dtype=d, name="conv_2")
        x = _max_pool_3x3_s2(x)  # pool0
        x = conv_bn(x, 80, (1, 1), dtype=d, name="conv_3")
        x = conv_bn(x, 192, (3, 3), dtype=d, name="conv_4")
        x = _max_pool_3x3_s2(x)  # pool1
        x = InceptionA(32, dtype=d, name="mixed")(x)
        x = InceptionA(64, dtype=d, name="mixed_1")(x)
        x = InceptionA(64, dtype=d, name="mixed_2")(x)
        x = InceptionB(dtype=d, name="mixed_3")(x)
        x = InceptionC(128, dtype=d, name="mixed_4")(x)
        x = InceptionC(160, dtype=d, name="mixed_5")(x)
        x = InceptionC(160, dtype=d, name="mixed_6")(x)
        if self.until_mixed_6:
            return {"mixed_6_conv": x[..., :MIXED_6_CONV_CHANNELS].astype(jnp.float32)}
        # mixed_6/conv is the first branch of mixed_6: its output is channels 0..191.
        spatial = x[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        x = InceptionC(192, dtype=d, name="mixed_7")(x)
        x = InceptionD(dtype=d, name="mixed_8")(x)
        x = InceptionE(max_pool=False, dtype=d, name="mixed_9")(x)
        x = InceptionE(max_pool=True, dtype=d, name="mixed_10")(x)
        pool3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # the 8x8 average pool
        out = {"pool3": pool3, "spatial": spatial.astype(jnp.float32)}
        if self.with_logits:
            w = self.param("logits", nn.initializers.zeros, (POOL3_DIM, NUM_LOGITS), jnp.float32)
            out["logits"] = jnp.dot(pool3, w, precision=jax.lax.Precision.HIGHEST)
        return out


def _legacy_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights of TF1's legacy bilinear resize along one axis.

    Mirrors ``compute_interpolation_weights`` in TF's ``resize_bilinear_op``
    with ``align_corners=False, half_pixel_centers=False``, in float32.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lo = np.floor(src).astype(np.int32)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - np.floor(src)).astype(np.float32)


def resize_legacy_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """TF1 ``tf.image.resize_bilinear(align_corners=False)`` on float NHWC.

    Separable, in TF's order of operations: rows are interpolated first
    (``top = tl + (tr - tl) * dx``), then ``top + (bottom - top) * dy``,
    so the arithmetic is the same as TF's per-pixel kernel.
    """
    _, h, w, _ = x.shape
    out_h, out_w = size
    if (h, w) == (out_h, out_w):
        return x
    x_lo, x_hi, dx = _legacy_bilinear_taps(w, out_w)
    left, right = x[:, :, x_lo, :], x[:, :, x_hi, :]
    rows = left + (right - left) * dx[None, None, :, None]
    y_lo, y_hi, dy = _legacy_bilinear_taps(h, out_h)
    top, bottom = rows[:, y_lo], rows[:, y_hi]
    return top + (bottom - top) * dy[None, :, None, None]


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 NHWC (1 or 3 channels, any size) -> normalised float32 [N, 299, 299, 3]."""
    x = images.astype(jnp.float32)
    x = resize_legacy_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    if x.shape[-1] == 1:  # grayscale: repeat to RGB (after the resize, which is per channel)
        x = jnp.repeat(x, 3, axis=-1)
    return (x - 128.0) / 128.0
