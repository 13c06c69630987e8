"""k-NN manifold metrics: precision and recall, density and coverage.

Precision and recall: Kynkäänniemi et al. 2019, "Improved Precision and
Recall Metric for Assessing Generative Models", eq. 1-3. Density and
coverage: Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for
Generative Models", eq. 4-5. With ``NND_k(x)`` the distance from ``x`` to its
k-th nearest other point of the same set, real ``X_i`` (N of them) and fake
``Y_j`` (M):

    precision = 1/M sum_j 1[exists i: |X_i - Y_j| < NND_k(X_i)]
    recall    = 1/N sum_i 1[exists j: |X_i - Y_j| < NND_k(Y_j)]
    density   = 1/(kM) sum_j sum_i 1[|X_i - Y_j| < NND_k(X_i)]
    coverage  = 1/N sum_i 1[min_j |X_i - Y_j| < NND_k(X_i)]

The comparisons are strict, as in the reference code of Naeem et al.
(clovaai/generative-evaluation-prdc); Kynkäänniemi et al.'s code uses ``<=``
for precision and recall, which differs only for exact ties (duplicated
feature vectors).

All pairwise distances are computed on device, ``block x block`` tiles at a
time, so memory is O(N D + block^2), never O(N^2). Two kinds of pass:

* k-NN radii of a set against itself visit only the tiles (I, J) with
  I <= J; each tile updates a running top-k of its rows and of its columns
  (d is symmetric), halving the work of a full pass. Tiles are dealt to the
  devices round-robin, each keeps a top-k of every row, and the per-device
  top-k lists are merged at the end.
* The real-vs-fake pass shards the fake rows over the devices; each device
  sweeps all real tiles and reduces its per-real flags with ``psum``.

Numerics. Distances use d^2 = |x|^2 + |y|^2 - 2 x.y with a float32 matmul at
``precision=HIGHEST`` (full float32 on GPU/TPU too) on features centred on
the mean of both sets (translation leaves distances unchanged and shrinks
|x|^2, hence the rounding). A float32 dot product of length D errs by at
most gamma_D |x||y| with gamma_D = D u / (1 - D u), u = 2^-24 (Higham,
"Accuracy and Stability of Numerical Algorithms", eq. 3.5), so every
computed d^2 is within Delta = 4 gamma_{D+2} max|x|^2 of the exact one, and
so is every radius^2 (an order statistic moves no more than the values it
is taken from). A comparison ``d^2 < r^2`` can therefore differ from exact
arithmetic only for pairs whose exact d^2 lies within 2 Delta of the radius^2;
each such pair moves one count by at most 1/M or 1/N (1/(kM) for
density). The bound is worst-case (typical errors are ~sqrt(D) u |x||y|),
and such near-ties have probability ~0 for continuous features.

Exact ties do occur: a fake sample that copies a real one (memorisation),
or identical sets, puts fake points exactly on real k-NN radii. Every pass
uses one tile shape and the norms are computed once, so a pair of vectors
gets the same computed d^2 in whichever tile, row or column it falls: a
GEMM sums every output over D in the same order, and x.y = y.x product by
product. Those ties are then decided as in exact arithmetic (outside the
strict ball), on any mesh and block size; the tests check this against
float64. The centre is the mean rounded to 8 bits below its largest
coordinate: as good as the mean for rounding, and features on a coarse grid
(small integers) stay exact, so the tests can demand the counts of a
float64 reference exactly. Each device computes each tile with the same
shapes, so results do not depend on the device count; another block size
changes which tile computes a distance, so at most the rounding above.
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

DEFAULT_BLOCK = 2048


def _sq_dist(x: jax.Array, sq_x: jax.Array, y: jax.Array, sq_y: jax.Array) -> jax.Array:
    """``[Bx, By]`` squared distances, clamped at 0 (rounding can make them slightly negative)."""
    xy = jnp.dot(x, y.T, precision=lax.Precision.HIGHEST)
    return jnp.maximum(sq_x[:, None] + sq_y[None, :] - 2.0 * xy, 0.0)


def _smallest(d2: jax.Array, k: int) -> jax.Array:
    """The ``k`` smallest entries of each row, ascending."""
    return -lax.top_k(-d2, k)[0]


@functools.partial(jax.jit, static_argnames=("n", "k", "block", "mesh"))
def _knn_sq(x, sq, pairs, *, n: int, k: int, block: int, mesh: Mesh) -> jax.Array:
    """``[Np, k]``: squared distances from each row of ``x`` to its k nearest other rows."""
    axes = mesh.axis_names

    def per_device(x, sq, pairs):
        npad = x.shape[0]
        offs = jnp.arange(block)

        def merge(state, start, d2):
            cur = lax.dynamic_slice_in_dim(state, start, block)
            new = _smallest(jnp.concatenate([cur, d2], axis=1), k)
            return lax.dynamic_update_slice_in_dim(state, new, start, 0)

        def tile(state, pair):
            i, j, valid = pair[0] * block, pair[1] * block, pair[2]
            rows, cols = i + offs, j + offs
            d2 = _sq_dist(
                lax.dynamic_slice_in_dim(x, i, block),
                lax.dynamic_slice_in_dim(sq, i, block),
                lax.dynamic_slice_in_dim(x, j, block),
                lax.dynamic_slice_in_dim(sq, j, block),
            )
            # A point is not its own neighbour; padding rows and dummy tiles count for nothing.
            drop = (
                (rows[:, None] == cols[None, :])
                | (rows[:, None] >= n)
                | (cols[None, :] >= n)
                | (valid == 0)
            )
            d2 = jnp.where(drop, jnp.inf, d2)
            state = merge(state, i, d2)
            # Tile (I, J) also holds the distances of J's rows to I's; a diagonal tile
            # already gave every pair to its rows.
            return merge(state, j, jnp.where(i == j, jnp.inf, d2.T)), None

        state, _ = lax.scan(tile, jnp.full((npad, k), jnp.inf, jnp.float32), pairs)
        every = lax.all_gather(state, axes, axis=1, tiled=True)  # [Np, devices * k]
        return _smallest(every, k)

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec(axes)),
        out_specs=PartitionSpec(),
        check_vma=False,
    )(x, sq, pairs)


def _tile_size(n: int, block: int) -> int:
    """The smallest multiple of 32 that covers ``n`` rows in as many tiles as ``block`` would."""
    tiles = -(-n // block)
    return -(-n // (32 * tiles)) * 32


def _sq_norms(x: np.ndarray) -> np.ndarray:
    """|x|^2 per row: float32 squares are exact in float64, so this is |x|^2 rounded once."""
    return np.concatenate(
        [np.square(c, dtype=np.float64).sum(1) for c in np.array_split(x, -(-len(x) // 4096))]
    ).astype(np.float32)


def _knn_radii_sq(x: jax.Array, sq: jax.Array, n: int, k: int, block: int, mesh: Mesh):
    """``[n, k]`` squared distances to the 1st..k-th nearest other row of the first ``n`` rows.

    ``x`` and ``sq`` are replicated over ``mesh`` and padded to a multiple of ``block`` rows.
    """
    nb = -(-n // block)
    pairs = np.asarray([(i, j, 1) for i in range(nb) for j in range(i, nb)], np.int32)
    per = -(-len(pairs) // mesh.size)
    pairs = np.concatenate([pairs, np.zeros((per * mesh.size - len(pairs), 3), np.int32)])
    # Deal tiles round-robin: device d gets tiles d, d + devices, ...
    pairs = pairs.reshape(per, mesh.size, 3).transpose(1, 0, 2).reshape(-1, 3)
    pairs = jax.device_put(pairs, batch_sharding(mesh))
    return np.asarray(_knn_sq(x, sq, pairs, n=n, k=k, block=block, mesh=mesh))[:n]


@functools.partial(jax.jit, static_argnames=("block", "mesh"))
def _cross(x, sq_x, r2_x, y, sq_y, r2_y, *, block: int, mesh: Mesh):
    """Counts of real ``x`` vs fake ``y`` (see the module docstring).

    ``r2_x`` is ``[Nr, 2]``: real radii^2 for precision and for density/coverage;
    ``r2_y`` is ``[Nf]``: fake radii^2 for recall. Padding rows have radii^2 -inf.

    Returns:
      per fake row: (inside some real ball of precision, number of real density balls
      containing it); per real row: (some fake ball contains it, some fake point
      inside its coverage ball).
    """
    axes = mesh.axis_names

    def per_device(x, sq_x, r2_x, y, sq_y, r2_y):
        n_x = x.shape[0]

        def fake_block(real_hits, b):
            yb = lax.dynamic_slice_in_dim(y, b, block)
            sq_yb = lax.dynamic_slice_in_dim(sq_y, b, block)
            r2_yb = lax.dynamic_slice_in_dim(r2_y, b, block)

            def real_block(carry, a):
                in_prec, n_dens, real_hits = carry
                d2 = _sq_dist(
                    lax.dynamic_slice_in_dim(x, a, block),
                    lax.dynamic_slice_in_dim(sq_x, a, block),
                    yb,
                    sq_yb,
                )
                r2 = lax.dynamic_slice_in_dim(r2_x, a, block)
                in_real_pr = d2 < r2[:, :1]
                in_real_dc = d2 < r2[:, 1:]
                in_prec = in_prec | in_real_pr.any(axis=0)
                n_dens = n_dens + in_real_dc.sum(axis=0, dtype=jnp.int32)
                hits = jnp.stack([(d2 < r2_yb[None, :]).any(axis=1), in_real_dc.any(axis=1)], 1)
                cur = lax.dynamic_slice_in_dim(real_hits, a, block)
                real_hits = lax.dynamic_update_slice_in_dim(real_hits, cur | hits, a, 0)
                return (in_prec, n_dens, real_hits), None

            init = (jnp.zeros(block, bool), jnp.zeros(block, jnp.int32), real_hits)
            (in_prec, n_dens, real_hits), _ = lax.scan(real_block, init, jnp.arange(0, n_x, block))
            return real_hits, (in_prec, n_dens)

        real_hits, (in_prec, n_dens) = lax.scan(
            fake_block, jnp.zeros((n_x, 2), bool), jnp.arange(0, y.shape[0], block)
        )
        real_hits = lax.psum(real_hits.astype(jnp.int32), axes) > 0
        return in_prec.reshape(-1), n_dens.reshape(-1), real_hits

    sharded = PartitionSpec(axes)
    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(PartitionSpec(),) * 3 + (sharded,) * 3,
        out_specs=(sharded, sharded, PartitionSpec()),
        check_vma=False,
    )(x, sq_x, r2_x, y, sq_y, r2_y)


def _centred(f_real: np.ndarray, f_fake: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sets minus their joint mean rounded to a grid 2^-8 of its largest coordinate."""
    mean = (f_real.sum(0, dtype=np.float64) + f_fake.sum(0, dtype=np.float64)) / (
        f_real.shape[0] + f_fake.shape[0]
    )
    top = np.abs(mean).max()
    q = 2.0 ** (np.ceil(np.log2(top)) - 8) if top > 0 else 1.0
    center = (np.round(mean / q) * q).astype(np.float32)
    return f_real - center, f_fake - center


