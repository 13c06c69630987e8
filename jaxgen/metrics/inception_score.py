"""Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), mean and std over splits."""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from jaxgen.errors import InputError

_ROWS = 4096  # rows in float64 at a time: memory O(_ROWS * classes), not O(N * classes)


def _check_logits(logits: np.ndarray, name: str = "logits") -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] < 2 or not np.issubdtype(logits.dtype, np.number):
        raise InputError(
            f"{name} must be a numeric array [N, classes] with classes >= 2; got "
            f"{logits.dtype} {logits.shape}."
        )
    if not np.all(np.isfinite(logits)):
        raise InputError(f"{name} contain NaN or inf.")
    return logits


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    return logits - logsumexp(logits, axis=1, keepdims=True)


def _split_scores(logits: np.ndarray, splits: int) -> np.ndarray:
    """exp(mean KL(p(y|x) || p(y))) of each of ``splits`` consecutive chunks, in float64."""
    n = logits.shape[0]
    scores = np.empty(splits)
    for i in range(splits):
        chunk = logits[i * n // splits : (i + 1) * n // splits]
        parts = [chunk[r : r + _ROWS] for r in range(0, len(chunk), _ROWS)]
        log_q = np.log(sum(np.exp(_log_softmax(c)).sum(axis=0) for c in parts) / len(chunk))
        kl = 0.0
        for c in parts:
            log_p = _log_softmax(c)
            p = np.exp(log_p)
            # p log(p/q) -> 0 as p -> 0; where p underflows to 0, so may q, and 0 * inf is NaN.
            kl += np.where(p > 0, p * (log_p - log_q), 0.0).sum()
        scores[i] = np.exp(kl / len(chunk))
    return scores


def inception_score(
    logits: np.ndarray, splits: int = 10, *, seed: int | None = 0
) -> tuple[float, float]:
    """Inception Score of ``logits``: mean and (population) std over ``splits`` chunks.

    Follows torch-fidelity's ``isc_features_to_metric``, itself the original
    IS code (openai/improved-gan) in float64: rows are shuffled with
    ``np.random.RandomState(seed).permutation`` (skipped for ``seed=None``,
    as in the original code and the ADM evaluator), chunk ``i`` is rows
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
      seed: seed of the row permutation, or ``None`` to keep the order given.

    Returns:
      ``(mean, std)`` of the per-chunk scores.

    Raises:
      InputError: for logits that are not ``[N, C]`` or not finite, or a bad ``splits``.
    """
    logits = _check_logits(logits)
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
