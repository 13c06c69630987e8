"""Sharding model parameters by their logical axis names (see :mod:`jaxgen.models.layers`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
from jax.sharding import Mesh

LOGICAL_AXIS_RULES: tuple[tuple[str, str], ...] = (
    ("embed", "fsdp"),
    ("mlp", "fsdp"),
    ("conv_in", "fsdp"),
)
"""Logical axis → mesh axis, by priority; a mesh axis is used once per array."""


def param_shardings(variables: Any, mesh: Mesh, rules: Sequence = LOGICAL_AXIS_RULES) -> Any:
    """``NamedSharding`` for every variable, from its logical axes and ``rules``.

    Pass the result as ``out_shardings`` of a jitted ``module.init`` (and
    ``nn.unbox`` afterwards) to create parameters already sharded over the
    ``fsdp`` axis of ``mesh``.

    Args:
      variables: boxed variables, real or from
        :func:`jaxgen.models.inspection.abstract_init`.
      mesh: a mesh with the mesh axes named in ``rules``.
      rules: ``(logical name, mesh axis)`` pairs, by priority.
    """
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh, tuple(rules))
