"""Consistency models (CM, iCT, CD) and sCM on Gaussian data, where the PF-ODE map is known.

For ``x0 ~ N(mu, diag(s))`` on EDM (``x_sigma = x0 + sigma z``) the PF-ODE keeps
each coordinate's quantile: the flow map from ``sigma_a`` to ``sigma_b`` is
``mu + sqrt((s + sigma_b^2) / (s + sigma_a^2)) (x - mu)`` and the exact
consistency function is that map to ``sigma_min``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgen import diffusion as D
from jaxgen.diffusion import consistency as C
from jaxgen.diffusion import scm as S_
from jaxgen.errors import InputError
from jaxgen.sampling.consistency import consistency_sample
from jaxgen.sampling.teacher import solver_step

MU = np.array([0.3, -0.2], np.float32)
S = np.array([0.25, 0.04], np.float32)  # variances: sigma_data-like scales 0.5 and 0.2
GAUSS = D.GaussianMixture(MU[None], np.diag(S)[None], np.ones(1))
EDM = D.EDM()


def flow_map(x, sigma_a, sigma_b):
    """Exact PF-ODE map of the Gaussian from noise level sigma_a to sigma_b ([B] each)."""
    r = jnp.sqrt((S + sigma_b[:, None] ** 2) / (S + sigma_a[:, None] ** 2))
    return MU + r * (x - MU)


def exact_consistency(params, x, sigma, cond):
    return flow_map(x, sigma, jnp.full_like(sigma, EDM.sigma_min))


def exact_step(x, sigma_a, sigma_b, cond=None):
    return flow_map(x, sigma_a, sigma_b)


teacher_fn = GAUSS.denoiser(EDM)  # the exact denoiser: an x0 model, params=None


def test_boundary_condition_is_bit_exact():
    w = jax.random.normal(jax.random.key(0), (2, 2))
    raw = lambda p, x, c_noise, cond: jnp.tanh(x @ p + c_noise[:, None]) * 1e3
    f = C.consistency_precond(raw, EDM, sigma_data=0.5)
    x = jax.random.normal(jax.random.key(1), (64, 2)) * 40
    at_min = f(w, x, jnp.full((64,), EDM.sigma_min), None)
    assert np.array_equal(np.asarray(at_min), np.asarray(x))
    above = f(w, x, jnp.full((64,), 2 * EDM.sigma_min), None)
    assert not np.array_equal(np.asarray(above), np.asarray(x))
    with pytest.raises(InputError, match="sigma\\(t_min\\) > 0"):
        C.consistency_precond(raw, D.Flow())


def test_karras_sigmas_and_ict_curriculum_match_the_papers():
    sig = np.asarray(C.karras_sigmas(18, 0.002, 80.0))
    rho = 7.0
    ref = (0.002 ** (1 / rho) + np.arange(18) / 17 * (80 ** (1 / rho) - 0.002 ** (1 / rho))) ** rho
    np.testing.assert_allclose(sig, ref, rtol=2e-6)  # float32 evaluation of a float64 formula
    assert sig[0] == np.float32(0.002) and sig[-1] == 80.0
    # Traced N inside a larger array: the first N entries are the same levels, then sigma_max.
    padded = np.asarray(C.karras_sigmas(jnp.int32(18), 0.002, 80.0, size=25))
    np.testing.assert_array_equal(padded[:18], sig)
    assert np.all(padded[18:] == 80.0)
    # iCT (Song & Dhariwal 2024), K = 400k, s0 = 10, s1 = 1280: K' = 400000 // 8 = 50000.
    n = lambda k: int(C.ict_num_scales(k, 400_000))
    assert [n(0), n(49_999), n(50_000), n(100_000), n(300_000), n(350_000), n(399_999)] == [
        11, 11, 21, 41, 641, 1281, 1281,
    ]
    with pytest.raises(InputError, match="too short"):
        C.ict_num_scales(0, 3)


def test_ict_sigma_sampling_is_the_lognormal_mass_between_levels():
    from scipy.special import erf

    n = 11
    sig = C.karras_sigmas(jnp.int32(n), 0.002, 80.0, size=21)
    p = np.exp(np.asarray(C.ict_sigma_logits(sig, n), np.float64))
    s64 = np.asarray(sig, np.float64)[:n]
    cdf = erf((np.log(s64) + 1.1) / (np.sqrt(2) * 2.0))
    np.testing.assert_allclose(p[: n - 1], np.diff(cdf), rtol=1e-4)  # float32 erf
    assert np.all(p[n - 1 :] == 0)


def test_ict_loss_equals_a_float64_transcription_of_the_paper():
    d = 6
    x0 = jax.random.normal(jax.random.key(2), (5, d)) * 0.5
    w = jax.random.normal(jax.random.key(3), (d, d)) * 0.3
    raw = lambda p, x, c_noise, cond: jnp.tanh(x @ p) + c_noise[:, None]
    f = C.consistency_precond(raw, EDM)
    key = jax.random.key(4)
    loss = lambda p: C.ict_loss(f, p, x0, None, key, step=0, total_steps=1000, process=EDM)
    mean_loss = lambda p: (jnp.mean(loss(p)[0]), loss(p))
    grads, (per_ex, metrics) = jax.jit(jax.grad(mean_loss, has_aux=True))(w)
    assert np.all(np.isfinite(grads)) and np.any(grads != 0)
    assert per_ex.shape == (5,) and int(metrics["num_scales"]) == 11

    @jax.jit
    def draw():  # the draw of ict_loss, redone
        sig = C.karras_sigmas(jnp.int32(11), 0.002, 80.0, size=1281)
        k_i, k_z = jax.random.split(key)
        i = jax.random.categorical(k_i, C.ict_sigma_logits(sig, 11), shape=(5,))
        return sig, i, jax.random.normal(k_z, x0.shape)

    sig, i, z = (np.asarray(a) for a in draw())
    z, s64 = z.astype(np.float64), sig.astype(np.float64)
    lo, hi = s64[i][:, None], s64[i + 1][:, None]
    x64, w64 = np.asarray(x0, np.float64), np.asarray(w, np.float64)

    def f64(x, s):  # CM App. C parametrisation in float64
        c_skip = 0.25 / ((s - 0.002) ** 2 + 0.25)
        c_out = 0.5 * (s - 0.002) / np.sqrt(s**2 + 0.25)
        c_in = 1 / np.sqrt(s**2 + 0.25)
        return c_skip * x + c_out * (np.tanh((c_in * x) @ w64) + np.log(s) / 4)

    sq = np.sum((f64(x64 + hi * z, hi) - f64(x64 + lo * z, lo)) ** 2, axis=1)
    c = 0.00054 * np.sqrt(d)
    paper = (np.sqrt(sq + c**2) - c) / (hi - lo)[:, 0]
    # Ours is the paper's divided by sqrt(d) (mean instead of sum). The float32 difference
    # of f at neighbouring levels cancels: relative error ~ 1e-7 |f| / |f_hi - f_lo|.
    np.testing.assert_allclose(np.asarray(per_ex) * np.sqrt(d), paper, rtol=2e-3, atol=1e-6)


def _quadrature(n=5):
    """Gauss-Hermite nodes and weights for E over (x0, z) ~ N(MU, diag S) x N(0, I), 1-D."""
    t, w = np.polynomial.hermite_e.hermegauss(n)
    w = w / w.sum()
    x0 = MU[0] + np.sqrt(S[0]) * t
    xx, zz = np.meshgrid(x0, t, indexing="ij")
    return (jnp.asarray(xx.reshape(-1, 1), jnp.float32), jnp.asarray(zz.reshape(-1, 1),
            jnp.float32), jnp.asarray(np.outer(w, w).reshape(-1), jnp.float32))


def test_ict_gradient_at_the_exact_consistency_function_vanishes_with_the_step():
    # CM Theorem 2 / iCT Sec. 3: with theta- = theta the CT target is unbiased to first
    # order in dsigma, so at f* the expected, 1/dsigma-weighted l2 gradient is O(dsigma)
    # while at a wrong f it is O(1/dsigma). Expectation by exact quadrature (1-D, the
    # integrand is a polynomial of degree 2 in (x0, z)).
    x0, z, wq = _quadrature()

    def model(theta, x, sigma, cond):  # f* + theta_0 (x - mu) + theta_1
        f = MU[0] + jnp.sqrt((S[0] + EDM.sigma_min**2) / (S[0] + sigma[:, None] ** 2)) * (x - MU[0])
        return f + theta[0] * (x - MU[0]) + theta[1]

    def expected_grad(theta, sigma, dsigma):
        lo, hi = jnp.full(x0.shape[:1], sigma), jnp.full(x0.shape[:1], sigma + dsigma)
        def objective(th):
            d = C.consistency_pair_loss(model, th, th, x0 + lo[:, None] * z,
                                        x0 + hi[:, None] * z, lo, hi, None,
                                        distance=D.mse(), process=EDM)
            return jnp.sum(wq * d) / dsigma
        return np.asarray(jax.grad(objective)(theta), np.float64)

    zero, wrong = jnp.zeros(2), jnp.array([0.1, 0.0])
    g = [expected_grad(zero, 1.0, h)[0] for h in (0.2, 0.1, 0.05)]
    # Closed form: sqrt(s + m^2) s h / (s + sigma^2)^{3/2} + O(h^2); halves with h.
    np.testing.assert_allclose(g[1] / g[0], 0.5, atol=0.05)
    np.testing.assert_allclose(g[2] / g[1], 0.5, atol=0.03)
    s0 = float(S[0])
    np.testing.assert_allclose(g[2], np.sqrt(s0 + 4e-6) * s0 * 0.05 / (s0 + 1) ** 1.5, rtol=0.1)
    assert abs(expected_grad(wrong, 1.0, 0.05)[0]) > 20 * abs(g[2])


def _map_errors(student, params, sigmas):
    """Relative error (about the mean) of the student's map at each level, on 256 points."""

    @jax.jit
    def error(s):
        xs = MU + jnp.sqrt(S + s**2) * jax.random.normal(jax.random.key(10), (256, 2))
        sv = jnp.full((256,), s)
        want = exact_consistency(None, xs, sv, None)
        return jnp.linalg.norm(student(params, xs, sv, None) - want) / jnp.linalg.norm(want - MU)

    return [float(e) for e in jax.lax.map(error, jnp.asarray(sigmas))]


