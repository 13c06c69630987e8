"""Device meshes, multi-host start-up and batch sharding helpers.

jaxgen parallelises with ``jax.jit`` over a :class:`jax.sharding.Mesh` and
``NamedSharding`` (no ``pmap``). The batch dimension is split over the
``data`` axis; an optional ``fsdp`` axis shards parameters (see ``train``).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxgen.errors import InputError

DATA_AXIS = "data"


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Start JAX's multi-controller runtime when more than one process is asked for.

    In order:

    - a coordinator or process count (arguments, else ``JAXGEN_COORDINATOR``,
      ``JAXGEN_NUM_PROCESSES``, ``JAXGEN_PROCESS_ID``) starts it with those values;
    - ``JAXGEN_DISTRIBUTED=1`` starts it with no arguments, so JAX detects the cluster
      itself: a Cloud TPU pod slice (from the VM metadata), SLURM, Open MPI, ...
      ``tpu/launch.sh`` sets it, since ``TPU_WORKER_HOSTNAMES`` is usually not in a TPU
      VM's environment; ``JAXGEN_DISTRIBUTED=0`` keeps the run single-process even
      inside a cluster;
    - with ``JAXGEN_DISTRIBUTED`` unset, ``TPU_WORKER_HOSTNAMES`` or ``SLURM_JOB_ID`` in
      the environment does the same as ``1``;
    - otherwise this is a no-op and the run stays single-process.

    Raises:
      InputError: ``JAXGEN_DISTRIBUTED`` is neither ``0`` nor ``1``.
    """
    coordinator = coordinator or os.environ.get("JAXGEN_COORDINATOR")
    if num_processes is None and "JAXGEN_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAXGEN_NUM_PROCESSES"])
    if process_id is None and "JAXGEN_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAXGEN_PROCESS_ID"])
    if coordinator is None and num_processes is None:
        switch = os.environ.get("JAXGEN_DISTRIBUTED", "")
        if switch not in ("", "0", "1"):
            raise InputError(f"JAXGEN_DISTRIBUTED={switch!r}: set it to 1 (on) or 0 (off).")
        detected = bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("SLURM_JOB_ID"))
        if switch == "1" or (switch == "" and detected):
            jax.distributed.initialize()  # JAX reads the cluster's own environment
        return
    # CPU collectives across processes need gloo (the default has none); the option only
    # affects the CPU backend. (Asking jax.default_backend() here would start the backends,
    # after which jax.distributed.initialize refuses to run.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def make_mesh(
    devices: list[jax.Device] | None = None,
    fsdp: int = 1,
) -> Mesh:
    """A 2-D mesh ``(data, fsdp)`` over ``devices`` (default: all devices, all hosts).

    Args:
      devices: devices to use, in order; default ``jax.devices()``.
      fsdp: size of the ``fsdp`` axis; must divide the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise InputError(
            f"fsdp={fsdp} must be >= 1 and divide the number of devices ({len(devices)})."
        )
    grid = np.asarray(devices, dtype=object).reshape(len(devices) // fsdp, fsdp)
    return Mesh(grid, (DATA_AXIS, "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of an array whose leading (batch) axis is split over every mesh axis."""
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of an array held whole on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def pad_batch(tree: Any, multiple: int) -> tuple[Any, int]:
    """Pad the leading axis of every leaf up to a multiple of ``multiple`` by repeating row 0.

    The one row-padding helper: leaves may be NumPy or JAX arrays (each keeps
    its kind). Returns the padded tree and the number of real rows, so that
    callers drop the padding after the computation (no real row is dropped).
    """
    leaves = jax.tree.leaves(tree)
    n = leaves[0].shape[0]
    pad = (-n) % multiple

    def grow(a):
        xp = np if isinstance(a, np.ndarray) else jnp
        return xp.concatenate([a, xp.repeat(a[:1], pad, axis=0)], axis=0)

    return (tree if pad == 0 else jax.tree.map(grow, tree)), n


def to_host(x: jax.Array) -> np.ndarray:
    """``x`` as a NumPy array on every process (gathered across processes when sharded)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
