"""CMMD: the MMD between CLIP embeddings (Jayasumana et al. 2024, "Rethinking FID", sec. 4).

As google-research's ``cmmd/distance.py``: the minimum-variance (biased)
estimator of squared MMD (Gretton et al. 2012, eq. 5, diagonals included),

    CMMD = scale * (mean k(x, x') + mean k(y, y') - 2 mean k(x, y)),

with the Gaussian RBF kernel ``k(a, b) = exp(-|a - b|^2 / (2 sigma^2))``,
sigma = 10, scale = 1000, on L2-normalised CLIP ViT-L/14-336 image
embeddings (:func:`jaxgen.encoders.clip.preprocess_cmmd`). Here every sum is
float64 and the kernel matrices are never held whole: blocks of
``block_size`` x ``block_size`` (memory ``8 * block_size^2`` bytes each),
and each symmetric mean visits only the blocks on and above the diagonal.
"""

from __future__ import annotations

import numpy as np

from jaxgen.errors import InputError
from jaxgen.metrics._common import as_features

SIGMA = 10.0
SCALE = 1000.0


def _kernel_mean(a: np.ndarray, b: np.ndarray | None, gamma: float, block: int) -> float:
    """Mean of ``exp(-gamma |a_i - b_j|^2)`` over all pairs; ``b=None`` means ``b = a``."""
    symmetric = b is None
    b = a if symmetric else b
    sq_a, sq_b = np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b)
    total = 0.0
    for i in range(0, len(a), block):
        for j in range(i if symmetric else 0, len(b), block):
            d2 = sq_a[i : i + block, None] + sq_b[None, j : j + block]
            d2 -= 2.0 * (a[i : i + block] @ b[j : j + block].T)
            s = float(np.exp(-gamma * d2).sum())
            total += 2.0 * s if symmetric and j > i else s
    return total / (len(a) * len(b))


def cmmd(
    x: np.ndarray,
    y: np.ndarray,
    *,
    sigma: float = SIGMA,
    scale: float = SCALE,
    block_size: int = 4096,
) -> float:
    """CMMD between embedding sets ``x`` (reference) and ``y`` (evaluated).

    Args:
      x, y: ``[N, D]`` and ``[M, D]`` embeddings (CMMD: unit-norm CLIP embeddings).
      sigma: the RBF kernel's bandwidth.
      scale: the factor ``cmmd`` applies for readability.
      block_size: rows per kernel block; peak memory about ``16 * block_size^2`` bytes.

    Returns:
      ``scale * MMD^2`` (biased estimator), a float.
    """
    x, y = as_features(x, "x", np.float64), as_features(y, "y", np.float64)
    if x.shape[1] != y.shape[1]:
        raise InputError(f"x and y have different embedding dimensions ({x.shape[1]} vs "
                         f"{y.shape[1]}); embed both with the same CLIP model.")
    if block_size < 1:
        raise InputError(f"block_size must be >= 1, got {block_size}.")
    gamma = 1.0 / (2.0 * sigma**2)
    k_xx = _kernel_mean(x, None, gamma, block_size)
    k_yy = _kernel_mean(y, None, gamma, block_size)
    k_xy = _kernel_mean(x, y, gamma, block_size)
    return scale * (k_xx + k_yy - 2.0 * k_xy)