@pytest.mark.slow
def test_consistency_training_without_a_teacher_recovers_the_map():
    # iCT on a student in the family of the exact map (per-coordinate mean m and variance v,
    # f(x, sigma_min) = x exact): CT's target is unbiased only as dsigma -> 0, so the fixed
    # point for a finite curriculum (s1 = 160 here) is near, not at, f*. Measured: 3.2e-2.
    def student(p, x, sigma, cond):
        v, m = jnp.exp(p["logv"]), p["m"]
        return m + jnp.sqrt((v + EDM.sigma_min**2) / (v + sigma[:, None] ** 2)) * (x - m)

    steps = 400
    opt = optax.adam(optax.cosine_decay_schedule(3e-2, steps))

    def body(carry, key):
        params, state, i = carry
        k_x, k_l = jax.random.split(key)
        x0 = GAUSS.sample(k_x, 1024)
        loss = lambda p: jnp.mean(C.ict_loss(student, p, x0, None, k_l, step=i,
                                             total_steps=steps, process=EDM, s1=160)[0])
        updates, state = opt.update(jax.grad(loss)(params), state)
        return (optax.apply_updates(params, updates), state, i + 1), None

    params = {"m": jnp.zeros(2), "logv": jnp.zeros(2)}
    train = jax.jit(lambda p, k: jax.lax.scan(body, (p, opt.init(p), 0),
                                              jax.random.split(k, steps))[0][0])
    params = train(params, jax.random.key(0))
    errs = _map_errors(student, params, C.karras_sigmas(18, EDM.sigma_min, EDM.sigma_max)[1:])
    assert max(errs) < 5e-2, errs


