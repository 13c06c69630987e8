"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs", sec. 4).

KID is the unbiased estimator of MMD^2 (Gretton et al. 2012, eq. 3) with
the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over
random subsets of both feature sets. Subsets are drawn exactly as
torch-fidelity's ``kid_features_to_metric`` draws them, so the same seed
gives the same subsets as that tool.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from jaxgen.errors import InputError
from jaxgen.metrics import defaults
from jaxgen.metrics._common import as_feature_pair, local_mesh
from jaxgen.parallel import batch_sharding, pad_batch, replicated


def _kernel_minus_one(a: jax.Array, b: jax.Array) -> jax.Array:
    # (t + 1)^3 - 1 written as t (t (t + 3) + 3): the constant 1 cancels exactly in MMD^2
    # (it contributes +1 + 1 - 2), and leaving it out keeps the float32 sums smaller.
    t = jnp.dot(a, b.T, precision=lax.Precision.HIGHEST) / a.shape[1]
    return t * (t * (t + 3.0) + 3.0)


@functools.partial(jax.jit, static_argnames="mesh")
def _kernel_row_sums(f_real, f_fake, idx_real, idx_fake, *, mesh: Mesh) -> jax.Array:
    """Per-row sums ``[S, 3, m]`` of K_xx - 1 (diagonal dropped), K_yy - 1 (same), K_xy - 1."""
    axes = PartitionSpec(mesh.axis_names)

    def per_device(f_real, f_fake, idx_real, idx_fake):
        def one_subset(idx):
            x, y = f_real[idx[0]], f_fake[idx[1]]
            off_diag = ~jnp.eye(x.shape[0], dtype=bool)
            k_xx = jnp.where(off_diag, _kernel_minus_one(x, x), 0.0)
            k_yy = jnp.where(off_diag, _kernel_minus_one(y, y), 0.0)
            k_xy = _kernel_minus_one(x, y)
            return jnp.stack([k_xx.sum(1), k_yy.sum(1), k_xy.sum(1)])

        return lax.map(one_subset, (idx_real, idx_fake))

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec(), axes, axes),
        out_specs=axes,
    )(f_real, f_fake, idx_real, idx_fake)


def kid(
    f_real: np.ndarray,
    f_fake: np.ndarray,
    subsets: int = defaults.KID_SUBSETS,
    subset_size: int = defaults.KID_SUBSET_SIZE,
    seed: int = defaults.SEED,
    *,
    mesh: Mesh | None = None,
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and (population) std of MMD^2 over random subsets.

    For each subset ``s``, ``np.random.RandomState(seed)`` draws ``m =
    subset_size`` distinct rows of ``f_real``, then ``m`` distinct rows of
    ``f_fake`` (``choice(n, m, replace=False)``), and

        MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1))
                + sum_{i != j} k(y_i, y_j) / (m (m - 1))
                - 2 sum_{i, j} k(x_i, y_j) / m^2.

    Kernel matrices are float32 matmuls at ``precision=HIGHEST`` on device,
    reduced to row sums there; the row sums are added up in float64 on the
    host. The subsets are spread over the devices of ``mesh``; the result
    depends on ``seed`` only, not on the device count. MMD^2 is symmetric
    in the two sets, so ``kid(a, b, seed=s)`` reproduces torch-fidelity's
    KID with ``input1`` features ``a``, ``input2`` features ``b`` and
    ``rng_seed=s`` (its default is 2020), up to float32 rounding.

    Args:
      f_real: ``[N_real, D]`` features of real images.
      f_fake: ``[N_fake, D]`` features of generated images.
      subsets: number of subsets.
      subset_size: rows per subset, ``2 <= subset_size <= min(N_real, N_fake)``.
      seed: seed of the subset draws.
      mesh: devices to spread the subsets over; default all local devices.

    Returns:
      ``(mean, std)`` of the per-subset MMD^2.

    Raises:
      InputError: for feature arrays that are not ``[N, D]``, differ in D or
        are not finite; ``subsets < 1``; a ``subset_size`` outside the range above.
    """
    f_real, f_fake = as_feature_pair(f_real, f_fake)
    n_real, n_fake = f_real.shape[0], f_fake.shape[0]
    if subsets < 1:
        raise InputError(f"kid: subsets={subsets} must be >= 1.")
    if not 2 <= subset_size <= min(n_real, n_fake):
        raise InputError(
            f"kid: subset_size={subset_size} must be between 2 and the size of the smaller set "
            f"(f_real: {n_real}, f_fake: {n_fake}); pass a smaller subset_size or more samples."
        )
    rng = np.random.RandomState(seed)
    idx = np.empty((subsets, 2, subset_size), np.int32)
    for s in range(subsets):
        idx[s, 0] = rng.choice(n_real, subset_size, replace=False)
        idx[s, 1] = rng.choice(n_fake, subset_size, replace=False)

    mesh = local_mesh(mesh)
    idx, _ = pad_batch(idx, mesh.size)  # padded subsets repeat subset 0 and are dropped below
    rows = _kernel_row_sums(
        jax.device_put(f_real, replicated(mesh)),
        jax.device_put(f_fake, replicated(mesh)),
        jax.device_put(idx[:, 0], batch_sharding(mesh)),
        jax.device_put(idx[:, 1], batch_sharding(mesh)),
        mesh=mesh,
    )
    sums = np.asarray(rows, np.float64)[:subsets].sum(axis=2)  # [S, 3]
    m = subset_size
    mmd2 = (sums[:, 0] + sums[:, 1]) / (m * (m - 1)) - 2.0 * sums[:, 2] / (m * m)
    return float(mmd2.mean()), float(mmd2.std())
