"""Gaussian feature statistics: streaming float64 accumulation and npz files.

Features leave the device as float32 and are accumulated on the host in
float64 with Chan et al.'s pairwise update ("Updating Formulae and a Pairwise
Algorithm for Computing Sample Variances", 1979): each batch contributes its
own mean and centred scatter matrix, so no catastrophic cancellation occurs
however large the mean is relative to the spread, and the result does not
depend on how the images were batched (up to float64 rounding). Partial
statistics from several processes merge with the same formula, in process
order, so multi-host results are deterministic.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile

import jax
import numpy as np
from scipy.linalg import blas

from jaxgen.errors import InputError
from jaxgen.files import as_path, open_atomic

CHUNK_ROWS = 8192  # rows converted to float64 at a time: memory O(CHUNK_ROWS * D), not O(N * D)
# Round-off allowed in a covariance read from a file, relative to sqrt(S_ii S_jj) entrywise
# and to tr(S) for eigenvalues; see GaussianStats.check for the bound it covers.
COVARIANCE_RTOL = 1e-6

# Which network, layer and input protocol produced a set of statistics (the ``network`` and
# ``network_s`` keys of a statistics npz). Statistics of different protocols live in different
# spaces: their distance is not a FID of anything.
INCEPTION_POOL3 = "inception-2015-12-05/pool3"
"""TF-FID Inception, TF1 legacy bilinear resize to 299: FID's features (pytorch-fid, ADM)."""
INCEPTION_SPATIAL = "inception-2015-12-05/mixed_6_conv[:7]"
"""The first 7 channels of Inception's ``mixed_6/conv`` (17 x 17), flattened: sFID's features."""
INCEPTION_CLEAN = "inception-2015-12-05/clean-resize/pool3"
"""The same Inception after clean-fid's PIL-bicubic float resize: clean-FID's features."""
DINOV2_CLS = "dinov2-vitl14/cls"
"""DINOv2 ViT-L/14's normed CLS token after dgm-eval's resize: FD-DINOv2's features."""


