"""Inspecting any Flax model without allocating it: parameter counts and tables, FLOPs.

Every tool works on real, boxed (``nn.Partitioned``) or abstract
(``jax.eval_shape``) variables; :func:`abstract_init` gives the latter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.models.contract import Cond


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
