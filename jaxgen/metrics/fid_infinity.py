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
from jaxgen.metrics._common import as_features
from jaxgen.metrics.fid import frechet_distance
from jaxgen.metrics.inception_score import _check_logits, _split_scores
from jaxgen.metrics.stats import GaussianStats


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
    num_points: int = 15,
    min_n: int = 5000,
    seed: int = 0,
) -> Extrapolation:
    """FID_inf: FID_N of fake subsets against the real statistics, extrapolated to N = inf.

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
    n = _sample_counts(f_fake.shape[0], num_points, min_n, "f_fake")
    rng = np.random.RandomState(seed)
    scores = np.asarray(
        [
            frechet_distance(
                real, GaussianStats.from_features(f_fake[rng.permutation(len(f_fake))[:k]])
            )
            for k in n
        ]
    )
    return _fit(n, scores)


def is_infinity(
    logits_fake: np.ndarray,
    num_points: int = 15,
    min_n: int = 5000,
    seed: int = 0,
    splits: int = 1,
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
    logits = _check_logits(logits_fake, "logits_fake")
    if not 1 <= splits <= min_n:
        raise InputError(f"splits={splits} must be between 1 and min_n={min_n}.")
    n = _sample_counts(logits.shape[0], num_points, min_n, "logits_fake")
    rng = np.random.RandomState(seed)
    scores = np.asarray(
        [_split_scores(logits[rng.permutation(len(logits))[:k]], splits).mean() for k in n]
    )
    return _fit(n, scores)