def gram(x: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """``x^T x`` in float64 (of ``x[rows]`` when given), ``CHUNK_ROWS`` rows at a time.

    BLAS ``dsyrk`` does half the multiply-adds of a general product and fills
    one triangle, which is mirrored at the end, so the result is exactly
    symmetric. Memory is O(D^2 + CHUNK_ROWS * D) whatever N.
    """
    n = x.shape[0] if rows is None else len(rows)
    acc = np.zeros((x.shape[1], x.shape[1]), np.float64, order="F")
    for a in range(0, n, CHUNK_ROWS):
        part = x[a : a + CHUNK_ROWS] if rows is None else x[rows[a : a + CHUNK_ROWS]]
        # A C-ordered [B, D] array is the Fortran-ordered [D, B] array part^T: no copy.
        part_t = np.ascontiguousarray(part, np.float64).T
        acc = blas.dsyrk(1.0, part_t, beta=1.0, c=acc, trans=0, lower=0, overwrite_c=1)
    return acc + np.triu(acc, 1).T  # dsyrk left the strict lower triangle at 0


@dataclasses.dataclass(frozen=True)
class GaussianStats:
    """Mean and covariance of a feature set (float64), and how many samples made them.

    Attributes:
      mu: ``[D]`` mean.
      sigma: ``[D, D]`` unbiased covariance (divided by ``n - 1``).
      n: number of samples, or ``None`` when read from a file that does not say.
      network: the network, layer and input protocol of the features (:data:`INCEPTION_POOL3`,
        :data:`DINOV2_CLS`, ...), or ``None`` when not known (statistics built by hand);
        :func:`check_comparable` refuses to compare two different known protocols.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None
    network: str | None = None

    def __post_init__(self):
        mu = np.asarray(self.mu, np.float64)
        sigma = np.asarray(self.sigma, np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise InputError(
                f"GaussianStats needs mu of shape [D] and sigma [D, D]; got mu {mu.shape}, "
                f"sigma {sigma.shape}."
            )
        if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
            raise InputError("GaussianStats: mu or sigma contains NaN or inf.")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)

    def check(self) -> None:
        """Refuse a ``sigma`` that is not a covariance: not symmetric, or not positive
        semi-definite, beyond round-off. Either gives FIDs that depend on argument order
        (the square root reads one triangle) and can be negative.

        The allowance: entry (i, j) of the covariance of N samples, summed in float64, is
        off by at most about N u s_i s_j (u = 2^-53, s_i = sqrt(S_ii); Higham, "Accuracy and
        Stability of Numerical Algorithms", 2002, section 3.1, with Cauchy-Schwarz on the
        centred sums). S_ij and S_ji summed in different orders differ by at most
        2 N u s_i s_j = 2.2e-9 s_i s_j at N = 10^7, and a file stored in float32 rounds each
        to 2^-24: 1.2e-7 s_i s_j for the pair. :data:`COVARIANCE_RTOL` = 1e-6 covers both.
        An error E with |E_ij| <= rtol s_i s_j has ||E||_2 <= ||E||_F <= rtol tr(S), which
        by Weyl's inequality bounds how far it moves any eigenvalue; so ``sigma`` passes
        when ``sigma + rtol tr(sigma) I`` has a Cholesky factor (the factorisation's own
        error, ~D u ||S||, is 10^6 times smaller at D = 2048).

        Raises:
          InputError: naming the check that failed and the offending entries or eigenvalue.
        """
        sigma, rtol = self.sigma, COVARIANCE_RTOL
        var = np.diag(sigma)
        if np.any(var < 0):
            i = int(np.argmin(var))
            raise InputError(
                f"sigma is not a covariance: the variance sigma[{i},{i}] is {var[i]:.6g} < 0."
            )
        scale = np.sqrt(np.outer(var, var))
        excess = np.abs(sigma - sigma.T) - rtol * scale
        if np.any(excess > 0):
            i, j = np.unravel_index(int(np.argmax(excess)), excess.shape)
            raise InputError(
                f"sigma is not symmetric: sigma[{i},{j}] = {sigma[i, j]:.6g} but sigma[{j},{i}] "
                f"= {sigma[j, i]:.6g}, more apart than round-off ({rtol:g} * sqrt(sigma[{i},{i}] "
                f"* sigma[{j},{j}]) = {rtol * scale[i, j]:.3g})."
            )
        # The floor keeps an all-zero sigma (every sample identical) a covariance.
        shift = max(rtol * float(np.trace(sigma)), np.finfo(np.float64).tiny)
        try:
            np.linalg.cholesky((sigma + sigma.T) / 2 + shift * np.eye(self.dim))
        except np.linalg.LinAlgError:
            low = float(np.linalg.eigvalsh((sigma + sigma.T) / 2)[0])
            raise InputError(
                f"sigma is not positive semi-definite (smallest eigenvalue {low:.6g}, below "
                f"the round-off allowance -{rtol:g} * trace = {-shift:.3g})."
            ) from None

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return self.mu.shape[0]

    @classmethod
    def from_features(cls, features: np.ndarray, network: str | None = None) -> GaussianStats:
        """Statistics of a ``[N, D]`` feature array (N >= 2), ``CHUNK_ROWS`` rows at a time;
        ``network`` names the features' protocol (:attr:`network`)."""
        features = np.asarray(features)
        acc = MomentAccumulator()
        if features.ndim != 2:
            acc.update(features)  # raises the shape error
        for start in range(0, features.shape[0], CHUNK_ROWS):
            acc.update(features[start : start + CHUNK_ROWS])
        return acc.finalize(network)

    @classmethod
    def load(cls, path: str | os.PathLike, *, spatial: bool = False) -> GaussianStats:
        """Read pytorch-fid's npz (``mu``, ``sigma``) or the ADM evaluator's npz.

        The features' protocol is the file's ``network`` key (``network_s`` for the sFID
        statistics), as :func:`save_stats` writes it. Files without it -- pytorch-fid's
        statistics, the ADM evaluator's reference batches, and jaxgen's own from before the
        key existed -- are read as TF-FID Inception ``pool3`` (:data:`INCEPTION_POOL3`;
        sFID: :data:`INCEPTION_SPATIAL`), the only features those tools write.

        Args:
          path: the ``.npz`` file (local or ``gs://...``).
          spatial: read the sFID statistics (``mu_s``, ``sigma_s``) instead.

        Raises:
          InputError: naming the file, for missing keys, bad shapes, NaN or inf, or a
            ``sigma`` that is not a covariance (:meth:`check`).
        """
        keys = ("mu_s", "sigma_s") if spatial else ("mu", "sigma")
        data = read_npz(path)
        missing = [k for k in keys if k not in data]
        if missing:
            raise InputError(
                f"{path}: statistics file lacks {', '.join(missing)} (has {sorted(data)}); "
                "write it with `python -m jaxgen.fid_stats`."
            )
        n = int(data["n"]) if "n" in data else None
        net_key, default = ("network_s", INCEPTION_SPATIAL) if spatial else (
            "network", INCEPTION_POOL3)
        network = str(data[net_key]) if net_key in data else default
        try:
            stats = cls(data[keys[0]], data[keys[1]], n, network)
            stats.check()
            return stats
        except InputError as e:
            raise InputError(f"{path}: {e}") from None


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (local or ``gs://...``), with pickles refused and
    corruption reported by name."""
    path = as_path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file.")
    try:
        with path.open("rb") as raw, np.load(raw, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{path}: not a readable .npz file ({e}).") from None


def save_stats(
    path: str | os.PathLike,
    stats: GaussianStats,
    spatial: GaussianStats | None = None,
) -> None:
    """Write statistics as an npz that pytorch-fid and the ADM evaluator both read.

    Keys: ``mu``, ``sigma`` (pool3), ``mu_s``, ``sigma_s`` (sFID, when given),
    ``n``, and the features' protocols ``network`` / ``network_s`` (strings, when
    known; :meth:`GaussianStats.load` reads them, other tools ignore them).
    ``path`` may be local or ``gs://...``; it is written whole or not at all
    (:func:`jaxgen.files.open_atomic`).
    """
    arrays = {"mu": stats.mu, "sigma": stats.sigma}
    if spatial is not None:
        arrays.update(mu_s=spatial.mu, sigma_s=spatial.sigma)
    if stats.n is not None:
        arrays["n"] = np.asarray(stats.n, np.int64)
    if stats.network is not None:
        arrays["network"] = np.asarray(stats.network)
    if spatial is not None and spatial.network is not None:
        arrays["network_s"] = np.asarray(spatial.network)
    with open_atomic(path) as f:
        np.savez(f, **arrays)


class MomentAccumulator:
    """Streaming float64 mean and covariance of feature batches.

    ``update`` folds in a ``[B, D]`` batch; ``merge`` folds in another
    accumulator; ``allreduce`` merges the accumulators of all JAX processes;
    ``finalize`` returns :class:`GaussianStats`.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None  # centred scatter matrix, sum (x - mean)(x - mean)^T

    def update(self, x: np.ndarray) -> None:
        """Add a batch of features ``[B, D]`` (any float dtype; B may be 0)."""
        x = np.asarray(x)
        if x.ndim != 2:
            raise InputError(f"features must have shape [N, D]; got {x.shape}.")
        if self.mean is not None and x.shape[1] != self.mean.shape[0]:
            raise InputError(
                f"feature dimension changed from {self.mean.shape[0]} to {x.shape[1]}."
            )
        if x.shape[0] == 0:
            return
        x = x.astype(np.float64)
        if not np.all(np.isfinite(x)):
            raise InputError("features contain NaN or inf.")
        mean = x.mean(axis=0)
        self._combine(x.shape[0], mean, gram(x - mean))

    def merge(self, other: MomentAccumulator) -> None:
        """Fold in the statistics held by ``other``."""
        if other.n:
            self._combine(other.n, other.mean, other.m2)

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        if self.n == 0:
            self.n, self.mean, self.m2 = n_b, mean_b.copy(), m2_b.copy()
            return
        if mean_b.shape != self.mean.shape:
            raise InputError(
                f"feature dimension changed from {self.mean.shape[0]} to {mean_b.shape[0]}."
            )
        n = self.n + n_b
        delta = mean_b - self.mean
        self.m2 += m2_b + np.outer(delta, delta) * (self.n * n_b / n)
        self.mean += delta * (n_b / n)
        self.n = n

    def allreduce(self) -> None:
        """Merge the accumulators of every JAX process into each (a no-op with one).

        float64 arrays travel as their raw bytes (viewed as uint32), so the
        reduction is exact whether or not JAX runs with x64 enabled.
        """
        if jax.process_count() == 1:
            return
        from jax.experimental import multihost_utils

        if self.mean is None:
            raise InputError(
                f"process {jax.process_index()} saw no features; every process needs at least one."
            )
        d = self.mean.shape[0]
        packed = np.concatenate(
            [np.asarray([self.n], np.float64), self.mean, self.m2.ravel()]
        ).view(np.uint32)
        gathered = np.asarray(multihost_utils.process_allgather(packed))
        merged = MomentAccumulator()
        for row in gathered:
            vals = np.ascontiguousarray(row).view(np.float64)
            merged._combine(int(vals[0]), vals[1 : d + 1], vals[d + 1 :].reshape(d, d))
        self.n, self.mean, self.m2 = merged.n, merged.mean, merged.m2

    def finalize(self, network: str | None = None) -> GaussianStats:
        """The mean and unbiased covariance (features of protocol ``network``); needs at
        least 2 samples."""
        if self.n < 2:
            raise InputError(
                f"statistics need at least 2 samples, got {self.n}; provide more images."
            )
        return GaussianStats(self.mean.copy(), self.m2 / (self.n - 1), self.n, network)


def check_comparable(a: GaussianStats, b: GaussianStats, where_a: str = "the first statistics",
                     where_b: str = "the second statistics") -> None:
    """Refuse to compare statistics of two different feature protocols or dimensions.

    Statistics whose :attr:`GaussianStats.network` is ``None`` (not known) pass
    against anything of the same dimension.

    Raises:
      InputError: naming both places (files) and both protocols.
    """
    if a.network is not None and b.network is not None and a.network != b.network:
        raise InputError(
            f"{where_a} holds {a.network} statistics but {where_b} holds {b.network}; a "
            "distance between different networks or protocols means nothing: compute both "
            "with the same one."
        )
    if a.dim != b.dim:
        raise InputError(
            f"{where_a} and {where_b} have different dimensions ({a.dim} vs {b.dim}); compute "
            "both with the same feature extractor and layer."
        )
