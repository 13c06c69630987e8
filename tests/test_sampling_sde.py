"""Stochastic solvers: k-diffusion's trajectories, the ODE limit, moments of the mixture."""

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampling import MIXTURE, as_prediction  # the shared mixture and exact model

from jaxgen import diffusion as D
from jaxgen import sampling as S
from jaxgen.errors import InputError
from jaxgen.sampling import solvers

FIXTURE = Path(__file__).parent / "fixtures" / "kdiffusion_reference.npz"
def _kdiffusion_cases():
    ref = np.load(FIXTURE)
    return [
        (str(ref[f"case{k}_name"]), ast.literal_eval(str(ref[f"case{k}_options"])), k)
        for k in range(6)
    ]


@pytest.mark.parametrize("name,options,k", _kdiffusion_cases())
def test_trajectories_equal_kdiffusion_for_the_same_noise(name, options, k, monkeypatch):
    # k-diffusion ran on N(mu, diag var) with its exact denoiser, in float64, with
    # the noise of step i given as noise[i]; the same noise goes in here.
    ref = np.load(FIXTURE)
    with jax.enable_x64(True):
        noise = jnp.asarray(ref["noise"])
        monkeypatch.setattr(solvers, "step_noise", lambda keys, i, x: noise[i])
        mu, var = jnp.asarray(ref["mu"]), jnp.asarray(ref["var"])

        def model(params, x, t, cond):
            return mu + var / (var + t[:, None] ** 2) * (x - mu)

        process = D.EDM()
        denoise = S.make_denoiser(lambda x, t, c: model(None, x, t, c), process, "x0")
        keys = jax.random.split(jax.random.key(0), 4)  # unused: the noise is patched in
        x = S.SOLVERS[name].fn(
            denoise, jnp.asarray(ref["x_T"]), jnp.asarray(ref["sigmas"]), keys, process, **options
        )
    # Both sides in float64 with the same formulas up to rearrangement: rounding
    # differences of ~1e-16 relative (measured: <= 2e-15).
    np.testing.assert_allclose(np.asarray(x), ref[f"case{k}"], rtol=0, atol=1e-12)


# ------------------------------------------------------------------ the ODE limit


@pytest.mark.slow  # three compilations; the fast suite keeps 2M's Algorithm-2 check
@pytest.mark.parametrize(
    "sde,ode,process,prediction",
    [
        ("euler_ancestral", "ddim", D.VP(), "eps"),
        ("dpmpp_2m_sde", "dpmpp_2m", D.Flow(), "velocity"),
        ("dpmpp_3m_sde", "dpmpp_3m", D.VP("cosine", None), "v"),
    ],
)
def test_eta_zero_is_the_ode_solver_bit_for_bit(sde, ode, process, prediction):
    model = as_prediction(MIXTURE.denoiser(process), process, prediction)
    kw = dict(prediction=prediction, steps=6)
    key = jax.random.key(3)
    x_sde, info = S.sample(
        model, None, process, key, (8, 2), solver=sde, **kw, solver_options={"eta": 0.0}
    )
    x_ode, info_ode = S.sample(model, None, process, key, (8, 2), solver=ode, **kw)
    np.testing.assert_array_equal(np.asarray(x_sde), np.asarray(x_ode))
    assert info["nfe"] == info_ode["nfe"] == 6


def test_dpmpp_2m_midpoint_at_eta_zero_is_lu_et_al_algorithm_2():
    # DPM-Solver++(2M), Lu et al. (2022b) Algorithm 2, written out in float64 numpy
    # on a continuous VP process with a v-prediction model.
    process = D.VP("cosine", None)
    model = as_prediction(MIXTURE.denoiser(process), process, "v")
    with jax.enable_x64(True):
        ts = jnp.asarray(S.make_grid("logsnr", process, 7))
        x_T = jax.random.normal(jax.random.key(2), (16, 2), jnp.float64) * process.sigma(ts[0])
        got, _ = S.sample(
            model,
            None,
            process,
            jax.random.key(0),
            (16, 2),
            prediction="v",
            solver="dpmpp_2m_sde",
            steps=7,
            x_T=x_T,
            solver_options={"eta": 0.0, "solver_type": "midpoint"},
        )
        alpha, sigma = np.asarray(process.alpha(ts)), np.asarray(process.sigma(ts))
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)
        x0_of = jax.jit(
            lambda x, t: D.convert(
                model(None, x, jnp.full((16,), t), None), "v", "x0", x_t=x, t=t, process=process
            )
        )
        x, x0_prev, h_prev = np.asarray(x_T), None, None
        for i in range(7):
            x0 = np.asarray(x0_of(jnp.asarray(x), ts[i]))
            h = lam[i + 1] - lam[i]
            if x0_prev is None or not np.isfinite(h):
                d = x0  # first step and the step into sigma = 0 are first order
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
            x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * np.expm1(-h) * d
            x0_prev, h_prev = x0, h
    # Same float64 math in another arrangement: agreement to rounding.
    np.testing.assert_allclose(np.asarray(got), x, rtol=0, atol=1e-12)


