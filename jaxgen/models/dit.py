"""DiT: "Scalable Diffusion Models with Transformers" (Peebles & Xie, 2023).

A faithful Flax port of facebookresearch/DiT ``models.py``: patchify with a
learned ``p x p`` convolution, fixed 2-D sin-cos position embedding,
timestep embedder (256-d sinusoid → MLP), class embedder with a null class,
adaLN-Zero blocks and a zero-initialised final layer — so a fresh model
outputs exactly zero — and an optional learned-sigma output (2x channels).

Parameter counts equal the reference implementation's trainable parameters;
PyTorch's ``model.parameters()`` additionally counts the fixed position
embedding (``T x hidden``, stored there as a frozen ``nn.Parameter``): DiT-XL/2
has 674,834,720 trainable parameters here and 675,129,632 in PyTorch's count.

Usage::

    model = dit("DiT-S/2", num_classes=10, learn_sigma=False)
    variables = model.init(key, x, t, {"label": y})
    eps = model.apply(variables, x, t, {"label": y})       # model_fn contract
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.errors import InputError
from jaxgen.models.contract import Cond, check_inputs, split_cond, split_perturb
from jaxgen.models.layers import (
    Array,
    Attention,
    Dtype,
    LabelEmbedder,
    TimestepEmbedder,
    conv,
    dense,
    sincos_pos_embed_2d,
    zeros,
)

DIT_SIZES: dict[str, dict[str, int]] = {
    "S": dict(hidden=384, depth=12, num_heads=6),
    "B": dict(hidden=768, depth=12, num_heads=12),
    "L": dict(hidden=1024, depth=24, num_heads=16),
    "XL": dict(hidden=1152, depth=28, num_heads=16),
}
"""The paper's Table 1: hidden size, depth and heads of each named size."""

DIT_PATCHES = (2, 4, 8)

SCAN_AXIS = "layers"
"""Logical name of the stacked-block axis of ``scan_blocks=True`` (no mesh axis: replicated)."""

_PATCH_INIT = nn.initializers.variance_scaling(
    1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3
)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
    return x * (1 + scale[:, None]) + shift[:, None]


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
    # No affine parameters: adaLN supplies scale and shift (DiT uses eps 1e-6).
    return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=dtype, name=name)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (the paper's Figure 3)."""

    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array, perturb: Array | None = None) -> Array:
        """``x`` ``[B, T, D]`` tokens, ``c`` ``[B, D]`` conditioning → ``[B, T, D]``.

        ``perturb`` (``[B]`` bool): identity attention map for those samples (PAG).
        """
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = dense(6 * d, ("embed", "mlp"), kernel_init=zeros, name="adaLN", **kw)(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, -1)
        h = _modulate(_layer_norm(self.dtype, "norm1")(x), shift_msa, scale_msa)
        x = x + gate_msa[:, None] * Attention(self.num_heads, name="attn", **kw)(h, perturb)
        h = _modulate(_layer_norm(self.dtype, "norm2")(x), shift_mlp, scale_mlp)
        h = dense(int(d * self.mlp_ratio), ("embed", "mlp"), name="fc1", **kw)(h)
        h = dense(d, ("mlp", "embed"), name="fc2", **kw)(nn.gelu(h, approximate=True))
        return x + gate_mlp[:, None] * h


