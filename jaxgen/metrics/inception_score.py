"""Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), mean and std over splits."""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp, xlogy

from jaxgen.errors import InputError
from jaxgen.metrics import defaults

_ROWS = 4096  # rows converted to float64 at a time


def check_logits(logits: np.ndarray, name: str = "logits") -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] < 2 or not np.issubdtype(logits.dtype, np.number):
        raise InputError(
            f"{name} must be a numeric array [N, classes] with classes >= 2; got "
            f"{logits.dtype} {logits.shape}."
        )
    if not np.all(np.isfinite(logits)):
        raise InputError(f"{name} contain NaN or inf.")
    return logits


def probs_and_entropy(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``p = softmax(logits)`` ``[N, C]`` and ``h_i = sum_y p log p`` ``[N]``, in float64.

    ``_ROWS`` rows are converted at a time; ``p log p`` is 0 where ``p`` underflows to 0.
    """
    p = np.empty(logits.shape, np.float64)
    h = np.empty(logits.shape[0], np.float64)
    for a in range(0, logits.shape[0], _ROWS):
        chunk = logits[a : a + _ROWS].astype(np.float64)
        log_p = chunk - logsumexp(chunk, axis=1, keepdims=True)
        p[a : a + _ROWS] = np.exp(log_p)
        h[a : a + _ROWS] = np.where(p[a : a + _ROWS] > 0, p[a : a + _ROWS] * log_p, 0.0).sum(1)
    return p, h


def score_from_sums(p_sum: np.ndarray, h_sum: float, n: int) -> float:
    """exp(mean_x KL(p(y|x) || p(y))) of ``n`` rows from the sums of their ``p`` and ``h``.

    With ``q = mean_x p``, ``mean_x sum_y p log(p / q) = mean_x h - sum_y q log q``
    exactly (a class with ``q = 0`` has ``p = 0`` in every row and adds nothing),
    so a set of rows is scored from two sums, without another pass over them.
    """
    q = p_sum / n
    return float(np.exp(h_sum / n - xlogy(q, q).sum()))


def _split_scores(logits: np.ndarray, splits: int) -> np.ndarray:
    """exp(mean KL(p(y|x) || p(y))) of each of ``splits`` consecutive chunks, in float64."""
    n = logits.shape[0]
    p, h = probs_and_entropy(logits)
    bounds = [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
    return np.asarray([score_from_sums(p[a:b].sum(0), h[a:b].sum(), b - a) for a, b in bounds])


def inception_score(
    logits: np.ndarray, splits: int = defaults.IS_SPLITS, *, seed: int | None = defaults.IS_SEED
) -> tuple[float, float]:
    """Inception Score of ``logits``: mean and (population) std over ``splits`` chunks.

    Follows torch-fidelity's ``isc_features_to_metric``, itself the original
    IS code (openai/improved-gan) in float64: rows are shuffled with
    ``np.random.RandomState(seed).permutation`` (skipped for ``seed=None``,
    the default, as in the original code and the ADM evaluator), chunk ``i`` is rows
    ``i N // splits`` to ``(i + 1) N // splits``, and each chunk scores
    ``exp(mean_x KL(p(y|x) || mean_x p(y|x)))`` with ``p = softmax(logits)``
    in float64. torch-fidelity's default ``rng_seed`` is 2020: pass
    ``seed=2020`` to reproduce its numbers.

    Args:
      logits: ``[N, C]`` class logits. For the standard IS these are the
        1008-way Inception-v3 logits computed without the bias of the last
        layer (torch-fidelity's ``logits_unbiased``, the TF graph's
        ``softmax/logits`` MatMul), as the original IS code used them.
      splits: number of chunks, ``1 <= splits <= N``.
      seed: seed of the row permutation, or ``None`` to keep the order given
        (:data:`jaxgen.metrics.defaults.IS_SEED`).

    Returns:
      ``(mean, std)`` of the per-chunk scores.

    Raises:
      InputError: for logits that are not ``[N, C]`` or not finite, or a bad ``splits``.
    """
    logits = check_logits(logits)
    n = logits.shape[0]
    if not 1 <= splits <= n:
        raise InputError(
            f"inception_score: splits={splits} must be between 1 and the number of samples "
            f"({n}); use fewer splits or more samples."
        )
    if seed is not None:
        logits = logits[np.random.RandomState(seed).permutation(n)]
    scores = _split_scores(logits, splits)
    return float(scores.mean()), float(scores.std())