def _edm_grid(process, steps):
    # Geometric from 80 to 0.05: the error is measured away from the final jump.
    return np.geomspace(80.0, 0.05, steps + 1)


def test_dpmpp_2m_heun_at_eta_zero_has_strong_order_two():
    process = D.EDM()
    model = MIXTURE.denoiser(process)
    kw = dict(prediction="x0", grid=_edm_grid, solver_options={"eta": 0.0, "solver_type": "heun"})
    with jax.enable_x64(True):
        x_T = 80.0 * jax.random.normal(jax.random.key(1), (64, 2), jnp.float64)
        run = lambda solver, steps, **o: np.asarray(
            S.sample(
                model,
                None,
                process,
                jax.random.key(0),
                (64, 2),
                solver=solver,
                steps=steps,
                x_T=x_T,
                **(kw | o),
            )[0]
        )
        # DPM-Solver++(3M) at 256 steps: error ~ err(32) / 8^3, far below what is measured.
        ref = run("dpmpp_3m", 256, solver_options=None)
        errors = [np.sqrt(np.mean((run("dpmpp_2m_sde", n) - ref) ** 2)) for n in (8, 16, 32)]
    slope = -np.polyfit(np.log([8, 16, 32]), np.log(errors), 1)[0]
    assert np.all(np.diff(errors) < 0) and slope > 1.7, (slope, errors)


# ------------------------------------------------------------------ SA-Solver


def _ode_errors(solver, options, steps=(8, 16, 32)):
    """RMS errors against a 256-step DPM-Solver++(3M) reference on the EDM mixture."""
    process = D.EDM()
    model = MIXTURE.denoiser(process)
    with jax.enable_x64(True):
        x_T = 80.0 * jax.random.normal(jax.random.key(1), (64, 2), jnp.float64)
        run = lambda solver, n, o: np.asarray(
            S.sample(
                model,
                None,
                process,
                jax.random.key(0),
                (64, 2),
                prediction="x0",
                solver=solver,
                steps=n,
                grid=_edm_grid,
                x_T=x_T,
                solver_options=o,
            )[0]
        )
        ref = run("dpmpp_3m", 256, None)
        return [np.sqrt(np.mean((run(solver, n, options) - ref) ** 2)) for n in steps]


@pytest.mark.parametrize(
    "options,order",
    [
        pytest.param({"predictor_order": 2, "corrector_order": 0}, 1.8, marks=pytest.mark.slow),
        ({}, 3.5),
    ],
    ids=["predictor-2", "predictor-3-corrector-3"],
)
def test_sa_solver_order_in_the_ode_limit(options, order):
    # Xue et al. (2023): an s-step predictor has order s, the corrector adds one.
    # Measured slopes: 2.06 and 4.03.
    errors = _ode_errors("sa_solver", {"tau": 0.0, **options})
    slope = -np.polyfit(np.log([8, 16, 32]), np.log(errors), 1)[0]
    assert np.all(np.diff(errors) < 0) and slope > order, (slope, errors)


@pytest.mark.slow  # ~6 s: two x64 compilations
def test_sa_solver_first_order_ode_is_ddim():
    process = D.VP("cosine", None)
    model = as_prediction(MIXTURE.denoiser(process), process, "eps")
    options = {"tau": 0.0, "predictor_order": 1, "corrector_order": 0}
    with jax.enable_x64(True):
        kw = dict(prediction="eps", steps=10)
        a, _ = S.sample(
            model,
            None,
            process,
            jax.random.key(0),
            (8, 2),
            solver="sa_solver",
            solver_options=options,
            **kw,
        )
        b, _ = S.sample(model, None, process, jax.random.key(0), (8, 2), solver="ddim", **kw)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12)