def test_exact_consistency_function_has_zero_cd_loss():
    x0 = GAUSS.sample(jax.random.key(5), 256)
    # params = 1: the exact f; params = 0: the teacher's one step (a wrong student).
    student = lambda p, x, s, c: flow_map(x, s, jnp.where(p > 0, EDM.sigma_min, 0.5 * s))
    loss = jax.jit(lambda p: C.cd_loss(student, p, x0, None, jax.random.key(6),
                                       teacher_step=exact_step, process=EDM))
    per_ex, _ = loss(1.0)
    # Both sides are the same affine map of the same point up to float32 rounding of
    # values of size ~|x| <= 80 (sqrt ratios ~1e-7 relative): squared error < 1e-9.
    assert float(jnp.max(per_ex)) < 1e-9
    bad, _ = loss(0.0)
    assert float(jnp.mean(bad)) > 1e-2


def test_solver_step_is_a_teacher_ode_step_on_any_process():
    x = jax.random.normal(jax.random.key(7), (16, 2)) * 3
    sa = jnp.exp(jax.random.uniform(jax.random.key(8), (16,), minval=-3, maxval=3))
    sb = sa * 0.8
    exact = flow_map(x, sa, sb)
    heun = jax.jit(solver_step(teacher_fn, None, EDM, prediction="x0", solver="heun"))(
        x, sa, sb, None)
    # Heun's local error is O(h^3): with h = 0.2 sigma well below 1e-2 here.
    np.testing.assert_allclose(heun, exact, atol=1e-2 * 3)
    assert float(jnp.max(jnp.abs(heun - exact))) < float(jnp.max(jnp.abs(x - exact))) / 50
    # DDIM is the same step in x / alpha on every process: a VP teacher gives EDM's result.
    vp = D.VP(num_steps=None)
    vp_teacher = GAUSS.denoiser(vp)
    ddim_edm = jax.jit(solver_step(teacher_fn, None, EDM, prediction="x0", solver="ddim"))
    ddim_vp = jax.jit(solver_step(vp_teacher, None, vp, prediction="x0", solver="ddim"))
    sa_vp, sb_vp = jnp.clip(sa, 0.05, 20), jnp.clip(sb, 0.04, 16)
    np.testing.assert_allclose(ddim_vp(x, sa_vp, sb_vp, None), ddim_edm(x, sa_vp, sb_vp, None),
                               rtol=2e-4, atol=2e-4)  # float32 t <-> logsnr round trips
    with pytest.raises(InputError, match="deterministic"):
        solver_step(teacher_fn, None, EDM, prediction="x0", solver="ddpm")


