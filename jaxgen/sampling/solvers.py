"""Solvers: short pure functions with one signature.

``solver(denoise, x, ts, keys, process, **options) -> x``

- ``denoise``: a :class:`~jaxgen.sampling.guidance.Denoiser`;
  ``denoise.step(x, t, state) -> (x0, eps, state)`` gives posterior means at scalar
  time ``t`` with guidance already applied (built once by the driver). Its state
  (APG's momentum, cached features) starts at ``denoise.init(x)`` and is carried
  through every scan, one update per evaluation. At ``sigma(t) = 0`` it
  returns ``(x / alpha, 0)`` without calling the model: the clean point is its
  own denoised value, and ``eps -> 0`` is the t -> 0 limit for a data density
  with a finite score.
- ``x``: ``[B, ...]`` at time ``ts[0]``; ``ts``: ``[n + 1]`` decreasing times.
- ``keys``: ``[B]`` per-sample keys; step ``i`` draws ``step_noise(keys, i, x)``,
  so a sample's noise depends on its own key only.

Loops run under ``lax.scan``; NFE counting, guidance and sharding live in
the driver (:mod:`jaxgen.sampling.driver`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxgen.diffusion import vlb
from jaxgen.errors import InputError


def step_noise(keys, i, x):
    """Standard normal noise like ``x`` for step ``i``, sample ``b`` drawn from ``keys[b]`` only."""
    draw = lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], x.dtype)
    return jax.vmap(draw)(keys)


def _lam(process, t):
    """DPM-Solver's ``lambda = log(alpha / sigma)`` (half the log-SNR)."""
    return 0.5 * process.logsnr(t)


def ddim(denoise, x, ts, keys, process, *, eta: float = 0.0, s_noise: float = 1.0):
    """DDIM (Song et al. 2021, Eq. 12 with sigma_t(eta) of Eq. 16); ``eta = 1`` is DDPM.

    With ``eta = 1`` the step samples the posterior ``q(x_s | x_t, x0)`` of Ho et
    al. (2020, Eqs. 6-7), i.e. ancestral sampling with variance beta~_t; the
    variance is written for any ``(alpha, sigma)``:
    ``eta^2 (sigma_s / sigma_t)^2 (sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2)``.
    This is k-diffusion's ``sample_euler_ancestral`` with the same ``eta``: its
    ``sigma_up = min(sigma_s, eta sigma_s sqrt(1 - sigma_s^2 / sigma_t^2))`` is this
    standard deviation in ``x / alpha``, and its Euler step to ``sigma_down`` lands
    on ``alpha_s x0 + sqrt(sigma_s^2 - var) eps``. ``s_noise`` scales the fresh noise.
    """

    alpha, sigma = process.alpha(ts), process.sigma(ts)  # once, not per step

    def step(carry, i):
        x, state = carry
        x0, eps, state = denoise.step(x, ts[i], state)
        a, s, a1, s1 = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        if not eta:
            return (a1 * x0 + s1 * eps, state), None
        var = eta**2 * (s1 / s) ** 2 * (s**2 - (a / a1 * s1) ** 2)
        var = jnp.clip(var, 0.0, s1**2)
        z = s_noise * step_noise(keys, i, x)
        return (a1 * x0 + jnp.sqrt(s1**2 - var) * eps + jnp.sqrt(var) * z, state), None

    return lax.scan(step, (x, denoise.init(x)), jnp.arange(len(ts) - 1))[0][0]


