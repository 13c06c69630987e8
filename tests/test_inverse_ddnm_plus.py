"""DDNM+ (Wang et al. 2023, Eqs. 17-19) against its moments propagated in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_inverse import MU, V, gaussian_prior

from jaxgen import diffusion as D
from jaxgen.errors import InputError
from jaxgen.sampling import inverse as I

N, D_SHAPE = 4096, (4, 4, 1)
MASK = np.arange(16).reshape(4, 4, 1) % 2 == 0


def _run(noise_std, steps=50):
    op, process = I.Inpaint(MASK), D.VP()
    y = jnp.broadcast_to(op(jnp.full((1, *D_SHAPE), 1.7)), (N, *D_SHAPE))
    x, info = I.posterior_sample(gaussian_prior(process), None, process, jax.random.key(3), y,
                                 op, (N, *D_SHAPE), prediction="x0", method="ddnm+",
                                 noise_std=noise_std, solver="ddpm", steps=steps)
    return np.asarray(x), np.asarray(y), info


def _moments(ts, m, y, noise_std):
    """Mean and variance of one pixel (mask ``m``) after the DDNM+ steps, in float64.

    With the exact Gaussian denoiser ``D(x) = c0 + c1 x`` every step is affine in ``x``
    plus independent noise: ``x_s = coef ((1 - lam m) D(x) + lam m y) + b x + sqrt(gamma) z``.
    """
    p = D.VP()
    alpha = np.asarray(p.alpha(jnp.asarray(ts)), np.float64)
    sigma = np.asarray(p.sigma(jnp.asarray(ts)), np.float64)
    mean, var = 0.0, sigma[0] ** 2  # x_T = sigma(t_0) z
    for i in range(len(ts) - 1):
        a, s, a1, s1 = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        c1 = a * V / (a * a * V + s * s)
        c0 = MU - c1 * a * MU
        v = min(max((s1 / s) ** 2 * (s * s - (a / a1 * s1) ** 2), 0.0), s1 * s1)
        b = np.sqrt(s1 * s1 - v) / s
        coef = a1 - b * a
        lam = 1.0 if np.sqrt(v) >= coef * noise_std else np.sqrt(v) / (coef * noise_std)
        gamma = max(v - (coef * lam * noise_std) ** 2, 0.0)
        k = coef * (1 - lam * m) * c1 + b
        mean = k * mean + coef * (1 - lam * m) * c0 + coef * lam * m * y
        var = k * k * var + gamma
    return mean, var


def test_ddnm_plus_matches_its_closed_form_moments_and_is_ddnm_without_noise():
    noise_std = 0.3
    x, _, info = _run(noise_std)
    ts = info["timesteps"]
    x = x.reshape(N, -1).astype(np.float64)
    for j, m in enumerate(MASK.ravel()):
        mean, var = _moments(ts, float(m), 1.7 if m else 0.0, noise_std)
        # 4.5 standard errors of the sample moments, plus float32 rounding.
        assert abs(x[:, j].mean() - mean) < 4.5 * np.sqrt(var / N) + 1e-4, (j, mean)
        assert abs(x[:, j].var() - var) < 4.5 * var * np.sqrt(2 / N) + 1e-5, (j, var)
    # The measurement noise is not copied in: observed pixels are not y (DDNM's answer).
    assert x[:, MASK.ravel()].std(0).min() > 0.02
    clean, y0, _ = _run(0.0, steps=10)
    np.testing.assert_array_equal(clean[:, MASK[..., 0]], y0[:, MASK[..., 0]])


def test_ddnm_plus_is_refused_with_another_solver():
    with pytest.raises(InputError, match="solver='ddpm'"):
        I.posterior_sample(lambda *a: pytest.fail("traced"), None, D.VP(), jax.random.key(0),
                           jnp.zeros((1, *D_SHAPE)), I.Inpaint(MASK), (1, *D_SHAPE),
                           prediction="x0", method="ddnm+", noise_std=0.1)