def _table_student(sigmas):
    """An affine consistency function with one (a, b) per noise level of the grid."""
    log_levels = jnp.log(jnp.asarray(sigmas)) / 4

    def raw(params, x_in, c_noise, cond):
        idx = jnp.argmin(jnp.abs(c_noise[:, None] - log_levels[None]), axis=1)
        return params["a"][idx] * x_in + params["b"][idx]

    return C.consistency_precond(raw, EDM)


@pytest.mark.slow
def test_consistency_distillation_recovers_the_closed_form_map():
    n_scales = 18
    sigmas = C.karras_sigmas(n_scales, EDM.sigma_min, EDM.sigma_max)
    student = _table_student(sigmas)
    params = {"a": jnp.zeros((n_scales, 2)), "b": jnp.zeros((n_scales, 2))}
    # RK4 as the teacher's step: composed over the 17 intervals its map is within 1.1e-3
    # of the exact one here (Heun's, the paper's choice, is 5.8e-2 off at N = 18).
    teacher = solver_step(teacher_fn, None, EDM, prediction="x0", solver="rk4")
    opt = optax.adam(3e-2)

    @jax.jit
    def train(params, key):
        def body(carry, k):
            params, state = carry
            k_x, k_l = jax.random.split(k)
            x0 = GAUSS.sample(k_x, 512)
            loss = lambda p: jnp.mean(C.cd_loss(student, p, x0, None, k_l, teacher_step=teacher,
                                                process=EDM, num_scales=n_scales)[0])
            grads = jax.grad(loss)(params)
            updates, state = opt.update(grads, state)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(body, (params, opt.init(params)), jax.random.split(key, 600))[0][0]

    params = train(params, jax.random.key(9))
    errs = _map_errors(student, params, sigmas[1:])
    # Relative error of the map (about the mean): the bound 1e-2. What remains
    # is RK4's discretisation error composed over up to 17 steps, plus optimisation.
    assert max(errs) < 1e-2, errs