def ddpm_learned(denoise, x, ts, keys, process):
    """Ancestral DDPM with IDDPM's learned-range variance (Nichol & Dhariwal 2021, Eq. 15).

    ``x_s = mu~(x_t, x0) + exp(log Sigma / 2) z``: the posterior mean of Ho et al. (2020,
    Eq. 7) and ``log Sigma = frac log beta + (1 - frac) log beta~``, ``frac = (v + 1) / 2``,
    from the variance channels ``v`` of the same evaluation (``state["variance"]`` of a
    denoiser built with ``learned_variance=True``; under CFG the conditional pass's, as
    DiT's ``forward_with_cfg``). ``beta = 1 - abar_t / abar_s`` is the step's own beta,
    IDDPM's respaced one (:func:`jaxgen.diffusion.vlb.posterior`). The step into
    ``t = 0`` returns ``x0`` without noise. On the ``iddpm`` grid this is ADM's and DiT's
    ``p_sample_loop`` of a respaced diffusion with ``clip_denoised=False``.
    """
    state = denoise.init(x)
    if "variance" not in state:
        raise InputError("ddpm_learned needs the model's variance: a denoiser built with "
                         "make_denoiser(..., learned_variance=True), as sampling.sample does.")
    c_x0, c_xt, log_beta, log_var = vlb.posterior(process, ts[:-1], ts[1:])  # once
    noisy = process.sigma(ts[1:]) > 0  # log_var is -inf into t = 0

    def step(carry, i):
        x, state = carry
        x0, _, state = denoise.step(x, ts[i], state)
        log_sigma2 = vlb.learned_range_log_variance(state["variance"], log_beta[i], log_var[i])
        noise = jnp.where(noisy[i], jnp.exp(0.5 * log_sigma2), 0.0) * step_noise(keys, i, x)
        return (c_x0[i] * x0 + c_xt[i] * x + noise, state), None

    return lax.scan(step, (x, state), jnp.arange(len(ts) - 1))[0][0]


