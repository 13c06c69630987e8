"""Inverse problems: operators pass adjoint tests; posteriors of a Gaussian prior are exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import diffusion as D
from jaxgen.errors import InputError
from jaxgen.sampling import inverse as I

SHAPE = (2, 8, 8, 3)
OPERATORS = {
    "inpaint": I.Inpaint(np.random.default_rng(0).random((8, 8, 1)) < 0.5),
    "super_resolution": I.SuperResolution(2),
    "colorization": I.Colorization(),
    "blur": I.GaussianBlur(1.5, size=5),
}


@pytest.mark.parametrize("name", list(OPERATORS))
def test_operator_adjoint_and_pseudo_inverse(name):
    op = OPERATORS[name]
    with jax.enable_x64(True):
        kx, ky = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, SHAPE, jnp.float64)
        y = jax.random.normal(ky, op.out_shape(SHAPE), jnp.float64)
        assert op(x).shape == y.shape
        # <A x, y> = <x, A^T y>: float64 sums of ~400 products of size ~1.
        np.testing.assert_allclose(jnp.vdot(op(x), y), jnp.vdot(x, op.adjoint(y)), rtol=1e-12)
        # Moore-Penrose: A A^+ A = A (the blur's truncated spectrum is below its cutoff).
        atol = 1e-3 if name == "blur" else 1e-12
        np.testing.assert_allclose(op(op.pinv(op(x))), op(x), atol=atol)
        # gram_solve inverts r2 A A^T + s2 I on the range: A^T of it, times the Gram matrix.
        r = op(x)
        back = op.gram_solve(0.7 * op(op.adjoint(r)) + 0.2 * r, 0.7, 0.2)
        np.testing.assert_allclose(op.adjoint(back), op.adjoint(r), atol=1e-10)


# A Gaussian prior N(MU, V I) on 4x4x1 images and its exact denoiser.
MU, V = 0.3, 0.5


def gaussian_prior(process):
    def model_fn(params, x, t, cond):
        a = process.alpha(t).reshape(-1, 1, 1, 1)
        s = process.sigma(t).reshape(-1, 1, 1, 1)
        return MU + a * V / (a * a * V + s * s) * (x - a * MU)

    return model_fn


def exact_posterior(op, y, noise_std, d_shape):
    """Mean and covariance of N(MU, V I) conditioned on y = A x + N(0, noise_std^2 I)."""
    d = int(np.prod(d_shape))
    basis = np.eye(d).reshape(d, *d_shape)
    with jax.enable_x64(True):
        a = np.stack([np.asarray(op(jnp.asarray(e[None]))).ravel() for e in basis], 1)
    prec = np.eye(d) / V + a.T @ a / noise_std**2
    cov = np.linalg.inv(prec)
    return cov @ (MU / V * np.ones(d) + a.T @ np.ravel(y) / noise_std**2), cov


@pytest.mark.parametrize(
    "op,process,noise_std",
    [
        (I.SuperResolution(2), D.EDM(), 0.1),
        pytest.param(
            I.Inpaint(np.arange(16).reshape(4, 4, 1) % 3 == 0),
            D.VP(num_steps=None),
            0.05,
            marks=pytest.mark.slow,
        ),
    ],
    ids=["sr-edm", "inpaint-vp"],
)
def test_pigdm_samples_the_exact_gaussian_posterior(op, process, noise_std):
    n, d_shape = 8192, (4, 4, 1)
    x_true = MU + np.sqrt(V) * np.random.default_rng(1).standard_normal((1, *d_shape))
    y1 = np.asarray(op(jnp.asarray(x_true))) + noise_std * 0.3  # a fixed measurement
    mean, cov = exact_posterior(op, y1, noise_std, d_shape)
    y = jnp.broadcast_to(jnp.asarray(y1, jnp.float32), (n, *y1.shape[1:]))
    x, info = I.posterior_sample(
        gaussian_prior(process),
        None,
        process,
        jax.random.key(2),
        y,
        op,
        (n, *d_shape),
        prediction="x0",
        method="pigdm",
        noise_std=noise_std,
        data_var=V,
        solver="dpmpp_2m",
        steps=40,
    )
    x = np.asarray(x, np.float64).reshape(n, -1)
    m, c = x.mean(0), np.cov(x.T)
    # 4.5 standard errors of the sample moments (p ~ 1e-5 per entry), plus 0.01 for
    # the solver's 40-step bias.
    se_m = x.std(0) / np.sqrt(n)
    z = x - m
    se_c = np.std(z[:, :, None] * z[:, None, :], 0) / np.sqrt(n)
    assert np.all(np.abs(m - mean) < 4.5 * se_m + 0.01), np.abs(m - mean).max()
    assert np.all(np.abs(c - cov) < 4.5 * se_c + 0.01), np.abs(c - cov).max()
    assert info["nfe"] == 40


def test_ddnm_inpainting_keeps_observed_pixels_and_samples_the_rest_from_the_prior():
    # With an independent-pixel prior the posterior of the missing pixels is the prior.
    n, d_shape = 4096, (4, 4, 1)
    mask = np.arange(16).reshape(4, 4, 1) % 2 == 0
    op = I.Inpaint(mask)
    y = jnp.broadcast_to(op(jnp.full((1, *d_shape), 1.7)), (n, *d_shape))
    process = D.VP()
    x, _ = I.posterior_sample(
        gaussian_prior(process),
        None,
        process,
        jax.random.key(3),
        y,
        op,
        (n, *d_shape),
        prediction="x0",
        method="ddnm",
        solver="dpmpp_2m",
        steps=40,
    )
    x = np.asarray(x)
    np.testing.assert_array_equal(x[:, mask[..., 0]], np.asarray(y)[:, mask[..., 0]])
    free = x[:, ~mask[..., 0]].astype(np.float64)
    # 4.5 standard errors, plus 0.01 for the solver's 40-step bias. (Ancestral DDPM
    # at 100 steps would be 10% low in variance: it drops Var[x0 | x_t] at each step.)
    assert np.all(np.abs(free.mean(0) - MU) < 4.5 * np.sqrt(V / n) + 0.01)
    assert np.all(np.abs(free.var(0) - V) < 4.5 * V * np.sqrt(2 / n) + 0.01)


@pytest.mark.slow  # ~7 s: two compilations with VJPs
def test_dps_moves_samples_towards_the_measurement():
    n, d_shape = 256, (4, 4, 1)
    op, process = I.SuperResolution(2), D.EDM()
    y = jnp.full((n, 2, 2, 1), 1.5)
    run = lambda method, **k: np.asarray(
        I.posterior_sample(
            gaussian_prior(process),
            None,
            process,
            jax.random.key(4),
            y,
            op,
            (n, *d_shape),
            prediction="x0",
            method=method,
            solver="ddim",
            steps=50,
            **k,
        )[0]
    )
    residual = lambda x: np.sqrt(np.mean((np.asarray(op(jnp.asarray(x))) - 1.5) ** 2))
    free = run("dps", zeta=1e-9)  # a negligible step: prior samples
    guided = run("dps", zeta=10.0)  # measured: 0.12 vs 1.24
    assert residual(guided) < 0.2 * residual(free), (residual(guided), residual(free))


def test_bad_input_is_refused_before_tracing():
    fn = lambda *a: pytest.fail("traced")
    process, op = D.EDM(), I.SuperResolution(2)
    kw = dict(prediction="x0")
    key = jax.random.key(0)
    with pytest.raises(InputError, match="y has shape"):
        I.posterior_sample(fn, None, process, key, jnp.zeros((2, 3, 3, 1)), op, (2, 4, 4, 1), **kw)
    with pytest.raises(InputError, match="does not divide"):
        I.posterior_sample(fn, None, process, key, jnp.zeros((2, 2, 2, 1)), op, (2, 5, 5, 1), **kw)
    y = jnp.zeros((2, 2, 2, 1))
    with pytest.raises(InputError, match="noiseless"):
        I.posterior_sample(
            fn, None, process, key, y, op, (2, 4, 4, 1), method="ddnm", noise_std=0.1, **kw
        )
    with pytest.raises(InputError, match="method"):
        I.posterior_sample(fn, None, process, key, y, op, (2, 4, 4, 1), method="mcg", **kw)
    with pytest.raises(InputError, match="Colorization"):
        I.Colorization().out_shape((2, 4, 4, 1))
