"""Samplers on problems with known answers: equations, orders, moments, seeds, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import diffusion as D
from jaxgen import sampling as S
from jaxgen.errors import InputError
from jaxgen.parallel import make_mesh

MIXTURE = D.GaussianMixture(
    np.array([[1.0, 0.0], [-1.0, 0.5]]),
    np.array([[[0.1, 0.03], [0.03, 0.08]], 0.2 * np.eye(2)]),
    np.array([0.3, 0.7]),
)


def as_prediction(x0_fn, process, prediction):
    """Turn an x0 model into a model of another prediction type (exact conversion)."""

    def model_fn(params, x, t, cond):
        x0 = x0_fn(params, x, t, cond)
        return D.convert(x0, "x0", prediction, x_t=x, t=t, process=process)

    return model_fn


def gaussian_x0(process, var=0.5):
    """E[x0 | x_t] for x0 ~ N(0, var I): the cheapest exact denoiser."""

    def x0_fn(params, x, t, cond):
        a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
        return (a * var / (a * a * var + s * s)).reshape(a.shape + (1,) * (x.ndim - 2)) * x

    return x0_fn


# ------------------------------------------------------------------ every combination

# One process per family (discrete VP, EDM, linear flow); the continuous VP
# schedules and the GVP path run every solver family in the moment tests below.
MATRIX_PROCESSES = [D.VP(), D.EDM(), D.Flow()]

# Gaussian data x0 ~ N(MU, diag(SD^2)) in [B, 2, 3]: every process's exact
# denoiser is affine, E[x0 | x_t] = MU + a SD^2 / (a^2 SD^2 + s^2) (x_t - a MU), and
# the probability-flow ODE keeps z = (x_t - a MU) / sqrt(a^2 SD^2 + s^2) constant
# (d/dt of x_t - a MU is (v' / 2v) (x_t - a MU) with v = a^2 SD^2 + s^2), so its
# solution from any x_T is x_t = a MU + sqrt(a^2 SD^2 + s^2) z in closed form.
MU = np.array([[0.5, -0.3, 0.0], [0.2, -0.6, 0.1]])
SD = np.array([[0.3, 0.45, 0.6], [0.75, 0.9, 1.0]])
DETERMINISTIC = {  # solver -> order p
    "ddim": 1, "euler": 1, "midpoint": 2, "heun": 2, "rk4": 4,
    "dpmpp_2m": 2, "dpmpp_3m": 3, "unipc_bh1": 3, "unipc_bh2": 3,
}


def gaussian_denoiser(process):
    """The exact x0 model for the data N(MU, diag(SD^2))."""

    def x0_fn(params, x, t, cond):
        a, s = process.alpha(t)[:, None, None], process.sigma(t)[:, None, None]
        mu, var = jnp.asarray(MU, x.dtype), jnp.asarray(SD**2, x.dtype)
        return mu + a * var / (a * a * var + s * s) * (x - a * mu)

    return x0_fn


def gaussian_flow(process, t, z):
    """The exact PF-ODE state at time t of the trajectory with invariant z."""
    a, s = (float(f(jnp.asarray(t, jnp.float64))) for f in (process.alpha, process.sigma))
    return a * MU + np.sqrt(a * a * SD**2 + s * s) * z


def _smooth_grid(process, steps):
    # Geometric in sigma / alpha from 80 to 0.05: h = ln(1600) / steps in log-SNR / 2,
    # smooth, and ending before the clean point, so each solver's own order shows.
    level = np.geomspace(80.0, 0.05, steps + 1)
    return np.asarray(process.t_from_logsnr(jnp.asarray(-2 * np.log(level))))


RUNGE_KUTTA = ("euler", "midpoint", "heun", "rk4")


def _predictions(process):
    """The predictions other than x0 a model of ``process`` may have: eps/score models
    cannot start a flow at alpha = 0 (refused, tested below)."""
    flow = isinstance(process, D.Flow)
    return [p for p in D.PREDICTIONS if p != "x0" and not (flow and p in ("eps", "score"))]


@pytest.mark.parametrize("solver", list(DETERMINISTIC))
def test_deterministic_solvers_reach_the_exact_gaussian_flow_endpoint(solver):
    p_order, h = DETERMINISTIC[solver], np.log(80.0 / 0.05) / np.array([16, 32])
    with jax.enable_x64(True):
        z = np.asarray(jax.random.normal(jax.random.key(1), (4, 2, 3), jnp.float64))
        for process in MATRIX_PROCESSES:
            errors, x0_runs, x_Ts = [], {}, {}
            for steps in (16, 32):
                ts = _smooth_grid(process, steps)
                want = gaussian_flow(process, ts[-1], z)
                x_Ts[steps] = jnp.asarray(gaussian_flow(process, ts[0], z))
                kw = dict(solver=solver, steps=steps, grid=_smooth_grid, x_T=x_Ts[steps])
                x0_runs[steps], _ = S.sample(gaussian_denoiser(process), None, process,
                                             jax.random.key(0), z.shape, prediction="x0", **kw)
                scale = np.abs(want - float(process.alpha(jnp.asarray(ts[-1]))) * MU)
                errors.append(np.max(np.abs(np.asarray(x0_runs[steps]) - want) / scale))
            # The error bound of the first-order exponential integrator (DDIM) in
            # x / alpha: local error <= h * (variation of the denoised value over the
            # step), propagated by factors <= 1 (d x0 / dx <= 1), so the relative
            # error at the end is <= h (the variation of x0 along the path is <= |x|).
            # Every solver here is at least first order; measured ratios are 2-1e4.
            assert np.all(np.array(errors) <= h), (process, errors, h)
            # Its own order from 16 to 32 steps (observed: p - 0.2 or more). A discrete
            # VP interpolates alpha linearly between 1000 grid points, so the process-time
            # velocity of the Runge-Kutta methods has kinks there and their order is lost.
            if not (isinstance(process, D.VP) and solver in RUNGE_KUTTA):
                slope = np.log2(errors[0] / errors[1])
                assert slope > p_order - 0.5, (process, errors)
            # Every other prediction, converted exactly in float64: the same numbers.
            for pred in _predictions(process):
                model = as_prediction(gaussian_denoiser(process), process, pred)
                x, _ = S.sample(model, None, process, jax.random.key(0), z.shape,
                                prediction=pred, solver=solver, steps=16, grid=_smooth_grid,
                                x_T=x_Ts[16])
                np.testing.assert_allclose(x, x0_runs[16], rtol=0, atol=1e-9, err_msg=pred)


STOCHASTIC = ["ddpm", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "euler_maruyama",
              "restart", "sa_solver"]


@pytest.mark.slow  # 15-30 s each on 2 cores: 20000 samples at 100 and 200 steps, 3 processes
@pytest.mark.parametrize("solver", STOCHASTIC)
def test_stochastic_solvers_reach_the_gaussian_moments(solver):
    n = 20000
    for process in MATRIX_PROCESSES:
        x = {}
        for steps in (100, 200):
            x[steps], info = S.sample(gaussian_denoiser(process), None, process,
                                      jax.random.key(7), (n, 2, 3), prediction="x0",
                                      solver=solver, steps=steps)
            x[steps] = np.asarray(x[steps], np.float64)
        # The driver starts from x_T ~ N(0, s_T^2), which the exact flow maps to
        # N(MU - SD a_T MU / r, (SD s_T / r)^2), r = sqrt(a_T^2 SD^2 + s_T^2) (a_T = 0.006
        # on the discrete VP, 0 on a flow; the reverse SDEs forget the start faster still).
        a_T, s_T = (float(f(jnp.asarray(info["timesteps"][0])))
                    for f in (process.alpha, process.sigma))
        r = np.sqrt(a_T**2 * SD**2 + s_T**2)
        mean, var = MU - SD * a_T * MU / r, (SD * s_T / r) ** 2
        # These solvers converge weakly at first order: moment(n) = exact + c / n +
        # O(1 / n^2), so Richardson's 2 moment(2n) - moment(n) removes the c / n bias
        # (1-13 % of the variance at 100 steps). Sample i of both runs comes from the
        # same keys, so the per-sample combination gives the estimator's own standard
        # error; 4.5 of them (p ~ 7e-6 per entry, 36 entries). Key 7, not the file's
        # usual 4: with key 4 the restart's one noise draw itself has a sample variance
        # 2.8 standard errors low in one coordinate (measured on the draws alone).
        m = 2 * x[200] - x[100]
        se_m = m.std(0) / np.sqrt(n)
        assert np.all(np.abs(m.mean(0) - mean) < 4.5 * se_m), (process, m.mean(0) - mean)
        v = 2 * (x[200] - x[200].mean(0)) ** 2 - (x[100] - x[100].mean(0)) ** 2
        se_v = v.std(0) / np.sqrt(n)
        assert np.all(np.abs(v.mean(0) - var) < 4.5 * se_v), (process, v.mean(0) / var - 1)


def _no_model(params, x, t, cond):
    raise AssertionError("the model must not be traced before the configuration is checked")


@pytest.mark.parametrize(
    "process, prediction",
    [(D.Flow(), "eps"), (D.Flow("gvp"), "score"), (D.VP(zero_terminal_snr=True), "eps")],
)
def test_eps_model_at_zero_snr_is_refused_before_compiling(process, prediction):
    with pytest.raises(InputError, match="alpha = 0"):
        S.sample(_no_model, None, process, jax.random.key(0), (2, 2), prediction=prediction)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(solver="dpm_fast"), "solver='dpm_fast'"),
        (dict(steps=0), "steps=0"),
        (dict(steps=2.5), "steps=2.5"),
        (dict(solver="ddim", solver_options={"s_churn": 1.0}), "s_churn"),
        (dict(grid="trailing", process=D.EDM()), "discrete"),
        (dict(grid="logsnr", process=D.Flow()), "infinite"),
        (dict(grid="karras", process=D.VP(zero_terminal_snr=True), prediction="v"), "infinite"),
        (dict(grid="cosine"), "grid='cosine'"),
        (dict(grid=np.array([1.0, 0.5, 0.6]), steps=2), "decreasing"),
        (dict(grid=np.array([1.0, 0.0]), steps=3), "shape"),
        (dict(steps=2000), "exceeds"),
        (dict(prediction="noise"), "prediction='noise'"),
        (dict(guidance=S.Guidance(2.0, uncond={"y": jnp.zeros(1)})), "needs cond"),
        (dict(guidance=S.Guidance(2.0), cond={"y": jnp.zeros(2)}), "exactly one"),
        (
            dict(
                solver="euler_maruyama",
                process=D.Flow(),
                prediction="x0",
                solver_options={"diffusion": "sbdm"},
            ),
            "sbdm",
        ),
        (dict(x_T=jnp.zeros((3, 2))), "x_T"),
        (dict(shape=(0, 2)), "shape"),
    ],
)
def test_bad_configuration_is_refused_before_compiling(kwargs, match):
    kw = dict(process=D.VP(), shape=(2, 2), prediction="eps") | kwargs
    process, shape = kw.pop("process"), kw.pop("shape")
    with pytest.raises(InputError, match=match):
        S.sample(_no_model, None, process, jax.random.key(0), shape, **kw)


# ------------------------------------------------------------------ published equations


def _eps_fn(x, t):
    return 0.3 * x + np.sin(3 * t)  # any smooth function stands in for a network


def _jax_eps_model(x, t, cond):
    return 0.3 * x + jnp.sin(3 * t)[:, None]


def _run_solver(solver, process, ts, x, keys, **options):
    denoise = S.make_denoiser(_jax_eps_model, process, "eps")
    fn = jax.jit(lambda x, ts, keys: solver(denoise, x, ts, keys, process, **options))
    return fn(x, jnp.asarray(ts, jnp.float32), keys)


def test_ddpm_reproduces_ho_et_al_algorithm_2():
    n = 100
    process = D.VP(num_steps=n)
    betas = np.linspace(1e-4, 0.02, n) * (1000 / n)
    alphas, abar = 1 - betas, np.cumprod(1 - betas)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(6))
    x_T = np.asarray(jax.random.normal(jax.random.key(1), (6, 2)), np.float64)
    ts = S.trailing(process, n)  # every index, N..1, then the clean point
    got = _run_solver(S.ddim, process, ts, jnp.asarray(x_T, jnp.float32), keys, eta=1.0)

    x = x_T
    for step, t in enumerate(range(n, 0, -1)):  # Algorithm 2, t = T..1 (1-based)
        z = np.asarray(S.step_noise(keys, step, jnp.zeros((6, 2))), np.float64) if t > 1 else 0
        beta_tilde = (1 - (abar[t - 2] if t > 1 else 1.0)) / (1 - abar[t - 1]) * betas[t - 1]
        eps = _eps_fn(x, t / n)
        x = (x - betas[t - 1] / np.sqrt(1 - abar[t - 1]) * eps) / np.sqrt(alphas[t - 1])
        x = x + np.sqrt(beta_tilde) * z
    # float32 vs float64 over 100 steps, each a contraction-free affine map with
    # O(1) coefficients: accumulated rounding ~100 * 1e-7 relative.
    np.testing.assert_allclose(np.asarray(got), x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_reproduces_song_et_al_eq_12(eta):
    n, steps = 100, 10
    process = D.VP(num_steps=n)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, n) * (1000 / n))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(5))
    x_T = np.asarray(jax.random.normal(jax.random.key(2), (5, 2)), np.float64)
    ts = S.leading(process, steps)  # DDIM's own skip: seq = range(0, N, N // steps)
    got = _run_solver(S.ddim, process, ts, jnp.asarray(x_T, jnp.float32), keys, eta=eta)

    seq = list(range(0, n, n // steps))
    x = x_T
    for step, (i, j) in enumerate(zip(reversed(seq), reversed([-1, *seq[:-1]]), strict=True)):
        a_t, a_prev = abar[i], (abar[j] if j >= 0 else 1.0)
        eps = _eps_fn(x, (i + 1) / n)
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)  # "predicted x0"
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))  # Eq. 16
        z = np.asarray(S.step_noise(keys, step, jnp.zeros((5, 2))), np.float64)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps + sigma * z  # Eq. 12
    np.testing.assert_allclose(np.asarray(got), x, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ known answers


def _truncated_edm_grid(process, steps):
    # Geometric in sigma from 80 to 0.05: the error is measured at sigma = 0.05,
    # away from the final jump, so the solver's own order shows.
    return np.geomspace(80.0, 0.05, steps + 1)


@functools.cache
def _edm_reference():
    with jax.enable_x64(True):
        x_T = 80.0 * jax.random.normal(jax.random.key(1), (64, 2), jnp.float64)
        # RK4 at 512 steps: its error ~ err(32) / 16^4 ~ 1e-10, far below what is measured.
        ref, _ = S.sample(
            MIXTURE.denoiser(D.EDM()),
            None,
            D.EDM(),
            jax.random.key(0),
            (64, 2),
            prediction="x0",
            solver="rk4",
            steps=512,
            grid=_truncated_edm_grid,
            x_T=x_T,
        )
        return np.asarray(x_T), np.asarray(ref)


# Asymptotic orders: Euler/DDIM 1; midpoint, Heun, DPM-Solver++(2M) 2; RK4 4;
# DPM-Solver++(3M) 3 and UniPC-3 with its corrector 4 in the range of steps
# where they are used (their first-order warm-up step adds an O(h^2) term that
# takes over only beyond ~64 steps on this problem). Observed slopes over
# 8 -> 16 -> 32 steps sit within ~0.25 of these; the bounds leave that margin.
ORDERS = {
    "euler": 0.8,
    "ddim": 0.8,
    "midpoint": 1.8,
    "heun": 1.8,
    "rk4": 3.5,
    "dpmpp_2m": 1.8,
    "dpmpp_3m": 2.5,
    "unipc_bh1": 3.3,
    "unipc_bh2": 3.3,
}


@pytest.mark.parametrize("solver", list(ORDERS))
def test_convergence_order(solver):
    x_T, ref = _edm_reference()
    errors = []
    with jax.enable_x64(True):
        for steps in (8, 16, 32):
            x, _ = S.sample(
                MIXTURE.denoiser(D.EDM()),
                None,
                D.EDM(),
                jax.random.key(0),
                (64, 2),
                prediction="x0",
                solver=solver,
                steps=steps,
                grid=_truncated_edm_grid,
                x_T=jnp.asarray(x_T),
            )
            errors.append(np.sqrt(np.mean((np.asarray(x) - ref) ** 2)))
    slope = -np.polyfit(np.log([8, 16, 32]), np.log(errors), 1)[0]
    assert np.all(np.diff(errors) < 0), errors
    assert slope > ORDERS[solver], (slope, errors)


MOMENT_CASES = {
    "ddpm": (D.VP(), "eps", 250),
    "ddim": (D.VP("cosine", None), "v", 100),
    "euler": (D.Flow(), "velocity", 200),
    "midpoint": (D.Flow("gvp"), "x0", 50),
    "heun": (D.EDM(), "x0", 50),
    "rk4": (D.EDM(), "eps", 25),
    "dpmpp_2m": (D.VP(num_steps=None), "score", 50),
    "dpmpp_3m": (D.Flow(), "velocity", 50),
    "unipc_bh1": (D.EDM(), "v", 50),
    "unipc_bh2": (D.VP(zero_terminal_snr=True), "v", 50),
    "euler_maruyama": (D.Flow(), "velocity", 400),
}


@pytest.mark.parametrize("solver", list(MOMENT_CASES))
def test_many_steps_reach_true_mean_and_covariance(solver):
    process, prediction, steps = MOMENT_CASES[solver]
    options = {"s_churn": 10.0} if solver == "heun" else None  # EDM's stochastic Heun
    n = 20000
    model = as_prediction(MIXTURE.denoiser(process), process, prediction)
    x, _ = S.sample(
        model,
        None,
        process,
        jax.random.key(4),
        (n, 2),
        prediction=prediction,
        solver=solver,
        steps=steps,
        solver_options=options,
    )
    x = np.asarray(x, np.float64)
    mean, cov = x.mean(0), np.cov(x.T)
    # Sampling error of the estimators from the samples themselves; 4.5 standard
    # errors (p ~ 1e-5 per entry), plus 0.01 for the solver's remaining bias.
    se_mean = x.std(0) / np.sqrt(n)
    c = x - mean
    se_cov = np.std(c[:, :, None] * c[:, None, :], axis=0) / np.sqrt(n)
    assert np.all(np.abs(mean - MIXTURE.mean()) < 4.5 * se_mean + 0.01), mean - MIXTURE.mean()
    assert np.all(np.abs(cov - MIXTURE.cov()) < 4.5 * se_cov + 0.01), cov - MIXTURE.cov()


@pytest.mark.parametrize(
    "solver, options", [(s, None) for s in STOCHASTIC] + [("heun", {"s_churn": 20.0})],
    ids=[*STOCHASTIC, "heun-churn"],
)
def test_all_prediction_types_give_the_same_trajectory(solver, options):
    # Stochastic solvers (the deterministic ones are compared in float64 above): the
    # same keys give the same noise, so every prediction type follows one trajectory.
    for process in MATRIX_PROCESSES:
        x0_fn = gaussian_denoiser(process)
        outs = {
            pred: S.sample(as_prediction(x0_fn, process, pred), None, process,
                           jax.random.key(9), (16, 2, 3), prediction=pred, solver=solver,
                           steps=12, solver_options=options)[0]
            for pred in ["x0", *_predictions(process)]
        }
        # Each evaluation converts x0 -> pred -> (x0, eps) in float32; the worst
        # conditioning is 1/sigma_min (~500 on EDM), so ~1e-7 * 500 per step, over 12 steps.
        for pred, x in outs.items():
            np.testing.assert_allclose(x, outs["x0"], atol=5e-4, err_msg=f"{process} {pred}")


# ------------------------------------------------------------------ driver contract


def test_sample_i_depends_only_on_seed_and_index():
    model, process = MIXTURE.denoiser(D.VP()), D.VP()
    kw = dict(prediction="x0", solver="ddpm", steps=6)  # stochastic: step noise too
    key = jax.random.key(11)
    whole, info = S.sample(model, None, process, key, (8, 2), **kw)
    first, _ = S.sample(model, None, process, key, (3, 2), **kw)
    rest, _ = S.sample(model, None, process, key, (5, 2), first_index=3, **kw)
    sharded, _ = S.sample(model, None, process, key, (8, 2), mesh=make_mesh(), **kw)
    padded, _ = S.sample(model, None, process, key, (5, 2), first_index=3, mesh=make_mesh(), **kw)
    assert len(jax.devices()) == 8 and sharded.sharding.num_devices == 8
    # Same arithmetic on different batch shapes: XLA may vectorise differently,
    # so allow float32 rounding (~1e-7 relative) accumulated over 6 steps.
    np.testing.assert_allclose(np.concatenate([first, rest]), whole, atol=1e-5)
    np.testing.assert_allclose(sharded, whole, atol=1e-5)
    np.testing.assert_allclose(padded, whole[3:], atol=1e-5)
    assert info["nfe"] == 6 and info["timesteps"].shape == (7,)
    other, _ = S.sample(model, None, process, jax.random.key(12), (8, 2), **kw)
    assert not np.allclose(other, whole)


def test_params_are_an_argument_of_one_compiled_program():
    traces = []

    def scaled(params, x, t, cond):  # an x0 model whose weights are `params`
        traces.append(1)
        return params["w"] * x / (1.0 + t[:, None] ** 2)

    process, key = D.EDM(), jax.random.key(3)
    kw = dict(prediction="x0", solver="heun", steps=4)
    out = {}
    for w in (0.5, 0.7, 0.9):
        out[w], _ = S.sample(scaled, {"w": jnp.float32(w)}, process, key, (4, 2), **kw)
    # One trace for all three weights: they were never constants of the program.
    n_traces = len(traces)
    S.sample(scaled, {"w": jnp.float32(0.3)}, process, key, (4, 2), **kw)
    assert len(traces) == n_traces
    # And the same numbers as the weights in plain Python floats.
    for w in (0.5, 0.9):
        fixed = lambda p, x, t, c, w=w: scaled({"w": w}, x, t, c)
        closed, _ = S.sample(fixed, None, process, key, (4, 2), **kw)
        np.testing.assert_allclose(out[w], closed, rtol=1e-6)
    assert not np.allclose(out[0.5], out[0.9])


def test_nfe_counts_real_model_calls():
    calls = []

    def model(params, x, t, cond):
        calls.append(1)
        return gaussian_x0(D.EDM())(params, x, t, cond)

    for solver in (name for name, spec in S.SOLVERS.items() if not spec.learned_variance):
        calls.clear()  # ddpm_learned needs variance channels: test_learned_variance counts it
        with jax.disable_jit():  # scan and cond run in Python: every call is seen
            _, info = S.sample(model, None, D.EDM(), jax.random.key(0), (2, 2), prediction="x0",
                               solver=solver, steps=3)
        assert len(calls) == info["nfe"], solver


def test_grids():
    edm = D.EDM()
    ts = S.karras(edm, 5)
    i = np.arange(5)
    want = (80 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # k-diffusion
    np.testing.assert_allclose(ts[:-1], want, rtol=1e-5)
    assert ts[-1] == 0 and ts[0] == 80
    vp = D.VP()
    np.testing.assert_allclose(S.trailing(vp, 10)[:-1] * 1000 - 1, np.arange(999, 0, -100))
    np.testing.assert_allclose(S.leading(vp, 10)[:-1] * 1000 - 1, np.arange(900, -1, -100))
    cont = D.VP(num_steps=None)
    lam = np.asarray(cont.logsnr(jnp.asarray(S.logsnr(cont, 6)[:-1])))
    np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-3)
    u = np.linspace(1, 0, 9)
    np.testing.assert_allclose(S.shifted(D.Flow(), 8, shift=3.0), 3 * u / (1 + 2 * u), atol=1e-6)
    np.testing.assert_allclose(S.uniform(D.Flow(), 4), [1, 0.75, 0.5, 0.25, 0])


def test_guidance_formulas():
    process = D.EDM()

    def model(x, t, cond):
        return 0.5 * x + cond["y"][:, None]

    x = jax.random.normal(jax.random.key(0), (3, 4))
    cond, uncond = {"y": jnp.array([1.0, 2.0, 3.0])}, {"y": jnp.zeros(1)}
    plain = S.make_denoiser(model, process, "x0", cond)
    cfg = S.Guidance(3.0, uncond=uncond)
    guided = S.make_denoiser(model, process, "x0", cond, cfg)
    t = jnp.asarray(2.0)
    x0_c, x0_u = 0.5 * x + cond["y"][:, None], 0.5 * x
    np.testing.assert_allclose(guided(x, t)[0], x0_u + 3.0 * (x0_c - x0_u), rtol=1e-6)
    np.testing.assert_allclose(guided(x, t)[1], (x - guided(x, t)[0]) / 2.0, rtol=1e-5)
    off = S.Guidance(3.0, uncond=uncond, interval=(0.1, 1.0))  # sigma = 2 is outside
    outside = S.make_denoiser(model, process, "x0", cond, off)
    np.testing.assert_allclose(outside(x, t)[0], plain(x, t)[0], rtol=1e-6)
    res = S.Guidance(3.0, uncond=uncond, rescale=0.7)
    rescaled = S.make_denoiser(model, process, "x0", cond, res)
    g = x0_u + 3.0 * (x0_c - x0_u)
    std = lambda a: jnp.std(a, axis=1, keepdims=True)
    want = 0.7 * g * std(x0_c) / std(g) + 0.3 * g  # Lin et al. (2024), Eqs. 15-16
    np.testing.assert_allclose(rescaled(x, t)[0], want, rtol=1e-5)
    weak = lambda x, t, c: 0.25 * x
    auto = S.Guidance(2.0, guide_fn=weak)
    ag = S.make_denoiser(model, process, "x0", cond, auto)
    np.testing.assert_allclose(ag(x, t)[0], 0.25 * x + 2.0 * (x0_c - 0.25 * x), rtol=1e-6)


def test_cfg_batches_both_passes_and_scale_one_is_conditional():
    batches = []

    def model(params, x, t, cond):
        batches.append(x.shape[0])
        return gaussian_x0(D.Flow())(params, x, t, cond) + 0.1 * cond["y"][:, None]

    cond = {"y": jnp.arange(4.0)}
    kw = dict(prediction="x0", solver="euler", steps=4, cond=cond)
    with jax.disable_jit():
        one, info = S.sample(
            model,
            None,
            D.Flow(),
            jax.random.key(0),
            (4, 2),
            guidance=S.Guidance(1.0, uncond={"y": jnp.zeros(1)}),
            **kw,
        )
    assert batches == [8] * info["nfe"]  # conditional + unconditional in one call
    plain, _ = S.sample(model, None, D.Flow(), jax.random.key(0), (4, 2), **kw)
    np.testing.assert_allclose(one, plain, atol=1e-6)


def test_generate_yields_uint8_batches_matching_sample():
    process = D.Flow()
    model = gaussian_x0(process, var=0.3)
    kw = dict(prediction="x0", solver="heun", steps=3)
    batches = list(
        S.generate(model, None, process, jax.random.key(5), (4, 4, 3), num=10, batch_size=4, **kw)
    )
    assert [b.shape for b in batches] == [(4, 4, 4, 3), (4, 4, 4, 3), (2, 4, 4, 3)]
    assert all(b.dtype == np.uint8 for b in batches)
    whole, _ = S.sample(model, None, process, jax.random.key(5), (10, 4, 4, 3), **kw)
    # Same samples up to float32 rounding, which can move a value across a
    # rounding boundary: at most 1 level.
    assert (
        np.max(np.abs(np.concatenate(batches).astype(int) - np.asarray(S.to_uint8(whole), int)))
        <= 1
    )
    with pytest.raises(InputError, match="H, W, C"):
        next(S.generate(model, None, process, jax.random.key(5), (4, 3), num=2, batch_size=2, **kw))


def test_to_uint8_rule():
    x = jnp.array([-2.0, -1.0, -1 + 0.5 / 127.5, -1 + 0.49 / 127.5, 0.0, 1.0, 3.0])
    assert S.to_uint8(x).tolist() == [0, 0, 1, 0, 128, 255, 255]


def test_generate_passes_each_sample_its_condition():
    seen = []

    def model(params, x, t, cond):
        seen.append(cond["y"])
        return gaussian_x0(D.Flow())(params, x, t, cond) + 0.0 * cond["y"][:, None, None, None]

    labels = {"y": jnp.arange(5.0)}
    with jax.disable_jit():
        batches = list(
            S.generate(
                model,
                None,
                D.Flow(),
                jax.random.key(0),
                (2, 2, 1),
                num=5,
                batch_size=2,
                cond=labels,
                prediction="x0",
                solver="euler",
                steps=1,
            )
        )
    assert sum(len(b) for b in batches) == 5
    # Batches [0, 1], [2, 3], [4, 4 (padding: the last label repeated)].
    assert [np.asarray(y).tolist() for y in seen] == [[0, 1], [2, 3], [4, 4]]