def test_multistep_consistency_sampling():
    key, ts = jax.random.key(11), (80.0, 2.0, 0.5)
    whole, info = consistency_sample(exact_consistency, None, EDM, key, (8, 2), ts=ts)
    first, _ = consistency_sample(exact_consistency, None, EDM, key, (4, 2), ts=ts)
    rest, _ = consistency_sample(exact_consistency, None, EDM, key, (4, 2), ts=ts, first_index=4)
    np.testing.assert_allclose(np.concatenate([first, rest]), whole, atol=1e-6)
    assert info["nfe"] == 3
    # Algorithm 1 by hand: f at T, then re-noise to tau with std sqrt(tau^2 - sigma_min^2).
    from jaxgen.sampling.solvers import step_noise

    per_sample = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(8))
    draw = lambda k: jax.random.normal(jax.random.fold_in(k, 0), (2,))
    x = exact_consistency(None, 80.0 * jax.vmap(draw)(per_sample), jnp.full((8,), 80.0), None)
    keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(per_sample)
    for n, tau in enumerate(ts[1:], start=1):
        x_tau = x + np.sqrt(tau**2 - 0.002**2) * step_noise(keys, n, x)
        x = exact_consistency(None, x_tau, jnp.full((8,), tau), None)
    np.testing.assert_allclose(whole, x, rtol=1e-5, atol=1e-5)
    # With the exact f, every step's output is an exact sample of N(mu, s + sigma_min^2).
    big, _ = consistency_sample(exact_consistency, None, EDM, key, (20000, 2), ts=(80.0, 1.0))
    np.testing.assert_allclose(np.mean(big, 0), MU, atol=4 * np.sqrt(S.max() / 20000))
    np.testing.assert_allclose(np.var(big, 0), S + 4e-6, rtol=4 * np.sqrt(2 / 20000))
    for bad in [(), (1.0, 2.0), (100.0,)]:
        with pytest.raises(InputError):
            consistency_sample(exact_consistency, None, EDM, key, (8, 2), ts=bad)


# ---------------------------------------------------------------- sCM on TrigFlow
TRIG = S_.TrigFlow(0.5)


def exact_trigflow_consistency(x, t):
    """PF-ODE map to t = 0 of the Gaussian on TrigFlow: quantiles are kept."""
    c, s = jnp.cos(t)[:, None], jnp.sin(t)[:, None]
    return MU + jnp.sqrt(S / (c * c * S + s * s * 0.25)) * (x - c * MU)


def exact_raw(params, x_in, t, cond):
    """F* with f* = cos t x_t - sin t sigma_d F*, plus a learnable perturbation (0 = exact)."""
    x = 0.5 * x_in
    s = jnp.sin(t)[:, None]
    exact = (jnp.cos(t)[:, None] * x - exact_trigflow_consistency(x, t)) / (0.5 * s)
    return exact + params["delta"] * x_in


def mlp_raw(params, x_in, t, cond):
    h = jnp.tanh(x_in @ params["w1"] + jnp.outer(t, params["wt"]) + params["b1"])
    return h @ params["w2"]


def _mlp(key, d=3, width=8):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"w1": jax.random.normal(k1, (d, width)), "wt": jax.random.normal(k2, (width,)),
            "b1": jnp.zeros(width), "w2": jax.random.normal(k3, (width, d)) / 3}


def test_trigflow_process_and_boundary():
    t = jnp.linspace(0.05, 1.5, 7)
    roundtrip, d_alpha, at_max = jax.jit(lambda t: (
        TRIG.t_from_logsnr(TRIG.logsnr(t)), TRIG.d_alpha(t), TRIG.alpha(jnp.float32(np.pi / 2))
    ))(t)
    np.testing.assert_allclose(roundtrip, t, rtol=1e-5)
    assert float(at_max) == 0.0
    np.testing.assert_allclose(d_alpha, -np.sin(t), rtol=1e-5)
    f = jax.jit(S_.trigflow_consistency(mlp_raw, 0.5))
    x = jax.random.normal(jax.random.key(20), (16, 3)) * 5
    assert np.array_equal(np.asarray(f(_mlp(jax.random.key(21)), x, jnp.zeros(16), None)),
                          np.asarray(x))


def test_scm_jvp_tangent_matches_finite_differences():
    params = _mlp(jax.random.key(22))
    x_t = jax.random.normal(jax.random.key(23), (4, 3)) * 0.7
    dxdt = jax.random.normal(jax.random.key(24), (4, 3))
    t = jnp.array([0.1, 0.6, 1.0, 1.5])
    f_minus, df = S_.scm_tangent(mlp_raw, params, x_t, t, dxdt, None, 0.5)
    np.testing.assert_allclose(f_minus, mlp_raw(params, x_t / 0.5, t, None), rtol=1e-6)
    # Central differences along the ODE in float64 (h = 1e-4: truncation ~h^2 = 1e-8,
    # rounding ~1e-16 / h = 1e-12), so the comparison measures the float32 jvp alone,
    # whose relative error is a few float32 ulps (1.2e-7) of the tanh network's terms.
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64, v64, t64 = (jnp.asarray(a, jnp.float64) for a in (x_t, dxdt, t))
        h = 1e-4
        ahead = mlp_raw(p64, (x64 + h * v64) / 0.5, t64 + h, None)
        back = mlp_raw(p64, (x64 - h * v64) / 0.5, t64 - h, None)
        fd = 0.5 * (np.cos(t64) * np.sin(t64))[:, None] * (ahead - back) / (2 * h)
        fd = np.asarray(fd)
    np.testing.assert_allclose(df, fd, rtol=1e-5, atol=1e-6)