class DiT(nn.Module):
    """Diffusion Transformer over NHWC images or latents.

    Attributes:
      patch: patch size ``p``; height and width must be multiples of it.
      hidden: token width ``D``.
      depth: number of DiT blocks.
      num_heads: attention heads.
      mlp_ratio: MLP width over ``D``.
      num_classes: classes for conditioning (0: unconditional); the
        embedding table has one more row, the null class ``num_classes``.
      class_dropout: probability of replacing a label by the null class in
        training (classifier-free guidance); the paper uses 0.1.
      learn_sigma: output ``2C`` channels (prediction, then ADM's variance
        interpolation ``v``) instead of ``C``.
      out_channels: output channels before ``learn_sigma`` doubling; default:
        the input's.
      dtype: compute dtype (``jnp.bfloat16`` for mixed precision: parameters
        stay in ``param_dtype``, normalisation statistics and the output in
        float32).
      param_dtype: parameter dtype.
      remat: recompute each block's activations in the backward pass
        (``nn.remat``) instead of storing them: activation memory of one block
        instead of ``depth``, for about one more forward pass of compute. The
        parameter tree and the outputs are those of the plain model.
      pag_layers: blocks (0-based) whose attention map becomes the identity for the
        samples where ``cond["perturb_attention"]`` is true (perturbed-attention
        guidance, Ahn et al. 2024); ``None``: the middle block, ``depth // 2``.
      scan_blocks: run the blocks as one ``nn.scan`` over a stacked block, so
        XLA compiles one block instead of ``depth``. The parameters then live
        under ``"blocks"`` with a leading ``depth`` axis (logical axis name
        ``"layers"``, replicated) instead of ``"block0"`` ... ``"block{depth-1}"``;
        :func:`stack_blocks` and :func:`unstack_blocks` convert between the two
        layouts (the outputs are the same for converted parameters).
    """

    patch: int = 2
    hidden: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout: float = 0.1
    learn_sigma: bool = True
    out_channels: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    scan_blocks: bool = False
    pag_layers: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, x: Array, t: Array, cond: Cond = None, *, train: bool = False,
                 return_hidden: int | None = None, fill_cache: bool = False,
                 cache: Array | None = None) -> Array | tuple[Array, Array]:
        """Predict from noisy ``x`` ``[B, H, W, C]`` at times ``t`` ``[B]``.

        Args:
          x: NHWC float input; ``H`` and ``W`` multiples of ``patch``.
          t: ``[B]`` (or scalar) time / noise level, embedded as given.
          cond: ``None`` or ``{"label": [B] int}``; missing labels mean the
            null class.
          train: training mode (label dropout; needs the ``dropout`` RNG).
          return_hidden: also return the tokens ``[B, T, hidden]`` after block
            ``return_hidden`` (1-based; REPA aligns them, Yu et al. 2025). The
            prediction is the same either way.
          fill_cache: also return the features FORA reuses (Selvaraju et al. 2024):
            the sum of every block's attention and MLP outputs, ``[B, T, hidden]``.
            A reused output does not depend on the block's input, so reusing all
            of them adds their sum to the tokens: one array instead of ``2 depth``.
          cache: those features from an earlier call: the blocks are skipped and
            the features added (the cheap call of FORA; the prediction changes).

        Returns:
          ``[B, H, W, C']`` float32, ``C' = (out_channels or C) * (2 if learn_sigma else 1)``;
          with ``return_hidden``, the pair ``(prediction, tokens)``; with
          ``fill_cache``, ``(prediction, features)``.
        """
        t = check_inputs(x, t)
        if return_hidden is not None and (fill_cache or cache is not None):
            raise InputError("DiT return_hidden does not combine with fill_cache or cache.")
        b, height, width, channels = x.shape
        p = self.patch
        if height % p or width % p:
            raise InputError(
                f"DiT with patch {p} needs height and width divisible by {p}, got "
                f"{height}x{width}; crop or pad the input, or pick a patch that divides both."
            )
        gh, gw = height // p, width // p
        out_ch = (self.out_channels or channels) * (2 if self.learn_sigma else 1)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        # Patchify: a p x p stride-p convolution, i.e. a linear map of each patch,
        # initialised as DiT does: Xavier-uniform of the [p*p*C, D] matrix.
        h = conv(self.hidden, ("channels", "embed"), kernel=p, stride=p, padding="VALID",
                 kernel_init=_PATCH_INIT, name="patch_embed", **kw)(x.astype(self.dtype))
        h = h.reshape(b, gh * gw, self.hidden) + sincos_pos_embed_2d(self.hidden, gh, gw)
        h = h.astype(self.dtype)

        c = TimestepEmbedder(self.hidden, kernel_init=nn.initializers.normal(0.02),
                             name="t_embedder", **kw)(t)
        cond, perturb = split_perturb(cond, b)
        label = split_cond(cond, self.num_classes, b)
        if label is not None:
            c = c + LabelEmbedder(self.num_classes, self.hidden, self.class_dropout,
                                  name="y_embedder", **kw)(label, train)

        if cache is None:
            h_in = h
            h, hidden = self._blocks(h, c, return_hidden, self._pag_flags(perturb))
            features = h - h_in if fill_cache else None
        else:
            h, hidden = h + cache.astype(h.dtype), None

        shift, scale = jnp.split(
            dense(2 * self.hidden, ("embed", "mlp"), kernel_init=zeros, name="final_adaLN", **kw)(
                nn.silu(c)
            ),
            2,
            -1,
        )
        h = _modulate(_layer_norm(self.dtype, "final_norm")(h), shift, scale)
        h = dense(p * p * out_ch, ("embed", "channels"), kernel_init=zeros, name="final", **kw)(h)
        # Unpatchify: token (i, j) holds the p x p x C' patch at rows i*p.., columns j*p...
        h = h.reshape(b, gh, gw, p, p, out_ch).transpose(0, 1, 3, 2, 4, 5)
        out = h.reshape(b, height, width, out_ch).astype(jnp.float32)
        if fill_cache:
            return out, features
        return out if return_hidden is None else (out, hidden)

    def _pag_flags(self, perturb: Array | None) -> Array | None:
        """``[depth, B]``: which samples take the identity attention map in each block (PAG)."""
        if perturb is None:
            return None
        layers = (self.depth // 2,) if self.pag_layers is None else self.pag_layers
        if not all(0 <= i < self.depth for i in layers):
            raise InputError(f"pag_layers={layers}: blocks are numbered 0..{self.depth - 1}.")
        on = jnp.asarray([i in layers for i in range(self.depth)])
        return on[:, None] & perturb[None, :]

    def _blocks(
        self, h: Array, c: Array, keep: int | None, flags: Array | None = None
    ) -> tuple[Array, Array | None]:
        """The blocks' output and, for a 1-based ``keep``, the tokens after block ``keep``.

        ``flags``: ``[depth, B]`` PAG switches (:meth:`_pag_flags`) or ``None``.
        """
        if keep is not None and not 1 <= keep <= self.depth:
            raise InputError(f"return_hidden={keep}: give a block in 1..{self.depth}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # Inside a scan the loop already keeps XLA from merging the recomputation
        # with the forward pass, so remat's own CSE barrier is not needed there.
        block = nn.remat(DiTBlock, prevent_cse=not self.scan_blocks) if self.remat else DiTBlock
        if not self.scan_blocks:
            hidden = None
            for i in range(self.depth):
                flag = None if flags is None else flags[i]
                h = block(self.num_heads, self.mlp_ratio, name=f"block{i}", **kw)(h, c, flag)
                hidden = h if i + 1 == keep else hidden
            return h, hidden

        def body(module, carry, c, flag=None):  # with keep, every block's output: [depth, ...]
            y = module(carry, c, flag)
            return y, (y if keep is not None else None)

        scan = nn.scan(
            body,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast if flags is None else (nn.broadcast, 0),
            length=self.depth,
            metadata_params={nn.PARTITION_NAME: SCAN_AXIS},
        )
        xs = (c,) if flags is None else (c, flags)
        h, ys = scan(block(self.num_heads, self.mlp_ratio, name="blocks", **kw), h, *xs)
        return h, (None if keep is None else ys[keep - 1])


def stack_blocks(params: Mapping[str, Any], depth: int) -> dict[str, Any]:
    """Per-block DiT parameters (``block0`` ...) → the stacked layout of ``scan_blocks=True``.

    Args:
      params: ``variables["params"]`` of a ``DiT`` with ``scan_blocks=False``
        (unboxed arrays, e.g. after ``nn.unbox`` or loaded from a checkpoint).
      depth: number of blocks.

    Returns:
      The same parameters with ``block0`` ... ``block{depth-1}`` replaced by one
      ``blocks`` subtree whose leaves carry a leading ``depth`` axis.

    Raises:
      InputError: a block is missing or the blocks differ in structure.
    """
    names = [f"block{i}" for i in range(depth)]
    missing = [n for n in names if n not in params]
    if missing or "blocks" in params:
        raise InputError(
            f"stack_blocks needs per-block DiT parameters block0..block{depth - 1}; "
            f"missing {missing}{' and found stacked blocks' if 'blocks' in params else ''}. "
            "Pass the params of a DiT built with scan_blocks=False and its depth."
        )
    out = {k: v for k, v in params.items() if k not in names}
    try:
        out["blocks"] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(params[n] for n in names))
    except ValueError as e:
        raise InputError(f"stack_blocks: the DiT blocks differ in structure ({e}).") from e
    return out


def unstack_blocks(params: Mapping[str, Any]) -> dict[str, Any]:
    """The stacked layout of ``scan_blocks=True`` → per-block parameters ``block0`` ....

    The inverse of :func:`stack_blocks`; the depth is the leading axis of the
    stacked leaves.

    Raises:
      InputError: ``params`` has no ``blocks`` subtree.
    """
    if "blocks" not in params:
        raise InputError(
            "unstack_blocks needs the params of a DiT built with scan_blocks=True "
            f"(a 'blocks' subtree); got top-level keys {sorted(params)}."
        )
    out = {k: v for k, v in params.items() if k != "blocks"}
    depth = jax.tree.leaves(params["blocks"])[0].shape[0]
    for i in range(depth):
        out[f"block{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], params["blocks"])
    return out


def dit(name: str, **overrides: Any) -> DiT:
    """A DiT of a named size, e.g. ``dit("DiT-XL/2")`` or ``dit("S/4", num_classes=10)``.

    Sizes S, B, L, XL (:data:`DIT_SIZES`) with patch 2, 4 or 8; other fields
    default to the paper's ImageNet setting (1000 classes, class dropout 0.1,
    learned sigma) and can be overridden by keyword.

    Raises:
      InputError: for an unknown name.
    """
    size, _, patch = name.removeprefix("DiT-").partition("/")
    if size not in DIT_SIZES or not patch.isdigit() or int(patch) not in DIT_PATCHES:
        names = [f"DiT-{s}/{p}" for s in DIT_SIZES for p in DIT_PATCHES]
        raise InputError(f"unknown DiT {name!r}; expected one of {names}.")
    return DiT(**{"patch": int(patch), **DIT_SIZES[size], **overrides})  # patch overridable
