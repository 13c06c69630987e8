"""Probability-flow likelihood against the Gaussian mixture's closed-form density."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import diffusion as D
from jaxgen.errors import InputError
from jaxgen.sampling import likelihood as L

MIXTURE = D.GaussianMixture(
    np.array([[1.0, 0.0], [-1.0, 0.5]]),
    np.array([[[0.1, 0.03], [0.03, 0.08]], 0.2 * np.eye(2)]),
    np.array([0.3, 0.7]),
)


def mixture_logp(process, t, x, xp=np):
    """``log p_t(x) = log sum_k w_k N(x; alpha mu_k, alpha^2 S_k + sigma^2 I)``, ``x: [B, d]``."""
    with jax.ensure_compile_time_eval():
        a, s = float(process.alpha(jnp.asarray(t))), float(process.sigma(jnp.asarray(t)))
    cov = a * a * MIXTURE.covs + s * s * np.eye(MIXTURE.dim)
    prec, (_, logdet) = np.linalg.inv(cov), np.linalg.slogdet(cov)
    r = x[:, None, :] - a * MIXTURE.means  # [B, K, d]
    quad = xp.einsum("bki,kij,bkj->bk", r, prec, r)
    logn = -0.5 * (quad + logdet + MIXTURE.dim * math.log(2 * math.pi)) + np.log(MIXTURE.weights)
    return (jax.nn.logsumexp if xp is jnp else _np_logsumexp)(logn, axis=1)


def _np_logsumexp(a, axis):
    m = a.max(axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis, keepdims=True))).squeeze(axis)


def _points(process, t, n=16):
    """Points distributed like ``x_t`` at ``t``."""
    x0 = MIXTURE.sample(jax.random.key(7), n)
    z = jax.random.normal(jax.random.key(8), x0.shape)
    return process.alpha(t) * x0 + process.sigma(t) * z


CASES = [(D.VP(num_steps=None), "eps"), (D.EDM(), "x0"), (D.Flow(), "velocity")]


def _model(process, prediction):
    x0_fn = MIXTURE.denoiser(process)

    def model_fn(params, x, t, cond):
        x0 = x0_fn(params, x, t, cond)
        return D.convert(x0, "x0", prediction, x_t=x, t=t, process=process)

    return model_fn


@pytest.mark.parametrize("process,prediction", CASES, ids=["vp", "edm", "flow"])
def test_exact_divergence_gives_the_closed_form_density(process, prediction):
    t0, t1 = L._ends(process, None, None)
    x = _points(process, t0)
    # The exact terminal density, so that what is measured is the ODE and divergence.
    prior = lambda z: mixture_logp(process, t1, z, jnp)
    logp, info = L.log_likelihood(
        _model(process, prediction), None, process, x, prediction=prediction, prior_logp=prior
    )
    want = mixture_logp(process, t0, np.asarray(x, np.float64))
    # RK4 with 256 steps in half-log-SNR (h ~ 0.05): error ~ 1e-5; float32 rounding
    # over 256 steps ~ 1e-5 relative to log-densities of size ~ 1..10.
    err = np.abs(np.asarray(logp) - want) / MIXTURE.dim
    assert err.max() < 1e-3, err
    assert info["nfe"] == 4 * 256 * 2


def test_default_prior_is_the_only_approximation():
    # The default N(0, sigma_T^2) misses the data's share of the terminal marginal
    # (on EDM the mean shift: ~ x_T mu / 80^2 ~ 0.01 nats); that mismatch at x_end
    # is the whole difference from the closed form.
    process = D.EDM()
    x = _points(process, 0.002)
    logp, info = L.log_likelihood(_model(process, "x0"), None, process, x, prediction="x0")
    want = mixture_logp(process, 0.002, np.asarray(x, np.float64))
    x_end = np.asarray(info["x_end"], np.float64)
    gauss = -0.5 * (x_end**2 / 80.0**2 + np.log(2 * np.pi * 80.0**2)).sum(1)
    mismatch = gauss - mixture_logp(process, 80.0, x_end)
    assert np.abs(mismatch).max() > 3e-3  # the test sees the prior
    assert np.abs(np.asarray(logp) - want - mismatch).max() / 2 < 1e-3


@pytest.mark.slow  # ~6 s each: 256 probes x 64 RK4 steps
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_within_three_standard_errors(probe):
    process = D.EDM()
    t0, t1 = L._ends(process, None, None)
    x = _points(process, t0, n=4)
    reps = 64  # every row of the repeated batch draws its own probe
    logp, _ = L.log_likelihood(
        _model(process, "x0"),
        None,
        process,
        jnp.repeat(x, reps, axis=0),
        prediction="x0",
        divergence="hutchinson",
        probe=probe,
        key=jax.random.key(3),
        steps=64,
        prior_logp=lambda z: mixture_logp(process, t1, z, jnp),
    )
    est = np.asarray(logp, np.float64).reshape(4, reps)
    exact, _ = L.log_likelihood(
        _model(process, "x0"),
        None,
        process,
        x,
        prediction="x0",
        steps=64,
        prior_logp=lambda z: mixture_logp(process, t1, z, jnp),
    )
    se = est.std(1, ddof=1) / np.sqrt(reps)
    assert np.all(se > 0)
    assert np.all(np.abs(est.mean(1) - np.asarray(exact)) < 3 * se), (est.mean(1), exact, se)


def test_bits_per_dim_of_uint8_images():
    # Independent N(0, 0.25) pixels: log p(x) is known, so bpd is a closed form of x.
    process, var = D.EDM(), 0.25

    def model_fn(params, x, t, cond):
        return var / (var + t.reshape((-1,) + (1,) * (x.ndim - 1)) ** 2) * x

    images = jax.random.randint(jax.random.key(0), (3, 2, 2, 1), 100, 156).astype(jnp.uint8)
    key = jax.random.key(1)
    bpd, _ = L.bits_per_dim(model_fn, None, process, images, key, prediction="x0", steps=128)
    x = np.asarray(L.dequantize(images, jax.random.split(key)[0]), np.float64).reshape(3, -1)
    s2 = var + 0.002**2  # the density at t_start = sigma_min
    logp = -0.5 * (x * x / s2 + np.log(2 * np.pi * s2)).sum(1)
    want = -(logp + 4 * np.log(2 / 255)) / (4 * np.log(2))
    np.testing.assert_allclose(bpd, want, atol=1e-3)
    assert np.all((np.asarray(x) >= -1 - 1 / 255) & (np.asarray(x) < 1 + 1 / 255))


def test_bad_input_is_refused():
    process = D.EDM()
    fn = lambda *a: pytest.fail("traced")
    x = jnp.zeros((2, 2))
    with pytest.raises(InputError, match="key="):
        L.log_likelihood(fn, None, process, x, prediction="x0", divergence="hutchinson")
    with pytest.raises(InputError, match="divergence"):
        L.log_likelihood(fn, None, process, x, prediction="x0", divergence="skilling")
    with pytest.raises(InputError, match="t_start"):
        L.log_likelihood(fn, None, process, x, prediction="x0", t_start=10.0, t_end=1.0)
    with pytest.raises(InputError, match="uint8"):
        L.bits_per_dim(fn, None, process, x, jax.random.key(0), prediction="x0")
