"""Layers shared by the DiT and the U-Net, and tools to inspect any Flax model.

Every parameter carries logical axis names (``nn.with_logical_partitioning``)
so that training can shard weights over an ``fsdp`` mesh axis without
touching the model code. The names are:

- ``embed``: a layer's output width (DiT hidden size, U-Net channels);
- ``mlp``: a wide or inner width (DiT MLP/QKV/adaLN, U-Net time embedding);
- ``conv_in``: a U-Net convolution's input channels;
- ``channels``, ``vocab``, ``freq``, ``kernel_h``, ``kernel_w``, ``norm``:
  small or oddly sized dimensions that stay replicated.

:data:`LOGICAL_AXIS_RULES` maps them onto the ``fsdp`` axis of
:func:`jaxgen.parallel.make_mesh`; :func:`param_shardings` turns abstract
variables into ``NamedSharding``s with those rules.

Modules take ``dtype`` (the compute dtype, e.g. ``jnp.bfloat16``) apart from
``param_dtype`` (the storage dtype of parameters, normally ``float32``).
Normalisation statistics, the sinusoidal embeddings and the final output are
kept in ``float32``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxgen.errors import InputError

Dtype = Any
Array = jax.Array
Cond = Mapping[str, Array] | None
ModelFn = Callable[[Any, Array, Array, Cond], Array]  # model_fn(params, x_t, t, cond)

LOGICAL_AXIS_RULES: tuple[tuple[str, str], ...] = (
    ("embed", "fsdp"),
    ("mlp", "fsdp"),
    ("conv_in", "fsdp"),
)
"""Logical axis → mesh axis, by priority; a mesh axis is used once per array."""

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
    flash attention on GPU for bf16/fp16).
    """

    num_heads: int
    zero_out: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``[B, T, C]`` → ``[B, T, C]``."""
        b, n, c = x.shape
        if c % self.num_heads:
            raise InputError(f"attention width {c} is not divisible by num_heads={self.num_heads}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = dense(3 * c, ("embed", "mlp"), name="qkv", **kw)(x)
        q, k, v = jnp.split(qkv.reshape(b, n, 3 * self.num_heads, c // self.num_heads), 3, axis=2)
        h = jax.nn.dot_product_attention(q, k, v).reshape(b, n, c)
        out_init = zeros if self.zero_out else xavier_uniform
        return dense(c, ("mlp", "embed"), kernel_init=out_init, name="proj", **kw)(h)


def split_cond(cond: Cond, num_classes: int, batch: int) -> Array | None:
    """The class labels of a ``cond`` dict, checked; the null class where none are given.

    Args:
      cond: ``None`` or a dict whose only key is ``"label"`` (``[B]`` ints in
        ``[0, num_classes]``; ``num_classes`` is the null class).
      num_classes: classes of the model; 0 for an unconditional model.
      batch: batch size, to build the all-null labels.

    Returns:
      ``[B]`` int32 labels, or ``None`` for an unconditional model.
    """
    cond = dict(cond or {})
    label = cond.pop("label", None)
    if cond:
        raise InputError(f"cond has unknown keys {sorted(cond)}; models accept only 'label'.")
    if num_classes == 0:
        if label is not None:
            raise InputError(
                "cond['label'] was given to a model built with num_classes=0; "
                "build it with num_classes > 0 for class conditioning."
            )
        return None
    if label is None:
        return jnp.full((batch,), num_classes, jnp.int32)
    label = jnp.asarray(label)
    if label.shape != (batch,) or not jnp.issubdtype(label.dtype, jnp.integer):
        raise InputError(
            f"cond['label'] must be an int array of shape ({batch},), "
            f"got {label.dtype}{label.shape}."
        )
    return label.astype(jnp.int32)


def check_inputs(x: Array, t: Array) -> Array:
    """Check ``x`` is NHWC float and return ``t`` as a float ``[B]`` array (scalars broadcast)."""
    if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputError(f"x must be a float NHWC array [B, H, W, C], got {x.dtype}{x.shape}.")
    t = jnp.asarray(t, jnp.float32)
    if t.ndim == 0:
        t = jnp.broadcast_to(t, x.shape[:1])
    if t.shape != x.shape[:1]:
        raise InputError(f"t must be a scalar or have shape ({x.shape[0]},), got {t.shape}.")
    return t


def as_model_fn(
    module: nn.Module,
    *,
    train: bool = False,
    rngs: Mapping[str, Array] | None = None,
) -> ModelFn:
    """A jaxgen model as ``model_fn(params, x_t, t, cond) -> prediction``.

    ``module.apply({"params": params}, x_t, t, cond, train=train, rngs=rngs)``,
    keeping, for a model with a learned variance (``learn_sigma=True``), only
    the prediction channels (the first ``C`` of ``2C``), which is what losses
    and samplers expect. The weights stay an argument: under ``jit`` they are
    traced, never baked into the program, so one compilation serves every
    checkpoint. Build the function once and reuse it (compiled samplers are
    cached on its identity).

    Args:
      module: a :class:`~jaxgen.models.DiT`, :class:`~jaxgen.models.UNet`, or
        any module with that call signature.
      train: training mode (dropout, label dropout); needs ``rngs={"dropout": key}``.
      rngs: RNG streams for training mode.

    Returns:
      ``model_fn(params, x_t [B,H,W,C] float, t [B] float, cond dict or None)``.
    """
    learn_sigma = getattr(module, "learn_sigma", False)

    def model_fn(params: Any, x_t: Array, t: Array, cond: Cond = None) -> Array:
        out = module.apply({"params": params}, x_t, t, cond, train=train, rngs=rngs)
        return out[..., : x_t.shape[-1]] if learn_sigma else out

    return model_fn


def _leaves_with_axes(tree: Any) -> list[tuple[str, Any, tuple | None]]:
    """``(path, unboxed leaf, logical axes or None)`` for every parameter of ``tree``."""
    is_box = lambda x: isinstance(x, nn.Partitioned)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)
    rows = []
    for path, leaf in flat:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        axes = tuple(leaf.names) if is_box(leaf) else None
        rows.append((name, leaf.value if is_box(leaf) else leaf, axes))
    return rows


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of (possibly boxed or abstract) parameters."""
    return sum(int(np.prod(leaf.shape)) for _, leaf, _ in _leaves_with_axes(tree))