def test_teacher_velocity_maps_any_process_to_trigflow():
    x = jax.random.normal(jax.random.key(25), (8, 2)) * 0.5
    t = jnp.linspace(0.1, 1.4, 8)
    velocity = lambda fn, process: jax.jit(S_.teacher_velocity(fn, None, process,
                                                               prediction="x0"))(x, t, None)
    native, via_edm = velocity(GAUSS.denoiser(TRIG), TRIG), velocity(teacher_fn, EDM)
    # float32 t -> logsnr -> sigma round trip: ~1e-6 relative in sigma.
    np.testing.assert_allclose(via_edm, native, rtol=1e-4, atol=1e-5)
    # The exact velocity is the time derivative of the flow map's inverse (keeps f* fixed).
    h = 1e-3
    f_a = exact_trigflow_consistency(x + h * native, t + h)
    f_b = exact_trigflow_consistency(x - h * native, t - h)
    np.testing.assert_allclose((f_a - f_b) / (2 * h), 0.0, atol=2e-3)


def test_scd_has_zero_gradient_at_the_exact_consistency_function():
    x0 = GAUSS.sample(jax.random.key(26), 256)
    teacher = S_.teacher_velocity(GAUSS.denoiser(TRIG), None, TRIG, prediction="x0")

    @jax.jit
    def run(delta):
        loss = lambda p: S_.scm_loss(exact_raw, p, x0, None, jax.random.key(27),
                                     teacher=teacher, warmup_steps=0)
        mean = lambda p: (jnp.mean(loss(p)[0]), loss(p))
        return jax.value_and_grad(mean, has_aux=True)({"delta": delta})

    ((loss0, (per_ex, metrics)), g0), (_, g1) = run(0.0), run(0.05)
    # At f*, df*/dt = 0 along the exact ODE, so g = 0 and the loss and its gradient vanish
    # up to float32 rounding; a 5 % perturbation gives an O(1) gradient.
    assert float(loss0) < 1e-8 and abs(float(g0["delta"])) < 1e-4
    assert abs(float(g1["delta"])) > 1e-2
    assert per_ex.shape == (256,) and float(metrics["tangent_norm"]) < 1e-4


def test_scm_loss_equals_a_float64_transcription_of_algorithm_1():
    params = _mlp(jax.random.key(28))
    x0 = jax.random.normal(jax.random.key(29), (4, 3)) * 0.5
    with_logvar = lambda p, x_in, t, c: (mlp_raw(p, x_in, t, c), 0.3 * t - 0.1)
    key = jax.random.key(30)
    per_ex, _ = jax.jit(lambda p: S_.scm_loss(mlp_raw, p, x0, None, key, step=2500,
                                              raw_logvar_fn=with_logvar))(params)
    k_t, k_z = jax.random.split(key)
    tau = np.asarray(-1.0 + 1.4 * jax.random.normal(k_t, (4,)), np.float64)
    t = np.arctan(np.exp(tau) / 0.5)[:, None]
    z = 0.5 * np.asarray(jax.random.normal(k_z, x0.shape), np.float64)
    x = np.asarray(x0, np.float64)
    x_t = np.cos(t) * x + np.sin(t) * z
    dxdt = np.cos(t) * z - np.sin(t) * x
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        F = lambda u, tt: np.asarray(mlp_raw(p64, jnp.asarray(u), jnp.asarray(tt[:, 0]), None))
        h = 1e-5
        dF = (F((x_t + h * dxdt) / 0.5, t + h) - F((x_t - h * dxdt) / 0.5, t - h)) / (2 * h)
        f_minus = F(x_t / 0.5, t)
    r = 2500 / 10000
    g = -np.cos(t) ** 2 * (0.5 * f_minus - dxdt) - r * np.cos(t) * np.sin(t) * (x_t + 0.5 * dF)
    g = g / (np.linalg.norm(g, axis=1, keepdims=True) + 0.1)
    u = 0.3 * t[:, 0] - 0.1
    # F_theta = F_theta- in value, so the squared error is ||g||^2 / D.
    paper = np.exp(-u) * np.sum(g**2, axis=1) / 3 + u
    np.testing.assert_allclose(per_ex, paper, rtol=1e-4, atol=1e-6)