# Butcher tableaus (A below the diagonal, b, c) of explicit Runge-Kutta methods.
TABLEAUS = {
    "euler": ((), (1.0,), (0.0,)),
    "midpoint": (((0.5,),), (0.0, 1.0), (0.0, 0.5)),
    "heun": (((1.0,),), (0.5, 0.5), (0.0, 1.0)),
    "rk4": (
        ((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
        (1 / 6, 1 / 3, 1 / 3, 1 / 6),
        (0.0, 0.5, 0.5, 1.0),
    ),
}


def _velocity(denoise, process, x, t, state):
    """The probability-flow ODE's ``dx/dt = alpha' x0 + sigma' eps``, and the new state."""
    x0, eps, state = denoise.step(x, t, state)
    d_alpha, d_sigma = process.d_alpha(t), process.d_sigma(t)
    # At sigma = 0, eps = 0 and sigma' may be infinite (VP: sigma ~ sqrt(t)).
    clean = jnp.where(jnp.isfinite(d_alpha), d_alpha, 0.0) * x0
    return jnp.where(process.sigma(t) > 0, d_alpha * x0 + d_sigma * eps, clean), state


def runge_kutta(
    denoise,
    x,
    ts,
    keys,
    process,
    *,
    tableau: str = "heun",
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
):
    """Explicit Runge-Kutta on the probability-flow ODE ``dx/dt = alpha' x0 + sigma' eps``.

    In the process's own time: for :class:`~jaxgen.diffusion.Flow` this is the
    flow ODE (Euler, midpoint, Heun, RK4); for :class:`~jaxgen.diffusion.EDM`
    ``dx/dsigma = eps`` and ``heun`` with ``s_churn > 0`` is Karras et al. (2022),
    Algorithm 2: before each step the noise level is raised by
    ``gamma = min(s_churn / n, sqrt(2) - 1)`` where ``s_tmin <= sigma <= s_tmax``
    (``sigma = sigma(t) / alpha(t)``), by forward-noising ``x`` from ``t`` to ``t_hat``.
    A stage at the clean point uses ``eps = 0`` (see the module docstring)
    where EDM takes a plain Euler last step; both cost no model call there.
    """
    a_mat, b, c = TABLEAUS[tableau]
    n = len(ts) - 1
    velocity = functools.partial(_velocity, denoise, process)

    def churn(x, t, i):
        lam = process.logsnr(t)
        sigma, a = jnp.exp(-lam / 2), process.alpha(t)
        on = (sigma >= s_tmin) & (sigma <= s_tmax) & (a > 0)
        gamma = jnp.where(on, min(s_churn / n, math.sqrt(2) - 1), 0.0)
        t_hat = jnp.where(gamma > 0, process.t_from_logsnr(lam - 2 * jnp.log1p(gamma)), t)
        ratio = process.alpha(t_hat) / a
        extra = jnp.maximum(process.sigma(t_hat) ** 2 - (ratio * process.sigma(t)) ** 2, 0.0)
        return ratio * x + jnp.sqrt(extra) * s_noise * step_noise(keys, i, x), t_hat

    def step(carry, i):
        x, state = carry
        t, t1 = ts[i], ts[i + 1]
        if s_churn > 0:
            x, t = churn(x, t, i)
        h = t1 - t
        k = []
        for j, cj in enumerate(c):
            xj = x + h * sum(a * k_l for a, k_l in zip(a_mat[j - 1], k, strict=False)) if j else x
            kj, state = velocity(xj, t1 if cj == 1 else t + cj * h, state)
            k.append(kj)
        return (x + h * sum(bj * kj for bj, kj in zip(b, k, strict=True) if bj), state), None

    return lax.scan(step, (x, denoise.init(x)), jnp.arange(n))[0][0]


def euler_maruyama(denoise, x, ts, keys, process, *, diffusion: str = "sigma", scale: float = 1.0):
    """Euler-Maruyama on the reverse SDE of SiT (Ma et al. 2024, Eq. 5).

    ``dx = [v(x, t) - w(t)/2 score(x, t)] dt + sqrt(w(t)) dW``, run from ``t_max``
    to 0; every ``w >= 0`` has the same marginals as the ODE. ``diffusion``:
    ``"sigma"`` (``w = scale sigma(t)``), ``"constant"`` (``w = scale``) or
    ``"sbdm"`` (``w = -scale sigma^2 dlogsnr/dt``, the score-SDE choice, which is
    ``beta(t)`` on VP). The last step adds no noise (SiT's "Mean" last step).
    """
    if diffusion not in ("sigma", "constant", "sbdm"):
        raise InputError(f"diffusion={diffusion!r}: use 'sigma', 'constant' or 'sbdm'.")
    n = len(ts) - 1

    def w_of(t):
        s = process.sigma(t)
        if diffusion == "sigma":
            return scale * s
        if diffusion == "constant":
            return scale * jnp.ones_like(s)
        return -scale * s**2 * process.d_logsnr(t)

    def step(carry, i):
        x, state = carry
        t, t1 = ts[i], ts[i + 1]
        x0, eps, state = denoise.step(x, t, state)
        w = w_of(t)
        velocity = process.d_alpha(t) * x0 + process.d_sigma(t) * eps
        drift = velocity + 0.5 * w * eps / process.sigma(t)  # -w/2 score = +w/2 eps / sigma
        dt = t1 - t
        noise = jnp.where(i < n - 1, jnp.sqrt(-w * dt), 0.0) * step_noise(keys, i, x)
        return (x + dt * drift + noise, state), None

    return lax.scan(step, (x, denoise.init(x)), jnp.arange(n))[0][0]


def restart(
    denoise,
    x,
    ts,
    keys,
    process,
    *,
    restart_times: int = 1,
    restart_steps: int | None = None,
    restart_min: float = 0.1,
    restart_max: float = 2.0,
    s_noise: float = 1.0,
):
    """Restart sampling (Xu et al. 2023, Algorithm 1) with Heun steps in the process's time.

    Of the grid's ``n`` Heun steps, ``K N_r`` go to restarts (``K = restart_times``,
    ``N_r = restart_steps``, default ``n // 4``), so the cost is that of ``n`` Heun
    steps: the main pass runs ``m = n - K N_r`` steps on the grid resampled to ``m``
    intervals (piecewise linear in ``t`` through the given times, ends kept). At the
    main grid's noisy point ``t_lo`` whose ``sigma/alpha`` is nearest ``restart_min``, ``K``
    times: forward-noise ``x`` to ``t_hi`` (``sigma/alpha = restart_max``),
    ``x <- (alpha_hi/alpha_lo) x + sqrt(sigma_hi^2 - (alpha_hi sigma_lo / alpha_lo)^2) z``,
    and return to ``t_lo`` by ``N_r`` Heun steps on a Karras (``rho = 7``) grid of
    ``sigma/alpha``. The defaults (0.1, 2) are those of the authors' sampler for A1111.
    """
    n = len(ts) - 1
    n_r = max(1, n // 4) if restart_steps is None else restart_steps
    m = n - restart_times * n_r
    if restart_times < 0 or n_r < 1 or m < (2 if restart_times else 1):
        raise InputError(
            f"restart_times={restart_times}, restart_steps={n_r} leave {m} of steps={n} to the "
            "main pass; it needs >= 2 (one noisy point to restart from)."
        )
    if not 0 < restart_min < restart_max:
        raise InputError(
            f"restart_min={restart_min}, restart_max={restart_max}: need 0 < min < max."
        )
    velocity = functools.partial(_velocity, denoise, process)

    def heun(carry, t, t1):
        x, state = carry
        k1, state = velocity(x, t, state)
        k2, state = velocity(x + (t1 - t) * k1, t1, state)
        return x + 0.5 * (t1 - t) * (k1 + k2), state

    main = jnp.interp(jnp.arange(m + 1) * (n / m), jnp.arange(n + 1), ts)
    main = main.at[0].set(ts[0]).at[-1].set(ts[-1])
    init = (x, denoise.init(x))
    if not restart_times:
        plain = lambda c, i: (heun(c, main[i], main[i + 1]), None)
        return lax.scan(plain, init, jnp.arange(m))[0][0]
    level = lambda t: jnp.exp(-0.5 * process.logsnr(t))  # sigma / alpha
    j_r = 1 + jnp.argmin(jnp.abs(jnp.log(level(main[1:-1]) / restart_min)))
    t_lo, t_hi = main[j_r], process.t_from_logsnr(-2 * math.log(restart_max))
    inv = restart_max ** (1 / 7) + jnp.linspace(0, 1, n_r + 1) * (
        level(t_lo) ** (1 / 7) - restart_max ** (1 / 7)
    )
    sub = process.t_from_logsnr(-14 * jnp.log(inv)).at[0].set(t_hi).at[-1].set(t_lo)
    ratio = process.alpha(t_hi) / process.alpha(t_lo)
    jump = jnp.sqrt(jnp.maximum(process.sigma(t_hi) ** 2 - (ratio * process.sigma(t_lo)) ** 2, 0))

    def one_restart(carry, k):
        x, state = carry
        x = ratio * x + jump * s_noise * step_noise(keys, k, x)
        back = lambda c, j: (heun(c, sub[j], sub[j + 1]), None)
        return lax.scan(back, (x, state), jnp.arange(n_r))[0], None

    def step(carry, i):
        carry = heun(carry, main[i], main[i + 1])
        again = lambda c: lax.scan(one_restart, c, jnp.arange(restart_times))[0]
        return lax.cond(i + 1 == j_r, again, lambda c: c, carry), None

    return lax.scan(step, init, jnp.arange(m))[0][0]


def _sde_terms(h, eta: float, s_noise: float, sigma_next, keys, i, x):
    """``(e^{-eta h}, (1 + eta) h, noise)`` of a DPM-Solver++ SDE step (``eta = 0``: the ODE).

    The noise ``sigma_s sqrt(1 - e^{-2 eta h}) z`` is the exact variance of the
    linear part of the SDE over the step; with ``eta = 0`` nothing is drawn and
    ``0 * inf`` (an infinite log-SNR step) never occurs.
    """
    if not eta:
        return 1.0, h, 0.0
    z = step_noise(keys, i, x)
    noise = sigma_next * jnp.sqrt(-jnp.expm1(-2 * eta * h)) * (s_noise * z)
    return jnp.exp(-eta * h), (1 + eta) * h, noise


def dpmpp_2m(
    denoise,
    x,
    ts,
    keys,
    process,
    *,
    eta: float = 0.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
):
    """DPM-Solver++(2M), Lu et al. (2022b), Algorithm 2; with ``eta > 0`` its SDE form.

    ``x_s = (sigma_s/sigma_t) e^{-eta h} x_t + alpha_s (1 - e^{-H}) x0 + alpha_s c (x0 - x0_prev)/r
    + sigma_s sqrt(1 - e^{-2 eta h}) s_noise z`` with ``H = (1 + eta) h``, ``r = h_prev / h``
    and ``c = (1 - e^{-H}) / 2`` (``"midpoint"``: Algorithm 2's ``D`` at ``eta = 0``) or
    ``c = 1 - (1 - e^{-H}) / H`` (``"heun"``). ``eta = 1`` is the SDE-DPM-Solver++(2M) of
    the same paper, as k-diffusion's ``sample_dpmpp_2m_sde``. First order on the first
    step, after an infinite log-SNR step, and into ``sigma = 0``.
    """
    if solver_type not in ("midpoint", "heun"):
        raise InputError(f"solver_type={solver_type!r}: use 'midpoint' or 'heun'.")
    alpha, sigma, lam = process.alpha(ts), process.sigma(ts), _lam(process, ts)

    def step(carry, i):
        x, x0_prev, h_prev, state = carry
        x0, _, state = denoise.step(x, ts[i], state)
        h = lam[i + 1] - lam[i]
        decay, big_h, noise = _sde_terms(h, eta, s_noise, sigma[i + 1], keys, i, x)
        gain = -jnp.expm1(-big_h)
        c = 0.5 * gain if solver_type == "midpoint" else 1 - gain / big_h
        second = jnp.isfinite(h) & jnp.isfinite(h_prev)
        x0_diff = jnp.where(second, c * (h / h_prev) * (x0 - x0_prev), 0.0)
        x = sigma[i + 1] / sigma[i] * decay * x + alpha[i + 1] * (gain * x0 + x0_diff) + noise
        return (x, x0, h, state), None

    init = (x, jnp.zeros_like(x), jnp.full((), jnp.inf, ts.dtype), denoise.init(x))
    return lax.scan(step, init, jnp.arange(len(ts) - 1))[0][0]


def dpmpp_3m(denoise, x, ts, keys, process, *, eta: float = 0.0, s_noise: float = 1.0):
    """DPM-Solver++(3M): third-order multistep data prediction; ``eta > 0`` its SDE form.

    The third-order exponential integrator of Lu et al. (2022b), Sec. 4 / App. B:
    ``x_s = (sigma_s/sigma_t) e^{-eta h} x_t + alpha_s [(1 - e^{-H}) x0 + phi_2 D1 - phi_3 D2]
    + sigma_s sqrt(1 - e^{-2 eta h}) s_noise z`` with ``H = (1 + eta) h``,
    ``phi_2 = (e^{-H} - 1)/H + 1``, ``phi_3 = phi_2 / H - 1/2`` and divided
    differences ``D1, D2`` of the last three ``x0``; lower order while history is
    short. ``eta = 1`` is k-diffusion's ``sample_dpmpp_3m_sde``.
    """

    alpha, sigma, lam = process.alpha(ts), process.sigma(ts), _lam(process, ts)

    def step(carry, i):
        x, x0_1, x0_2, h_1, h_2, state = carry
        x0, _, state = denoise.step(x, ts[i], state)
        a1 = alpha[i + 1]
        h = lam[i + 1] - lam[i]
        decay, big_h, noise = _sde_terms(h, eta, s_noise, sigma[i + 1], keys, i, x)
        phi_2 = jnp.expm1(-big_h) / big_h + 1
        phi_3 = phi_2 / big_h - 0.5
        r0, r1 = h_1 / h, h_2 / h
        d1_0, d1_1 = (x0 - x0_1) / r0, (x0_1 - x0_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        ok2 = jnp.isfinite(h) & jnp.isfinite(h_1)
        ok3 = ok2 & jnp.isfinite(h_2)
        corr = jnp.where(ok3, phi_2 * d1 - phi_3 * d2, jnp.where(ok2, phi_2 * d1_0, 0.0))
        x = sigma[i + 1] / sigma[i] * decay * x - a1 * jnp.expm1(-big_h) * x0 + a1 * corr + noise
        return (x, x0, x0_1, h, h_1, state), None

    inf = jnp.full((), jnp.inf, ts.dtype)
    init = (x, jnp.zeros_like(x), jnp.zeros_like(x), inf, inf, denoise.init(x))
    return lax.scan(step, init, jnp.arange(len(ts) - 1))[0][0]


def _sa_weights(nodes, h, a):
    """SA-Solver's ``b_j / alpha_s`` (Xue et al. 2023, Sec. 4): ``a int e^{a u} l_j(u) du``.

    ``u = lambda - lambda_s`` runs over ``[-h, 0]``; ``l_j`` is the Lagrange basis on
    ``nodes`` (the ``u`` of the stored ``x0``), ``a = 1 + tau^2``; the moments
    ``I_q = int u^q e^{a u} du`` follow ``I_q = -(-h)^q e^{-a h}/a - (q/a) I_{q-1}``.
    """
    moments = [-jnp.expm1(-a * h) / a]
    for q in range(1, len(nodes)):
        moments.append(-((-h) ** q) * jnp.exp(-a * h) / a - q / a * moments[-1])
    if len(nodes) == 1:
        return [a * moments[0]]
    vt = jnp.stack([jnp.stack([u**q for u in nodes]) for q in range(len(nodes))])
    w = _solve(vt, jnp.stack(moments))  # V^T w = I: w_j = sum_q (V^-1)_{qj} I_q
    return [a * w[j] for j in range(len(nodes))]


def sa_solver(
    denoise,
    x,
    ts,
    keys,
    process,
    *,
    tau: float = 1.0,
    predictor_order: int = 3,
    corrector_order: int = 3,
):
    """SA-Solver (Xue et al. 2023, Algorithm 1): stochastic Adams predictor-corrector.

    Data prediction in ``lambda`` with a constant ``tau`` (0 is the ODE):
    ``x_s = (sigma_s / sigma_t) e^{-tau^2 h} x_t + alpha_s sum_j b_j x0_j
    + sigma_s sqrt(1 - e^{-2 tau^2 h}) xi`` (the SA-Predictor), ``b_j`` from :func:`_sa_weights`
    on the last ``predictor_order`` ``x0``. The SA-Corrector redoes the step with
    the next point's ``x0`` as a node and the same ``xi``, reusing the next step's
    evaluation (one per step); ``corrector_order = 0`` skips it, and with ``tau = 0`` and
    ``predictor_order = 1`` the step is DDIM's. Orders 3 and 3 are the paper's setting;
    orders drop while history is short and to 1 across an infinite log-SNR step.
    """
    if not (1 <= predictor_order <= 4 and 0 <= corrector_order <= 4 and tau >= 0):
        raise InputError(
            f"sa_solver predictor_order={predictor_order}, corrector_order={corrector_order}, "
            f"tau={tau}: use orders 1..4 (corrector 0 = none) and tau >= 0."
        )
    p, c, a = predictor_order, corrector_order, 1 + tau**2
    alpha, sigma, lam = process.alpha(ts), process.sigma(ts), _lam(process, ts)
    depth = max(p, c)

    def sa_step(k, x, ms, lams, i):  # from ts[i] to ts[i + 1] on nodes ms[:k] at lams[:k]
        h = lam[i + 1] - lam[i]
        w = _sa_weights([lams[j] - lam[i + 1] for j in range(k)], h, a)
        x = sigma[i + 1] / sigma[i] * (jnp.exp(-(tau**2) * h) if tau else 1.0) * x
        x = x + alpha[i + 1] * sum(w[j] * ms[j] for j in range(k))
        if tau:
            x = x + sigma[i + 1] * jnp.sqrt(-jnp.expm1(-2 * tau**2 * h)) * step_noise(keys, i, x)
        return x

    def order(limit, lams):  # how many of the newest nodes are usable, at most `limit`
        return jnp.cumprod(jnp.isfinite(lams[:limit]).astype(jnp.int32)).sum()

    def step(carry, i):
        x, x_prev, hist_m, hist_lam, state = carry
        m, _, state = denoise.step(x, ts[i], state)
        new_m = jnp.concatenate([m[None], hist_m[:-1]])
        new_lam = jnp.concatenate([lam[i][None], hist_lam[:-1]])
        if c:
            k_c = jnp.where(jnp.isfinite(hist_lam[0]), order(c, new_lam), 0)  # 0: first step
            correctors = [functools.partial(sa_step, k, x_prev) for k in range(1, c + 1)]
            corrected = lax.switch(jnp.maximum(k_c, 1) - 1, correctors, new_m, new_lam, i - 1)
            x = jnp.where(k_c > 0, corrected, x)
        smooth = jnp.isfinite(lam[i]) & jnp.isfinite(lam[i + 1])
        k_p = jnp.where(smooth, order(p, new_lam), 1)
        predictors = [functools.partial(sa_step, k) for k in range(1, p + 1)]
        x_next = lax.switch(k_p - 1, predictors, x, new_m, new_lam, i)
        return (x_next, x, new_m, new_lam, state), None

    hist = jnp.zeros((depth, *x.shape), x.dtype), jnp.full((depth,), -jnp.inf, lam.dtype)
    init = (x, x, *hist, denoise.init(x))
    return lax.scan(step, init, jnp.arange(len(ts) - 1))[0][0]


def _unipc_rhos(rks, hh, b_h, order: int, corrector: bool):
    """Solve for UniPC's coefficients (Zhao et al. 2023, Eq. 8 and Thm. 3.1 / App. C)."""
    r = jnp.stack([*rks, jnp.ones_like(hh)])
    h_phi_k, fact, rows, rhs = jnp.expm1(hh) / hh - 1, 1, [], []
    for i in range(1, order + 1):
        rows.append(r ** (i - 1))
        rhs.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    mat, rhs = jnp.stack(rows), jnp.stack(rhs)
    if corrector:
        return jnp.full((1,), 0.5, hh.dtype) if order == 1 else _solve(mat, rhs)
    if order == 2:
        return jnp.full((1,), 0.5, hh.dtype)
    return _solve(mat[:-1, :-1], rhs[:-1])


def _solve(mat, rhs):
    """Cramer's rule for the 2x2 and 3x3 systems of UniPC (no LAPACK call to compile)."""
    det = jnp.linalg.det if mat.shape[0] > 3 else _det
    cols = [mat.at[:, j].set(rhs) for j in range(mat.shape[0])]
    return jnp.stack([det(c) for c in cols]) / det(mat)


def _det(m):
    if m.shape[0] == 2:
        return m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    return (
        m[0, 0] * (m[1, 1] * m[2, 2] - m[1, 2] * m[2, 1])
        - m[0, 1] * (m[1, 0] * m[2, 2] - m[1, 2] * m[2, 0])
        + m[0, 2] * (m[1, 0] * m[2, 1] - m[1, 1] * m[2, 0])
    )


def unipc(denoise, x, ts, keys, process, *, order: int = 3, variant: str = "bh2"):
    """UniPC (Zhao et al. 2023): UniP-p predictor (Alg. 2) and UniC corrector (Alg. 1).

    Data-prediction multistep in ``lambda``; ``B(h) = h`` (``bh1``) or ``e^h - 1``
    (``bh2``). The corrector reuses the model evaluation of the next step, so
    the cost stays one evaluation per step; order drops to 1 into ``sigma = 0``.
    """
    if variant not in ("bh1", "bh2") or order not in (1, 2, 3):
        raise InputError(f"unipc order={order}, variant={variant!r}: use 1..3 and 'bh1'/'bh2'.")
    p, lam = order, _lam(process, ts)
    alpha, sigma = process.alpha(ts), process.sigma(ts)
    b_of = (lambda hh: hh) if variant == "bh1" else jnp.expm1

    def predict(k, x, m, hist_m, hist_lam, i):
        h, hh = lam[i + 1] - lam[i], lam[i] - lam[i + 1]
        a1 = alpha[i + 1]
        x_ = sigma[i + 1] / sigma[i] * x - a1 * jnp.expm1(hh) * m
        if k == 1:
            return x_
        rks = [(hist_lam[j] - lam[i]) / h for j in range(k - 1)]
        rhos = _unipc_rhos(rks, hh, b_of(hh), k, corrector=False)
        res = sum(rhos[j] * (hist_m[j] - m) / rks[j] for j in range(k - 1))
        return x_ - a1 * b_of(hh) * res

    def correct(k, x_prev, m_new, hist_m, hist_lam, i):
        h, hh = lam[i] - hist_lam[0], hist_lam[0] - lam[i]
        a = alpha[i]
        x_ = sigma[i] / sigma[i - 1] * x_prev - a * jnp.expm1(hh) * hist_m[0]
        rks = [(hist_lam[j] - hist_lam[0]) / h for j in range(1, k)]
        rhos = _unipc_rhos(rks, hh, b_of(hh), k, corrector=True)
        res = sum(rhos[j - 1] * (hist_m[j] - hist_m[0]) / rks[j - 1] for j in range(1, k))
        return x_ - a * b_of(hh) * (res + rhos[-1] * (m_new - hist_m[0]))

    def step(carry, i):
        x, x_prev, hist_m, hist_lam, k_prev, state = carry
        m, _, state = denoise.step(x, ts[i], state)
        corrected = lax.switch(
            jnp.clip(k_prev, 1, p) - 1,
            [lambda *a, k=k: correct(k, *a) for k in range(1, p + 1)],
            x_prev, m, hist_m, hist_lam, i,
        )
        x = jnp.where((k_prev > 0) & jnp.isfinite(hist_lam[0]), corrected, x)
        valid = jnp.cumprod(jnp.isfinite(hist_lam[: p - 1]).astype(jnp.int32)).sum()
        smooth = jnp.isfinite(lam[i]) & jnp.isfinite(lam[i + 1])
        k = jnp.where(smooth, jnp.minimum(p, 1 + valid), 1).astype(jnp.int32)
        predictors = [lambda *a, k=k: predict(k, *a) for k in range(1, p + 1)]
        x_next = lax.switch(k - 1, predictors, x, m, hist_m, hist_lam, i)
        hist_m = jnp.concatenate([m[None], hist_m[:-1]])
        hist_lam = jnp.concatenate([lam[i][None], hist_lam[:-1]])
        return (x_next, x, hist_m, hist_lam, k, state), None

    init = (
        x,
        x,
        jnp.zeros((p, *x.shape), x.dtype),
        jnp.full((p,), -jnp.inf, lam.dtype),
        jnp.zeros((), jnp.int32),
        denoise.init(x),
    )
    return lax.scan(step, init, jnp.arange(len(ts) - 1))[0][0]