def param_table(tree: Any, depth: int | None = None) -> str:
    """A text table of parameters: name, shape, dtype, logical axes, count; total last.

    Works on real, boxed (``nn.Partitioned``) or abstract (``jax.eval_shape``)
    parameters, so the table of a 675M-parameter model costs no memory.

    Args:
      tree: parameters, e.g. ``variables["params"]``.
      depth: if given, aggregate rows by the first ``depth`` path components
        (e.g. ``depth=1`` gives one row per top-level module).

    Returns:
      The table as a string; ``print`` it.
    """
    rows = _leaves_with_axes(tree)
    if depth is not None:
        grouped: dict[str, int] = {}
        for name, leaf, _ in rows:
            key = "/".join(name.split("/")[:depth])
            grouped[key] = grouped.get(key, 0) + int(np.prod(leaf.shape))
        lines = [(k, "", "", "", f"{v:,}") for k, v in grouped.items()]
    else:
        lines = [
            (name, str(tuple(leaf.shape)), str(np.dtype(leaf.dtype)), str(axes or ""),
             f"{int(np.prod(leaf.shape)):,}")
            for name, leaf, axes in rows
        ]
    lines.append(("total", "", "", "", f"{count_params(tree):,}"))
    header = ("name", "shape", "dtype", "logical axes", "params")
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(5)]
    fmt = lambda r: "  ".join(
        c.rjust(w) if i == 4 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
    ).rstrip()
    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, lines[:-1]), rule, fmt(lines[-1])])


def abstract_init(module: nn.Module, x: Any, t: Any, cond: Cond = None) -> Any:
    """Shapes and dtypes of ``module``'s variables for inputs like ``x, t, cond``, no memory used.

    ``x``, ``t`` and the values of ``cond`` may be arrays or ``jax.ShapeDtypeStruct``.
    """
    keys = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return jax.eval_shape(lambda k, x, t, c: module.init(k, x, t, c), keys, x, t, cond)


def forward_flops(module: nn.Module, x: Any, t: Any, cond: Cond = None) -> float:
    """FLOPs of one forward pass over the batch ``x``, from XLA's cost analysis.

    The model is lowered on abstract shapes (nothing is allocated) and the
    count is read from the lowered HLO, before backend-specific fusion. XLA
    counts a multiply-add as 2 FLOPs; papers that quote "GFLOPs" from fvcore
    (e.g. DiT) count it as 1, so divide by 2 to compare.

    Args:
      module: the model.
      x: ``[B, H, W, C]`` array or ``jax.ShapeDtypeStruct``.
      t: ``[B]`` array or ``jax.ShapeDtypeStruct``.
      cond: ``None`` or a dict of arrays / ``ShapeDtypeStruct``s.

    Returns:
      FLOPs of the whole batch (divide by ``B`` for per-image).
    """
    variables = abstract_init(module, x, t, cond)
    lowered = jax.jit(module.apply).lower(variables, x, t, cond)
    cost = lowered.cost_analysis()
    if isinstance(cost, Sequence):  # older JAX returned one dict per computation
        cost = cost[0]
    return float(cost["flops"])


def param_shardings(variables: Any, mesh: Mesh, rules: Sequence = LOGICAL_AXIS_RULES) -> Any:
    """``NamedSharding`` for every variable, from its logical axes and ``rules``.

    Pass the result as ``out_shardings`` of a jitted ``module.init`` (and
    ``nn.unbox`` afterwards) to create parameters already sharded over the
    ``fsdp`` axis of ``mesh``.

    Args:
      variables: boxed variables, real or from :func:`abstract_init`.
      mesh: a mesh with the mesh axes named in ``rules``.
      rules: ``(logical name, mesh axis)`` pairs, by priority.
    """
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh, tuple(rules))