def test_multistep_sampling_on_trigflow():
    f = S_.trigflow_consistency(exact_raw, 0.5)
    out, info = consistency_sample(f, {"delta": 0.0}, TRIG, jax.random.key(31), (20000, 2),
                                   ts=(np.pi / 2, 1.1))
    assert info["nfe"] == 2
    np.testing.assert_allclose(np.mean(out, 0), MU, atol=4 * np.sqrt(S.max() / 20000))
    np.testing.assert_allclose(np.var(out, 0), S, rtol=4 * np.sqrt(2 / 20000))


def test_trigflow_is_a_process_the_sampling_driver_runs():
    # A TrigFlow diffusion teacher samples through jaxgen.sampling.sample like any process.
    from jaxgen import sampling

    out, _ = sampling.sample(model_fn=GAUSS.denoiser(TRIG), params=None, process=TRIG,
                             key=jax.random.key(32), shape=(20000, 2), prediction="x0",
                             solver="heun", steps=12)
    np.testing.assert_allclose(np.mean(out, 0), MU, atol=4 * np.sqrt(S.max() / 20000))
    np.testing.assert_allclose(np.var(out, 0), S, rtol=4 * np.sqrt(2 / 20000))


# -------------------------------------------------------- any model as a consistency function


def _raw(params, x_in, c_noise, cond):
    """A raw network ``F(c_in x, c_noise)``: smooth, non-linear, of both arguments."""
    return jnp.tanh(params * x_in) + 0.3 * c_noise[:, None]


def test_consistency_view_of_an_edm_denoiser_is_the_papers_parametrisation_of_its_network():
    # CM starts CD from EDM's weights: f = c_skip x + c_out F of the denoiser's own F.
    denoiser = D.edm_precond(_raw, EDM, 0.5)
    view = C.consistency_view(denoiser, EDM, prediction="x0", sigma_min=0.002)
    want = C.consistency_precond(_raw, EDM, sigma_data=0.5)
    x = jax.random.normal(jax.random.key(0), (6, 2)) * 3.0
    sigma = jnp.asarray([0.002, 0.01, 0.3, 2.5, 20.0, 80.0])
    np.testing.assert_allclose(view(1.3, x, sigma, None), want(1.3, x, sigma, None),
                               rtol=2e-5, atol=2e-5)


def test_consistency_view_of_a_flow_model_is_the_float64_transcription():
    # A velocity model v(x_t, t) on the linear flow, seen at equal log-SNR:
    # t = sigma / (1 + sigma), x_t = x / (1 + sigma), D = x_t - t v; then Eq. 5 of CM on
    # the F of D = c_skip^E x + c_out^E F.
    flow = D.Flow()
    velocity = lambda p, x_t, t, c: jnp.sin(p * x_t) - 0.7 * t[:, None] * x_t
    view = C.consistency_view(velocity, flow, prediction="velocity", sigma_min=0.002)
    x = np.asarray(jax.random.normal(jax.random.key(1), (5, 3)), np.float64) * 2.0
    sigma = np.asarray([0.002, 0.05, 1.0, 7.0, 80.0])
    got = np.asarray(view(0.9, jnp.asarray(x, jnp.float32), jnp.asarray(sigma, jnp.float32),
                          None), np.float64)
    s, sd, eps = sigma[:, None], 0.5, 0.002
    t = s / (1 + s)
    x_t = x / (1 + s)
    d = x_t - t * (np.sin(0.9 * x_t) - 0.7 * t * x_t)
    f_edm = (d - sd**2 / (s**2 + sd**2) * x) / (s * sd / np.sqrt(s**2 + sd**2))
    want = sd**2 / ((s - eps) ** 2 + sd**2) * x + sd * (s - eps) / np.sqrt(s**2 + sd**2) * f_edm
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # The boundary holds bit for bit, whatever the model.
    x32 = jnp.asarray(x, jnp.float32)
    assert np.array_equal(view(0.9, x32, jnp.full((5,), 0.002), None), x32)
