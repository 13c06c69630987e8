"""The Vision Transformer trunk shared by the DINOv2 and CLIP image towers.

A pre-LayerNorm transformer (Dosovitskiy et al. 2021, eq. 2-3):
``x = x + ls1 * Attn(LN1(x))``, ``x = x + ls2 * MLP(LN2(x))``, where the
layer scales ``ls1``/``ls2`` (Touvron et al. 2021, "CaiT", eq. 5) are
DINOv2's and are absent (1) in CLIP. The MLP is GELU (DINOv2 S/B/L),
quick-GELU ``x * sigmoid(1.702 x)`` (OpenAI CLIP) or SwiGLU (DINOv2 g).
Matrix products run at full float32 precision (``Precision.HIGHEST``): on
TPUs and recent GPUs the default would multiply in bf16/TF32 and move the
features far more than the 1e-5 the reference parity asks.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

MLP_KINDS = ("gelu", "quick_gelu", "swiglu")
HIGHEST = jax.lax.Precision.HIGHEST


def swiglu_hidden(width: int, mlp_ratio: float = 4.0) -> int:
    """DINOv2's SwiGLU hidden size: 2/3 of the usual, rounded up to a multiple of 8."""
    return (int(int(width * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class Attention(nn.Module):
    """Multi-head self-attention with separate query/key/value projections."""

    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, d = x.shape
        dense = lambda name: nn.Dense(d, dtype=self.dtype, precision=HIGHEST, name=name)
        split = lambda y: y.reshape(n, t, self.heads, d // self.heads)
        q, k, v = (split(dense(name)(x)) for name in ("query", "key", "value"))
        logits = jnp.einsum("nqhc,nkhc->nhqk", q, k, precision=HIGHEST)
        weights = jax.nn.softmax(logits.astype(jnp.float32) * (d // self.heads) ** -0.5, axis=-1)
        out = jnp.einsum("nhqk,nkhc->nqhc", weights.astype(self.dtype), v, precision=HIGHEST)
        return dense("out")(out.reshape(n, t, d))


class Mlp(nn.Module):
    """The block's feed-forward network: ``fc2(act(fc1(x)))`` or SwiGLU ``w3(silu(a) * b)``."""

    hidden: int
    kind: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        dense = lambda f, name: nn.Dense(f, dtype=self.dtype, precision=HIGHEST, name=name)
        if self.kind == "swiglu":
            a, b = jnp.split(dense(2 * self.hidden, "w12")(x), 2, axis=-1)
            return dense(d, "w3")(nn.silu(a) * b)
        h = dense(self.hidden, "fc1")(x)
        h = nn.gelu(h, approximate=False) if self.kind == "gelu" else h * nn.sigmoid(1.702 * h)
        return dense(d, "fc2")(h)


class Block(nn.Module):
    """One pre-LN transformer block, with optional layer scale."""

    heads: int
    mlp_hidden: int
    mlp: str
    layer_scale: bool
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        norm = lambda name: nn.LayerNorm(self.eps, dtype=jnp.float32, name=name)
        scale = lambda name: (
            self.param(name, nn.initializers.ones, (d,), jnp.float32) if self.layer_scale else 1.0
        )
        x = x + scale("ls1") * Attention(self.heads, self.dtype, name="attn")(norm("norm1")(x))
        h = Mlp(self.mlp_hidden, self.mlp, self.dtype, name="mlp")(norm("norm2")(x))
        return x + scale("ls2") * h


class Encoder(nn.Module):
    """``depth`` blocks named ``block_0`` ... (no final norm: the towers place their own)."""

    depth: int
    heads: int
    mlp_hidden: int
    mlp: str
    layer_scale: bool
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        for i in range(self.depth):
            x = Block(self.heads, self.mlp_hidden, self.mlp, self.layer_scale, self.eps,
                      self.dtype, name=f"block_{i}")(x)
        return x


def patchify(x: jax.Array, patch: int, width: int, bias: bool, dtype: jnp.dtype) -> jax.Array:
    """Non-overlapping ``patch`` x ``patch`` convolution -> tokens ``[N, h*w, width]``.

    Call inside a compact module (the parameters are ``patch_embed``). Pixels
    beyond the last whole patch are ignored, as a stride-``patch`` VALID
    convolution (torch's ``Conv2d``) ignores them.
    """
    y = nn.Conv(width, (patch, patch), (patch, patch), padding="VALID", use_bias=bias,
                dtype=dtype, precision=HIGHEST, name="patch_embed")(x)
    return y.reshape(y.shape[0], -1, width)
