"""A Gaussian mixture with a closed-form denoiser: the reference problem for samplers.

For data ``x0 ~ sum_k w_k N(mu_k, S_k)`` the noisy marginal is
``p_t(x) = sum_k w_k N(x; alpha mu_k, alpha^2 S_k + sigma^2 I)`` and the exact
posterior mean is ``E[x0 | x_t] = sum_k r_k(x_t) (mu_k + alpha S_k C_k^-1 (x_t - alpha mu_k))``
with ``C_k = alpha^2 S_k + sigma^2 I`` and responsibilities ``r_k``. Fed to a
sampler as an ``x0`` model, it makes the probability-flow ODE exact, so any
error in the samples is the solver's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
    """Mixture of ``K`` Gaussians in ``d`` dimensions.

    Args:
      means: ``[K, d]``.
      covs: ``[K, d, d]``, symmetric positive definite.
      weights: ``[K]``, summing to one.
    """

    means: np.ndarray
    covs: np.ndarray
    weights: np.ndarray

    @property
    def dim(self) -> int:
        """Data dimension ``d``."""
        return self.means.shape[1]

    def mean(self) -> np.ndarray:
        """Mean of the mixture, ``[d]``."""
        return np.einsum("k,kd->d", self.weights, self.means)

    def cov(self) -> np.ndarray:
        """Covariance of the mixture, ``[d, d]``."""
        m = self.mean()
        second = self.covs + np.einsum("ki,kj->kij", self.means, self.means)
        return np.einsum("k,kij->ij", self.weights, second) - np.outer(m, m)

    def sample(self, key, n: int) -> jax.Array:
        """``n`` exact draws, ``[n, d]``."""
        k_c, k_z = jax.random.split(key)
        comp = jax.random.choice(k_c, len(self.weights), (n,), p=jnp.asarray(self.weights))
        chol = jnp.asarray(np.linalg.cholesky(self.covs))[comp]
        z = jax.random.normal(k_z, (n, self.dim))
        return jnp.asarray(self.means)[comp] + jnp.einsum("nij,nj->ni", chol, z)

    def denoiser(self, process):
        """``model_fn(params, x_t, t, cond) -> E[x0 | x_t]`` (an ``x0`` prediction) under
        ``process``: the model contract, with no weights (``params`` is ignored; pass ``None``).

        ``x_t`` may have any shape ``[B, ...]`` with ``d`` elements per example.
        """
        # C_k = U_k diag(alpha^2 e_k + sigma^2) U_k^T with S_k = U_k diag(e_k) U_k^T: the
        # solve and log-determinant become elementwise (and cheap to compile).
        e, u = np.linalg.eigh(self.covs)  # [K, d], [K, d, d]
        log_w = np.log(self.weights)

        def model_fn(params, x, t, cond=None):
            del params  # exact: nothing learned
            dtype = x.dtype
            flat = x.reshape(x.shape[0], -1)  # [B, d]
            t = jnp.broadcast_to(jnp.asarray(t, dtype), (x.shape[0],))
            a = process.alpha(t)[:, None, None]  # [B, 1, 1]
            s = process.sigma(t)[:, None, None]
            uk, mu = jnp.asarray(u, dtype), jnp.asarray(self.means, dtype)
            c = a * a * jnp.asarray(e, dtype) + s * s  # [B, K, d] eigenvalues of C_k
            r = jnp.einsum("kji,bkj->bki", uk, flat[:, None, :] - a * mu)  # U^T (x - a mu)
            logp = -0.5 * jnp.sum(r * r / c + jnp.log(c), -1) + jnp.asarray(log_w, dtype)
            resp = jax.nn.softmax(logp, axis=-1)
            shrink = a * jnp.asarray(e, dtype) * r / c  # U^T a S_k C_k^-1 (x - a mu)
            post = mu + jnp.einsum("kij,bkj->bki", uk, shrink)
            return jnp.einsum("bk,bkd->bd", resp, post).reshape(x.shape)

        return model_fn