# ------------------------------------------------------------------ restart sampling


def test_restart_without_restarts_is_heun_and_counts_its_evaluations():
    process = D.EDM()
    model = MIXTURE.denoiser(process)
    key, kw = jax.random.key(0), dict(prediction="x0", steps=10)
    plain, _ = S.sample(model, None, process, key, (16, 2), solver="heun", **kw)
    none, _ = S.sample(
        model,
        None,
        process,
        key,
        (16, 2),
        solver="restart",
        **kw,
        solver_options={"restart_times": 0},
    )
    np.testing.assert_array_equal(np.asarray(none), np.asarray(plain))
    calls = []

    def counted(params, x, t, cond):
        calls.append(1)
        return model(params, x, t, cond)

    options = {"restart_times": 2, "restart_steps": 3}
    with jax.disable_jit():  # the restart branch runs once, every call is seen
        _, info = S.sample(
            counted,
            None,
            process,
            key,
            (2, 2),
            prediction="x0",
            solver="restart",
            steps=12,
            solver_options=options,
        )
    # 6 main Heun steps (the last into sigma = 0 costs one) + 2 x 3 restart Heun steps.
    assert len(calls) == info["nfe"] == 2 * 6 - 1 + 2 * 3 * 2


def test_restart_budget_is_checked():
    with pytest.raises(InputError, match="main pass"):
        S.sample(
            MIXTURE.denoiser(D.EDM()),
            None,
            D.EDM(),
            jax.random.key(0),
            (2, 2),
            prediction="x0",
            solver="restart",
            steps=6,
            solver_options={"restart_times": 2, "restart_steps": 3},
        )


# ------------------------------------------------------------------ weak convergence

# (process, prediction, options, coarse steps, fine steps): every process family
# and several prediction types; the first-order ancestral sampler needs the most.
WEAK_CASES = {
    "euler_ancestral": (D.VP(), "eps", {}, 20, 250),
    "dpmpp_2m_sde": (D.EDM(), "x0", {}, 10, 50),
    "dpmpp_2m_sde-heun": (D.Flow(), "velocity", {"solver_type": "heun"}, 10, 50),
    "dpmpp_3m_sde": (D.VP("cosine", None), "v", {}, 10, 50),
    "restart": (D.EDM(), "x0", {"restart_times": 2}, 8, 40),
    "sa_solver": (D.EDM(), "x0", {}, 10, 40),
}


@pytest.mark.slow  # ~12 s each on 2 cores: 20000 samples, two compilations
@pytest.mark.parametrize("case", list(WEAK_CASES))
def test_moments_converge_weakly_as_steps_grow(case):
    process, prediction, options, coarse, fine = WEAK_CASES[case]
    model = as_prediction(MIXTURE.denoiser(process), process, prediction)
    n = 20000
    errors = {}
    for steps in (coarse, fine):
        x, _ = S.sample(
            model,
            None,
            process,
            jax.random.key(4),
            (n, 2),
            prediction=prediction,
            solver=case.split("-")[0],
            steps=steps,
            solver_options=options,
        )
        x = np.asarray(x, np.float64)
        mean, cov = x.mean(0), np.cov(x.T)
        errors[steps] = np.abs(cov - MIXTURE.cov()).max()
    # Standard errors of the estimators from the samples themselves; 4.5 of them
    # (p ~ 1e-5 per entry) plus 0.01 for the solver's remaining bias at `fine` steps.
    se_mean = x.std(0) / np.sqrt(n)
    c = x - mean
    se_cov = np.std(c[:, :, None] * c[:, None, :], axis=0) / np.sqrt(n)
    assert np.all(np.abs(mean - MIXTURE.mean()) < 4.5 * se_mean + 0.01), mean - MIXTURE.mean()
    assert np.all(np.abs(cov - MIXTURE.cov()) < 4.5 * se_cov + 0.01), cov - MIXTURE.cov()
    # The coarse grid's bias is measured at 0.05-0.6, far above 2 standard errors.
    assert errors[coarse] > errors[fine] + 2 * se_cov.max(), errors
