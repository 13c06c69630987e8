"""Fréchet distance between two Gaussians (FID, sFID).

d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr sqrt(S_1^{1/2} S_2 S_1^{1/2})

(Heusel et al. 2017, eq. 6; Dowson & Landau 1982). The trace term is taken
by the symmetric route: ``S_1^{1/2}`` from one ``eigh``, then the
eigenvalues of the symmetric PSD matrix ``S_1^{1/2} S_2 S_1^{1/2}``, whose
square roots sum to ``tr sqrt(S_1 S_2)``. Everything is float64 on the host
and eigenvalues within rounding noise of 0 (or below) are set to 0, so
rank-deficient covariances (N < D) give a finite, correct value where
``scipy.linalg.sqrtm`` returns complex noise or needs an epsilon on the
diagonal.
"""

from __future__ import annotations

import numpy as np

from jaxgen.errors import InputError
from jaxgen.metrics.stats import GaussianStats


def _clean(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding noise around 0 set to exactly 0.

    Eigenvalues below ``D * eps * max|w|`` (numpy's ``matrix_rank`` tolerance)
    are indistinguishable from 0; left in, each would add sqrt(noise) ~ 1e-8
    of the scale to the trace term when N < D.
    """
    tol = w.shape[0] * np.finfo(np.float64).eps * np.abs(w).max()
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(_clean(w))) @ v.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """Fréchet distance between the Gaussians ``a`` and ``b`` (float64).

    Raises:
      InputError: when the two statistics have different dimensions.
    """
    if a.dim != b.dim:
        raise InputError(
            f"statistics have different dimensions ({a.dim} vs {b.dim}); compute both with "
            "the same feature extractor and layer."
        )
    root_a = _psd_sqrt(a.sigma)
    m = root_a @ b.sigma @ root_a
    tr_covmean = np.sqrt(_clean(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * tr_covmean)
