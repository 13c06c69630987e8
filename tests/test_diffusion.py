"""Processes, prediction conversions, preconditioning and the training loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import diffusion as D
from jaxgen.errors import InputError

PROCESSES = [
    D.VP(),
    D.VP("cosine"),
    D.VP(num_steps=None),
    D.VP("cosine", None),
    D.VP(zero_terminal_snr=True),
    D.VP("linear", None, zero_terminal_snr=True),
    D.VP(shift=2.0),
    D.EDM(),
    D.Flow(),
    D.Flow("gvp"),
]


def _inner_times(p, n=9):
    # Strictly inside (0, t_max): conversions are exact there for every pair.
    return jnp.linspace(p.t_min + 0.05 * (p.t_max - p.t_min), 0.95 * p.t_max, n)


def test_ddpm_tables_match_published_schedules():
    # Ho et al. (2020): betas = linspace(1e-4, 0.02, 1000), alpha_bar = cumprod(1 - beta).
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    p = D.VP()
    t = jnp.arange(1, 1001) / 1000
    # float32 evaluation of float64 tables: relative error ~1e-7 per operation.
    np.testing.assert_allclose(np.asarray(p.alpha(t)) ** 2, abar, rtol=2e-6, atol=1e-9)
    # Nichol & Dhariwal (2021) Eq. 17, betas clipped at 0.999.
    f = lambda u: np.cos((u / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    k = np.arange(1000)
    abar_cos = np.cumprod(1 - np.minimum(1 - f(k + 1) / f(k), 0.999))
    np.testing.assert_allclose(
        np.asarray(D.VP("cosine").alpha(t)) ** 2, abar_cos, rtol=2e-5, atol=1e-9
    )


def test_continuous_vp_matches_score_sde_and_nichol():
    t = jnp.linspace(0.01, 1.0, 7)
    log_abar = -(0.1 * t + 0.5 * 19.9 * t**2)  # score_sde VP-SDE, beta in [0.1, 20]
    np.testing.assert_allclose(D.VP(num_steps=None).alpha(t) ** 2, np.exp(log_abar), rtol=1e-5)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(
        D.VP("cosine", None).alpha(t * 0.99) ** 2, f(t * 0.99) / f(0.0), rtol=1e-4, atol=1e-7
    )


@pytest.mark.parametrize("p", PROCESSES, ids=repr)
def test_process_identities(p):
    t = _inner_times(p)
    a, s = p.alpha(t), p.sigma(t)
    np.testing.assert_allclose(p.logsnr(t), np.log(a**2 / s**2), rtol=1e-4, atol=1e-4)
    # Inverse: float32 round trip through log-SNR, t-error ~ eps32 / |dlogsnr/dt|.
    np.testing.assert_allclose(p.t_from_logsnr(p.logsnr(t)), t, rtol=1e-4, atol=1e-5)
    assert np.all(np.diff(np.asarray(p.logsnr(t))) < 0)
    if isinstance(p, D.VP):
        np.testing.assert_allclose(a**2 + s**2, 1.0, atol=1e-6)
    _assert_derivatives_match_central_differences(p, np.asarray(t, np.float64))
    assert float(p.sigma(jnp.asarray(0.0))) == 0.0 and float(p.alpha(jnp.asarray(0.0))) == 1.0


def _assert_derivatives_match_central_differences(p, t):
    """d_alpha and d_sigma against float64 central differences, to what the math allows.

    ``(f(t + h) - f(t - h)) / 2h = f'(t) + h^2 f'''(t) / 6 + O(h^4)``, plus rounding
    ``<= eps64 (|f| + |t f'|) / h`` (each f rounded, each ``t +- h`` rounded). With
    ``h = 1e-5 t_max`` the truncation is <= ~1e-8 (``|f'''| t_max^3 <= ~5e2`` on these
    schedules) and the rounding ~2e-11; the bound is those two terms, ``f'''`` by
    autodiff at ``t`` (the ``O(h^4)`` rest is < 1e-15), times 2. A discrete VP
    interpolates linearly between the grid points ``k / N``, where its derivative
    jumps: it is tested at segment midpoints, with ``h`` far inside the segment.
    """
    with jax.enable_x64(True):
        if isinstance(p, D.VP) and p.num_steps:
            t = (np.floor(t * p.num_steps) + 0.5) / p.num_steps
        t = jnp.asarray(t, jnp.float64)
        h = 1e-5 * p.t_max
        for f, df in ((p.alpha, p.d_alpha), (p.sigma, p.d_sigma)):
            fd = (f(t + h) - f(t - h)) / (2 * h)
            d3 = np.asarray(jax.vmap(jax.grad(jax.grad(jax.grad(f))))(t))
            got = df(t)
            rounding = np.finfo(np.float64).eps * (np.abs(f(t)) + np.abs(t * got)) / h
            bound = 2 * (h**2 / 6 * np.abs(d3) + rounding)
            assert got.dtype == jnp.float64
            err = np.abs(np.asarray(got - fd))
            assert np.all(err <= bound), (f.__name__, err, bound)


def test_zero_terminal_snr_and_shift():
    p, base = D.VP(zero_terminal_snr=True), D.VP()
    assert float(p.alpha(jnp.asarray(1.0))) == 0.0
    # Lin et al. (2024) Algorithm 1 keeps the first alpha_bar.
    np.testing.assert_allclose(p.alpha(jnp.asarray(1e-3)), base.alpha(jnp.asarray(1e-3)), rtol=1e-6)
    shifted = D.VP(shift=4.0)
    t = jnp.linspace(0.1, 0.9, 5)
    np.testing.assert_allclose(shifted.logsnr(t), base.logsnr(t) - 2 * np.log(4.0), rtol=1e-5)
    assert D.Flow().alpha(1.0) == 0.0 and float(D.Flow("gvp").alpha(jnp.asarray(1.0))) == 0.0


@pytest.mark.parametrize("bad", [dict(schedule="quad"), dict(num_steps=1), dict(shift=0.0)])
def test_bad_process_config(bad):
    with pytest.raises(InputError):
        D.VP(**bad)


def test_bad_edm_and_flow_config():
    with pytest.raises(InputError):
        D.EDM(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(InputError, match="path"):
        D.Flow("cosine")


@pytest.mark.parametrize(
    "p", [D.VP(), D.VP("cosine", None), D.EDM(), D.Flow(), D.Flow("gvp")], ids=repr
)
def test_conversions_round_trip_every_pair(p):
    key = jax.random.key(0)
    x0 = jax.random.normal(key, (9, 3))
    eps = jax.random.normal(jax.random.fold_in(key, 1), (9, 3))
    t = _inner_times(p)
    x_t = p.alpha(t)[:, None] * x0 + p.sigma(t)[:, None] * eps
    for src in D.PREDICTIONS:
        pred = D.from_x0_eps(x0, eps, src, t=t, process=p)
        for dst in D.PREDICTIONS:
            got = D.convert(pred, src, dst, x_t=x_t, t=t, process=p)
            want = D.from_x0_eps(x0, eps, dst, t=t, process=p)
            # Affine maps with coefficients up to ~1/sigma_min^2 (score on EDM);
            # float32 relative error ~1e-6 times that conditioning.
            scale = 1 + np.abs(np.asarray(want))
            assert np.max(np.abs(np.asarray(got - want)) / scale) < 2e-3, (src, dst)


def test_velocity_is_time_derivative():
    # Flow matching target: d x_t / dt at fixed (x0, eps).
    p = D.Flow("gvp")
    x0, eps, t = jnp.array([0.3]), jnp.array([-1.2]), jnp.array(0.4)
    x_of_t = lambda t: p.alpha(t) * x0 + p.sigma(t) * eps
    _, dx = jax.jvp(x_of_t, (t,), (jnp.ones_like(t),))
    np.testing.assert_allclose(D.from_x0_eps(x0, eps, "velocity", t=t, process=p), dx, rtol=1e-6)


def test_convert_rejects_unknown_type():
    with pytest.raises(InputError, match="eps, x0, v, velocity, score"):
        D.convert(jnp.zeros(2), "noise", "x0", x_t=jnp.zeros(2), t=0.5, process=D.Flow())


def test_edm_precond_matches_table_1():
    sd = 0.5
    raw_calls = []

    def raw(params, x_in, c_noise, cond):
        raw_calls.append((x_in, c_noise))
        return params * x_in

    model = D.edm_precond(raw, D.EDM(), sigma_data=sd)
    x, sigma = jnp.array([[1.0, -2.0]]), jnp.array([3.0])
    out = model(2.0, x, sigma, None)
    c_skip = sd**2 / (9 + sd**2)
    c_out = 3 * sd / np.sqrt(9 + sd**2)
    c_in = 1 / np.sqrt(9 + sd**2)
    np.testing.assert_allclose(raw_calls[0][1], np.log(3.0) / 4, rtol=1e-6)
    np.testing.assert_allclose(out, c_skip * x + c_out * 2.0 * c_in * x, rtol=1e-6)
    # On a VP process the same wrapper acts on x / alpha with sigma~ = sigma / alpha.
    vp = D.VP(num_steps=None)
    t = jnp.array([0.5])
    a, s = vp.alpha(t), vp.sigma(t)
    out_vp = D.edm_precond(raw, vp, sd)(2.0, x * a, t, None)
    edm_sigma = s / a
    want = D.edm_precond(raw, D.EDM(), sd)(2.0, x, edm_sigma, None)
    np.testing.assert_allclose(out_vp, want, rtol=1e-5)


def _mixture():
    return D.GaussianMixture(
        np.array([[1.0, 0.0], [-1.0, 0.5]]),
        np.array([[[0.1, 0.03], [0.03, 0.08]], 0.2 * np.eye(2)]),
        np.array([0.3, 0.7]),
    )


def test_mixture_posterior_mean_is_bayes_optimal():
    # E[x0 | x_t] minimises the x0 MSE: perturbing it can only increase the loss.
    gm, p = _mixture(), D.VP(num_steps=None)
    key = jax.random.key(3)
    x0 = gm.sample(key, 5000)
    t = jnp.full((5000,), 0.4)
    x_t = p.alpha(t)[:, None] * x0 + p.sigma(t)[:, None] * jax.random.normal(key, x0.shape)
    post = jax.jit(gm.denoiser(p))(None, x_t, t, None)
    best = float(jnp.mean((post - x0) ** 2))
    for delta in (0.05, -0.05):
        assert float(jnp.mean((post * (1 + delta) - x0) ** 2)) > best
    # Limits: identity at t = 0 and the data mean at alpha = 0.
    np.testing.assert_allclose(gm.denoiser(D.Flow())(None, x0[:5], 0.0), x0[:5], atol=1e-6)
    np.testing.assert_allclose(
        gm.denoiser(D.Flow())(None, x0[:5], 1.0), np.broadcast_to(gm.mean(), (5, 2)), atol=1e-6
    )
    # Entries of the sample covariance have sd <= sqrt(1.5 / 5000) ~ 0.017 here: 4 sd.
    np.testing.assert_allclose(np.cov(np.asarray(x0).T), gm.cov(), atol=0.07)


def _model(params, x, t, cond):
    return params * x + 0.1 * t[:, None]


def test_loss_is_weighted_mean_of_per_example_terms():
    p = D.VP(num_steps=None)
    x0 = jax.random.normal(jax.random.key(0), (16, 3))
    key = jax.random.key(1)
    value, metrics = D.loss(_model, 0.7, x0, None, key, process=p, prediction="eps")
    # Reproduce by hand with the same key split (time, noise, dropout).
    k_t, k_eps, _ = jax.random.split(key, 3)
    t = jax.random.uniform(k_t, (16,), minval=p.t_min, maxval=p.t_max)
    eps = jax.random.normal(k_eps, x0.shape)
    x_t = p.alpha(t)[:, None] * x0 + p.sigma(t)[:, None] * eps
    want = jnp.mean(jnp.mean((_model(0.7, x_t, t, None) - eps) ** 2, axis=1))
    np.testing.assert_allclose(value, want, rtol=1e-6)
    assert metrics["loss"] == value
    # The gradient in closed form: L(w) = mean_{b,d} (w x_t + 0.1 t - eps)^2, so
    # dL/dw = mean_{b,d} 2 (w x_t + 0.1 t - eps) x_t, in float64 from the same draws.
    t64, eps64, x064 = (np.asarray(a, np.float64) for a in (t, eps, x0))
    a64 = np.sqrt(np.exp(-(0.1 * t64 + 0.5 * 19.9 * t64**2)))[:, None]  # score_sde VP
    xt64 = a64 * x064 + np.sqrt(1 - a64**2) * eps64
    terms = 2 * (0.7 * xt64 + 0.1 * t64[:, None] - eps64) * xt64
    grad = jax.jit(
        jax.grad(lambda w: D.loss(_model, w, x0, None, key, process=p, prediction="eps")[0])
    )
    # float32 forward and backward: each of the 48 terms is right to a few eps32
    # (~2e-7 relative), so the mean is right to that times the mean of |terms|.
    assert abs(float(grad(0.7)) - terms.mean()) <= 1e-6 * np.abs(terms).mean()
    # A weighted loss: min(SNR, 5) on the x0 error is min(SNR, 5) / SNR on the eps error.
    snr = a64[:, 0] ** 2 / (1 - a64[:, 0] ** 2)
    weighted = jax.grad(
        lambda w: D.loss(
            _model, w, x0, None, key, process=p, prediction="eps", weighting="min_snr"
        )[0]
    )
    w_terms = (np.minimum(snr, 5.0) / snr)[:, None] * terms
    assert abs(float(weighted(0.7)) - w_terms.mean()) <= 1e-6 * np.abs(w_terms).mean()


def test_min_snr_is_the_same_objective_for_every_prediction():
    # Hang et al. (2023): min(SNR, gamma) on the x0 error; for eps that is
    # min(SNR, gamma) / SNR on the eps error. A perfect-x0-offset model gives
    # the same weighted loss whatever it predicts.
    p = D.VP(num_steps=None)
    x0 = jax.random.normal(jax.random.key(0), (32, 4))
    key = jax.random.key(5)
    values = []
    for pred in ("eps", "x0", "v", "velocity"):

        def model(params, x_t, t, cond, pred=pred):
            x0_hat = D.to_x0_eps(x_t, "eps", x_t=x_t, t=t, process=p)[0] * 0 + params
            return D.convert(x0_hat, "x0", pred, x_t=x_t, t=t, process=p)

        values.append(
            D.loss(model, 0.3, x0, None, key, process=p, prediction=pred, weighting="min_snr")[0]
        )
    np.testing.assert_allclose(values, values[0], rtol=1e-3)  # float32 conversions


def test_edm_loss_matches_karras_training_loss():
    # EDM training/loss.py: sigma = exp(N(-1.2, 1.2)), weight = (s^2+sd^2)/(s sd)^2,
    # loss = weight * (D(y + n) - y)^2 with D the preconditioned x0 predictor.
    p = D.EDM()
    raw = lambda w, x_in, c_noise, cond: w * x_in
    model = D.edm_precond(raw, p, 0.5)
    y = jax.random.normal(jax.random.key(0), (8, 2, 2, 1))
    key = jax.random.key(2)
    value, _ = D.loss(
        model,
        0.2,
        y,
        None,
        key,
        process=p,
        prediction="x0",
        time_sampler="lognormal",
        weighting="edm",
    )
    k_t, k_eps, _ = jax.random.split(key, 3)
    sigma = jnp.exp(-1.2 + 1.2 * jax.random.normal(k_t, (8,)))
    n = jax.random.normal(k_eps, y.shape) * sigma[:, None, None, None]
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    err = jnp.mean(((model(0.2, y + n, sigma, None) - y) ** 2).reshape(8, -1), axis=1)
    np.testing.assert_allclose(value, jnp.mean(weight * err), rtol=1e-4)


def test_time_samplers_and_p2_and_huber():
    key = jax.random.key(0)
    t = D.discrete_time()(key, 1000, D.VP(num_steps=10))
    assert set(np.unique(np.asarray(t) * 10).round().astype(int)) == set(range(1, 11))
    with pytest.raises(InputError, match="discrete"):
        D.discrete_time()(key, 4, D.EDM())
    t = D.logit_normal_time()(key, 4000, D.Flow())
    assert 0 < float(t.min()) and float(t.max()) < 1 and abs(float(t.mean()) - 0.5) < 0.02
    t = D.lognormal_time()(key, 4000, D.EDM())
    # ln sigma ~ N(-1.2, 1.2^2): the sample mean has standard error 1.2/sqrt(4000) ~ 0.02.
    assert abs(float(jnp.log(t).mean()) + 1.2) < 0.08
    p = D.VP(num_steps=None)
    tt = jnp.array([0.3])
    snr = float(jnp.exp(p.logsnr(tt))[0])
    np.testing.assert_allclose(D.p2_weight(1.0, 1.0)(tt, p), snr / (1 + snr), rtol=1e-5)
    err = jnp.full((1, 4), 0.5)
    huber = D.pseudo_huber(0.1)(err, jnp.zeros_like(err), tt, p)
    np.testing.assert_allclose(huber, np.sqrt(0.25 + 0.01) - 0.1, rtol=1e-6)
    sched = D.pseudo_huber(0.1, scheduled=True)(err, jnp.zeros_like(err), tt, p)
    assert float(sched[0]) != float(huber[0])


def test_label_dropout_replaces_condition_with_null():
    cond = {"label": jnp.arange(1000)}
    dropped = D.drop_labels(cond, {"label": jnp.array([-1])}, jax.random.key(0), 0.25)
    frac = float(jnp.mean(dropped["label"] == -1))
    assert abs(frac - 0.25) < 0.05  # binomial sd = 0.014 at n = 1000
    kept = dropped["label"] != -1
    assert np.array_equal(np.asarray(dropped["label"])[kept], np.arange(1000)[kept])


def test_loss_rejects_bad_configuration():
    x0 = jnp.zeros((2, 3))
    kw = dict(process=D.VP(), prediction="eps")
    with pytest.raises(InputError, match="weighting"):
        D.loss(_model, 1.0, x0, None, jax.random.key(0), weighting="snr", **kw)
    with pytest.raises(InputError, match="null_cond"):
        D.loss(_model, 1.0, x0, {"y": jnp.zeros(2)}, jax.random.key(0), label_dropout=0.1, **kw)
    with pytest.raises(InputError, match="prediction"):
        D.loss(_model, 1.0, x0, None, jax.random.key(0), process=D.VP(), prediction="noise")


def test_clean_point_limits():
    # At sigma = 0 an x0 prediction implies eps = 0 (the t -> 0 limit for a
    # density with finite score) instead of 0 / 0.
    p = D.EDM()
    x = jnp.ones((2, 3))
    x0, eps = D.to_x0_eps(x, "x0", x_t=x, t=jnp.zeros(2), process=p)
    assert np.array_equal(np.asarray(eps), np.zeros((2, 3))) and np.array_equal(x0, x)


def test_flow_matching_loss_is_rectified_flow_objective():
    # Esser et al. (2024), Eq. 2 with the logit-normal t of Eq. 19: ||v(x_t) - (eps - x0)||^2.
    p = D.Flow()
    x0 = jax.random.normal(jax.random.key(0), (8, 3))
    key = jax.random.key(4)
    value, _ = D.loss(
        _model, 0.4, x0, None, key, process=p, prediction="velocity", time_sampler="logit_normal"
    )
    k_t, k_eps, _ = jax.random.split(key, 3)
    t = jax.nn.sigmoid(jax.random.normal(k_t, (8,)))
    eps = jax.random.normal(k_eps, x0.shape)
    x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
    want = jnp.mean((_model(0.4, x_t, t, None) - (eps - x0)) ** 2)
    np.testing.assert_allclose(value, want, rtol=1e-5)
