"""Fréchet distance between two Gaussians (FID, sFID).

d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr sqrt(S_1 S_2)

(Heusel et al. 2017, eq. 6; Dowson & Landau 1982). The trace term is taken
by the symmetric route: for any factor ``F`` with ``S_1 = F F^T``, the
symmetric PSD matrix ``F^T S_2 F`` has the same non-zero eigenvalues as
``S_1 S_2`` (and as ``S_1^{1/2} S_2 S_1^{1/2}``), so the trace is the sum of
the square roots of its eigenvalues. ``F`` comes from LAPACK's pivoted
Cholesky (``dpstrf``), which is rank-revealing: with N < D samples ``S_1``
has rank r < D and ``F`` is D x r, so the eigenvalue problem shrinks to
r x r. Everything is float64 on the host, and eigenvalues within rounding
noise of 0 are set to 0, so rank-deficient covariances give a finite,
correct value where ``scipy.linalg.sqrtm`` returns complex noise or needs
an epsilon on the diagonal.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from scipy.linalg import lapack
from threadpoolctl import threadpool_limits

from jaxgen.errors import InputError
from jaxgen.metrics.stats import GaussianStats, check_comparable


def _clean(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding noise around 0 set to exactly 0.

    Eigenvalues below ``n * eps * max|w|`` (numpy's ``matrix_rank``
    tolerance) are indistinguishable from 0; left in, each would add
    sqrt(noise) ~ 1e-8 of the scale to the trace term.
    """
    if w.size == 0:
        return w
    tol = w.shape[0] * np.finfo(np.float64).eps * np.abs(w).max()
    return np.where(w > tol, w, 0.0)


def psd_factor(s: np.ndarray) -> np.ndarray:
    """``F`` (D x rank) with ``F F^T = s`` for a symmetric PSD ``s``, by pivoted Cholesky.

    ``dpstrf`` stops at the numerical rank (its default tolerance is
    ``D * eps * max(diag)``), which is what makes it safe on singular
    covariances.
    """
    c, piv, rank, info = lapack.dpstrf(s, lower=1)
    if info < 0:
        raise InputError(f"pivoted Cholesky failed (LAPACK info {info}) on a {s.shape} matrix.")
    f = np.empty((s.shape[0], rank))
    f[piv - 1] = np.tril(c)[:, :rank]  # undo the symmetric pivoting P^T S P = L L^T
    return f


def trace_sqrt(m: np.ndarray) -> float:
    """``tr sqrt(m)`` of a symmetric PSD float64 matrix: the sum of its eigenvalues' roots."""
    if m.size == 0:
        return 0.0
    # The tridiagonal reduction inside eigh is memory-bound: a second BLAS thread saves
    # ~0.1 s at D = 2048 on an idle 2-core CPU, while on a shared CPU spinning BLAS
    # threads made it 3-18x slower (0.3 s -> 1.7-5.4 s; one thread: 0.7 s).
    with threadpool_limits(1, user_api="blas"):
        w = scipy.linalg.eigh((m + m.T) / 2, eigvals_only=True, driver="evr")
    return float(np.sqrt(_clean(w)).sum())


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """``tr sqrt(s1 s2)`` for symmetric PSD ``s1``, ``s2`` (float64)."""
    f = psd_factor(s1)  # D x 0 when s1 = 0 (e.g. every sample identical): the trace is 0
    return trace_sqrt(f.T @ s2 @ f)


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """Fréchet distance between the Gaussians ``a`` and ``b`` (float64).

    Raises:
      InputError: when the two statistics come from different feature protocols or have
        different dimensions (:func:`check_comparable`), or either ``sigma`` is not a
        covariance (:meth:`GaussianStats.check`).
    """
    check_comparable(a, b)
    for name, stats in (("first", a), ("second", b)):
        try:
            stats.check()
        except InputError as e:
            raise InputError(f"frechet_distance: the {name} statistics' {e}") from None
    diff = a.mu - b.mu
    tr_covmean = trace_sqrt_product(a.sigma, b.sigma)
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * tr_covmean)
