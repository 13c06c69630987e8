"""FID-infinity and IS-infinity (Chong & Forsyth 2020, "Effectively Unbiased FID and
Inception Score and where to find them", sec. 3).

FID_N and IS_N are biased, and the bias is linear in 1/N to first order
(their eq. 3). Both are scored at ``num_points`` sample counts N evenly
spaced from ``min_n`` to all the fake samples (``np.linspace(min_n, M,
num_points).astype(int32)``, as in the reference code mchong6/FID_IS_infinity),
each on N rows drawn without replacement from the fake set with a fresh
permutation, and the least-squares line score = a + b / N is extrapolated to
N = infinity: the result is its intercept ``a``. Pair these with Sobol
latents (:func:`jaxgen.metrics.qmc.sobol_normal`) as the paper does.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxgen.errors import InputError
from jaxgen.metrics import defaults
from jaxgen.metrics._common import as_features
from jaxgen.metrics.fid import psd_factor, trace_sqrt
from jaxgen.metrics.inception_score import check_logits, probs_and_entropy, score_from_sums
from jaxgen.metrics.stats import CHUNK_ROWS, GaussianStats, gram


class Extrapolation(NamedTuple):
    """A score extrapolated to infinitely many samples.

    Attributes:
      value: intercept of the line at 1/N = 0 (FID_inf or IS_inf).
      slope: its slope against 1/N.
      n: ``[num_points]`` sample counts N of the fitted points.
      scores: ``[num_points]`` FID_N or IS_N at those counts.
    """

    value: float
    slope: float
    n: np.ndarray
    scores: np.ndarray


def _sample_counts(m: int, num_points: int, min_n: int, arg: str) -> np.ndarray:
    if num_points < 2:
        raise InputError(f"num_points={num_points} must be >= 2 to fit a line.")
    if min_n < 2:
        raise InputError(f"min_n={min_n} must be >= 2.")
    if m <= min_n:
        raise InputError(
            f"{arg} has {m} samples, but the fit needs more than min_n={min_n} (scores at N "
            f"from min_n to {m}); pass min_n < {m} or generate more samples (the reference "
            "uses 50000 with min_n=5000)."
        )
    return np.linspace(min_n, m, num_points).astype(np.int32)


def _fit(n: np.ndarray, scores: np.ndarray) -> Extrapolation:
    slope, intercept = np.polyfit(1.0 / n, scores, 1)
    return Extrapolation(float(intercept), float(slope), n, scores)


def fid_infinity(
    f_real_stats_or_features: GaussianStats | np.ndarray,
    f_fake: np.ndarray,
    num_points: int = defaults.INF_POINTS,
    min_n: int = defaults.INF_MIN_N,
    seed: int = defaults.SEED,
) -> Extrapolation:
    """FID_inf: FID_N of fake subsets against the real statistics, extrapolated to N = inf.

    Every FID_N is the float64 Fréchet distance of :func:`frechet_distance`
    between the real statistics and those of its subset, computed without
    forming the subset's covariance: with ``S_real = F F^T`` (pivoted
    Cholesky, once), the fake rows are centred on the fake mean ``c`` and
    projected once, ``Z = (X - c) F``; a subset's trace term is then
    ``tr sqrt(cov(Z_subset))``, and ``cov(Z_subset)`` comes from a symmetric
    rank-k update over the subset's rows, or over the rows left out (the
    total minus their sum) when those are fewer. The 15 default points thus
    cost about 4 N D^2 multiply-adds, against 8 N D^2 for 15 covariances
    plus their products with ``F``. Results equal the direct route up to
    float64 rounding.

    Args:
      f_real_stats_or_features: statistics of the real set, or its ``[N, D]`` features.
      f_fake: ``[M, D]`` fake features, ``M > min_n``.
      num_points: number of N at which FID_N is computed.
      min_n: smallest N.
      seed: seed of the subset draws (``np.random.RandomState``).

    Returns:
      :class:`Extrapolation` (``value`` is FID_inf).

    Raises:
      InputError: for malformed features, different dimensions, ``num_points
        < 2``, ``min_n < 2`` or too few fake samples.
    """
    # Features keep their float dtype here; the statistics are accumulated in float64.
    as_float = lambda x, name: as_features(x, name, np.result_type(np.asarray(x).dtype, np.float32))
    real = f_real_stats_or_features
    if not isinstance(real, GaussianStats):
        real = GaussianStats.from_features(as_float(real, "f_real_stats_or_features"))
    f_fake = as_float(f_fake, "f_fake")
    if f_fake.shape[1] != real.dim:
        raise InputError(
            f"f_fake has dimension {f_fake.shape[1]} but the real statistics {real.dim}; "
            "use features of the same network and layer."
        )
    m = f_fake.shape[0]
    n = _sample_counts(m, num_points, min_n, "f_fake")
    factor = psd_factor(real.sigma)
    centre = f_fake.mean(axis=0, dtype=np.float64)
    # Per row: its projection z = (x - c) F and |x - c|^2, float64, CHUNK_ROWS rows at a time.
    z = np.empty((m, factor.shape[1]))
    sq = np.empty(m)
    for a in range(0, m, CHUNK_ROWS):
        xc = f_fake[a : a + CHUNK_ROWS].astype(np.float64) - centre
        z[a : a + CHUNK_ROWS] = xc @ factor
        sq[a : a + CHUNK_ROWS] = np.einsum("ij,ij->i", xc, xc)

    def sums(rows):  # sums over the rows of x - c, z, z z^T and |x - c|^2
        x_sum = f_fake[rows].sum(axis=0, dtype=np.float64) - len(rows) * centre
        return x_sum, z[rows].sum(axis=0), gram(z, rows), sq[rows].sum()

    everything = sums(np.arange(m))
    rng = np.random.RandomState(seed)
    scores = []
    for k in n:
        perm = rng.permutation(m)
        if k <= m - k:
            x_sum, z_sum, zz, sq_sum = sums(np.sort(perm[:k]))
        else:
            left_out = sums(np.sort(perm[k:]))
            x_sum, z_sum, zz, sq_sum = (t - u for t, u in zip(everything, left_out, strict=True))
        x_mean, z_mean = x_sum / k, z_sum / k
        cov_z = (zz - k * np.outer(z_mean, z_mean)) / (k - 1)  # F^T S_fake F
        trace_fake = (sq_sum - k * x_mean @ x_mean) / (k - 1)  # tr S_fake
        diff = real.mu - (centre + x_mean)
        scores.append(
            diff @ diff + np.trace(real.sigma) + trace_fake - 2.0 * trace_sqrt(cov_z)
        )
    return _fit(n, np.asarray(scores))


def is_infinity(
    logits_fake: np.ndarray,
    num_points: int = defaults.INF_POINTS,
    min_n: int = defaults.INF_MIN_N,
    seed: int = defaults.SEED,
    splits: int = defaults.IS_INF_SPLITS,
) -> Extrapolation:
    """IS_inf: Inception Score of fake subsets, extrapolated to N = inf.

    Each IS_N is the mean over ``splits`` chunks of the subset, scored as in
    :func:`jaxgen.metrics.inception_score`; the reference code uses one split.

    Args:
      logits_fake: ``[M, C]`` logits of the fake set (1008-way, without bias,
        for the standard IS), ``M > min_n``.
      num_points: number of N at which IS_N is computed.
      min_n: smallest N, at least ``splits``.
      seed: seed of the subset draws (``np.random.RandomState``).
      splits: chunks per IS_N.

    Returns:
      :class:`Extrapolation` (``value`` is IS_inf).

    Raises:
      InputError: for malformed logits, ``num_points < 2``, ``min_n < max(2,
        splits)`` or too few samples.
    """
    logits = check_logits(logits_fake, "logits_fake")
    if not 1 <= splits <= min_n:
        raise InputError(f"splits={splits} must be between 1 and min_n={min_n}.")
    n = _sample_counts(logits.shape[0], num_points, min_n, "logits_fake")
    p, h = probs_and_entropy(logits)  # once; each subset's chunks are scored from sums
    rng = np.random.RandomState(seed)
    scores = []
    for k in n:
        rows = rng.permutation(len(logits))[:k]
        bounds = [(i * k // splits, (i + 1) * k // splits) for i in range(splits)]
        chunks = [np.sort(rows[a:b]) for a, b in bounds]
        scores.append(np.mean([score_from_sums(p[c].sum(0), h[c].sum(), len(c)) for c in chunks]))
    return _fit(n, np.asarray(scores))