def _check_k(k: int, n: int, name: str, arg: str) -> None:
    if not 1 <= k < n:
        raise InputError(
            f"{arg}={k} must be >= 1 and smaller than the number of {name} samples ({n}); "
            f"pass a smaller {arg} or more samples."
        )


def prdc(
    f_real: np.ndarray,
    f_fake: np.ndarray,
    *,
    k_pr: int | None = defaults.PR_K,
    k_dc: int | None = defaults.DC_K,
    block_size: int = DEFAULT_BLOCK,
    mesh: Mesh | None = None,
) -> dict[str, float]:
    """Precision, recall (k-NN with ``k_pr``), density and coverage (``k_dc``) in one sweep.

    The four together take one half real-vs-real pass (radii for both k),
    one half fake-vs-fake pass (only with ``k_pr``) and one real-vs-fake
    pass: about 2 N^2 D multiply-adds for N = M, against 3.5 N^2 D for
    :func:`precision_recall` and :func:`density_coverage` apart; use it
    when both pairs are wanted.

    Args:
      f_real: ``[N, D]`` real features.
      f_fake: ``[M, D]`` fake features.
      k_pr: neighbours for precision and recall (Kynkäänniemi et al.: 3), or
        ``None`` to skip them.
      k_dc: neighbours for density and coverage (Naeem et al.: 5), or ``None``
        to skip them.
      block_size: most rows per distance tile (tiles are fitted to N in multiples
        of 32); memory is O((N + M) D + block_size^2) per device.
      mesh: devices to spread the tiles over; default all local devices.

    Returns:
      dict with ``precision`` and ``recall`` (when ``k_pr``) and ``density``
      and ``coverage`` (when ``k_dc``), as floats.

    Raises:
      InputError: for feature arrays that are not ``[N, D]``, differ in D or
        are not finite; a k outside ``1 <= k < N`` (``k_pr`` also ``< M``);
        both k ``None``; ``block_size < 1``.
    """
    f_real, f_fake = as_feature_pair(f_real, f_fake)
    n_real, n_fake = f_real.shape[0], f_fake.shape[0]
    if k_pr is None and k_dc is None:
        raise InputError("prdc: k_pr and k_dc are both None; set at least one.")
    if k_pr is not None:
        _check_k(k_pr, n_real, "real", "k_pr")
        _check_k(k_pr, n_fake, "fake", "k_pr")
    if k_dc is not None:
        _check_k(k_dc, n_real, "real", "k_dc")
    if block_size < 1:
        raise InputError(f"prdc: block_size={block_size} must be >= 1.")
    mesh = local_mesh(mesh)

    x, y = _centred(f_real, f_fake)
    sq_x, sq_y = _sq_norms(x), _sq_norms(y)
    # One tile shape for every pass, so that a pair of vectors gets the same computed d^2
    # in whichever tile it falls (see the module docstring on ties).
    block = _tile_size(min(n_real, -(-n_fake // mesh.size)), block_size)

    # Padding rows repeat row 0; tiles mask them, and radii^2 of -inf keep them out of
    # every count. The fake rows are padded for the sharded cross pass; its self pass
    # masks the few extra rows.
    rep, shard = replicated(mesh), batch_sharding(mesh)
    x, sq_x = (jax.device_put(pad_batch(a, block)[0], rep) for a in (x, sq_x))
    y, sq_y = (jax.device_put(pad_batch(a, block * mesh.size)[0], rep) for a in (y, sq_y))

    knn_x = _knn_radii_sq(x, sq_x, n_real, max(k for k in (k_pr, k_dc) if k), block, mesh)
    r2_x = np.stack([knn_x[:, (k_pr or k_dc) - 1], knn_x[:, (k_dc or k_pr) - 1]], axis=1)
    r2_y = (
        _knn_radii_sq(y, sq_y, n_fake, k_pr, block, mesh)[:, -1]
        if k_pr is not None
        else np.full(n_fake, -np.inf, np.float32)
    )
    r2_x = np.pad(r2_x, ((0, x.shape[0] - n_real), (0, 0)), constant_values=-np.inf)
    r2_y = np.pad(r2_y, (0, y.shape[0] - n_fake), constant_values=-np.inf)
    in_prec, n_dens, real_hits = _cross(
        x,
        sq_x,
        jax.device_put(r2_x, rep),
        jax.device_put(y, shard),
        jax.device_put(sq_y, shard),
        jax.device_put(r2_y, shard),
        block=block,
        mesh=mesh,
    )
    in_prec = np.asarray(in_prec)[:n_fake]
    n_dens = np.asarray(n_dens)[:n_fake]
    real_hits = np.asarray(real_hits)[:n_real]

    out = {}
    if k_pr is not None:
        out["precision"] = float(in_prec.mean())
        out["recall"] = float(real_hits[:, 0].mean())
    if k_dc is not None:
        out["density"] = float(n_dens.sum(dtype=np.int64) / (k_dc * n_fake))
        out["coverage"] = float(real_hits[:, 1].mean())
    return out


def precision_recall(
    f_real: np.ndarray,
    f_fake: np.ndarray,
    k: int = defaults.PR_K,
    *,
    block_size: int = DEFAULT_BLOCK,
    mesh: Mesh | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN radii.

    Args and errors as :func:`prdc` with ``k_pr=k``; ``k`` must be smaller
    than both set sizes.

    Returns:
      ``(precision, recall)``.
    """
    out = prdc(f_real, f_fake, k_pr=k, k_dc=None, block_size=block_size, mesh=mesh)
    return out["precision"], out["recall"]


def density_coverage(
    f_real: np.ndarray,
    f_fake: np.ndarray,
    k: int = defaults.DC_K,
    *,
    block_size: int = DEFAULT_BLOCK,
    mesh: Mesh | None = None,
) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020) with k-NN radii of the real set.

    Args and errors as :func:`prdc` with ``k_dc=k``; ``k`` must be smaller
    than the number of real samples.

    Returns:
      ``(density, coverage)``; density can exceed 1.
    """
    out = prdc(f_real, f_fake, k_pr=None, k_dc=k, block_size=block_size, mesh=mesh)
    return out["density"], out["coverage"]
