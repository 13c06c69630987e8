"""DDNM+ (Wang et al. 2023, Eqs. 17-19) and its time travel against moments propagated in
closed form."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_inverse import MU, V, gaussian_prior

from jaxgen import diffusion as D
from jaxgen.errors import InputError
from jaxgen.sampling import inverse as I
from jaxgen.sampling import make_denoiser, make_grid, step_noise

N, D_SHAPE = 4096, (4, 4, 1)
MASK = np.arange(16).reshape(4, 4, 1) % 2 == 0
Y = 1.7  # every observed pixel


def _run(noise_std, steps=50, **travel):
    op, process = I.Inpaint(MASK), D.VP()
    y = jnp.broadcast_to(op(jnp.full((1, *D_SHAPE), Y)), (N, *D_SHAPE))
    x, info = I.posterior_sample(gaussian_prior(process), None, process, jax.random.key(3), y,
                                 op, (N, *D_SHAPE), prediction="x0", method="ddnm+",
                                 noise_std=noise_std, solver="ddpm", steps=steps, **travel)
    return np.asarray(x), np.asarray(y), info


def _coefficients(a, s, a1, s1, noise_std):
    """The DDNM+ step ``t -> s`` in float64: DDPM's ``coef`` (of ``x0``), ``b`` (of ``x_t``),
    Eq. 19's ``lambda_t`` and the variance ``gamma_t`` of the fresh noise."""
    v = min(max((s1 / s) ** 2 * (s * s - (a / a1 * s1) ** 2), 0.0), s1 * s1)
    b = np.sqrt(s1 * s1 - v) / s
    coef = a1 - b * a
    lam = 1.0 if np.sqrt(v) >= coef * noise_std else np.sqrt(v) / (coef * noise_std)
    return coef, b, lam, max(v - (coef * lam * noise_std) ** 2, 0.0)


def _schedule(ts):
    p = D.VP()
    return (np.asarray(p.alpha(jnp.asarray(ts)), np.float64),
            np.asarray(p.sigma(jnp.asarray(ts)), np.float64))


def _moments(ts, m, y, noise_std, path):
    """Mean and variance of one pixel (mask ``m``) at the end of the DDNM+ ``path``, in float64.

    With the exact Gaussian denoiser ``D(x) = c0 + c1 x`` every step is affine in ``x``
    plus independent noise: ``x_s = coef ((1 - lam m) D(x) + lam m y) + b x + sqrt(gamma) z``;
    a jump back from ``t`` to ``u`` is the forward process ``x_u = r x_t + sqrt(sigma_u^2 -
    r^2 sigma_t^2) z``, ``r = alpha_u / alpha_t``.
    """
    alpha, sigma = _schedule(ts)
    mean, var = 0.0, sigma[0] ** 2  # x_T = sigma(t_0) z
    for i, j in itertools.pairwise(path):
        if j < i:
            r = alpha[j] / alpha[i]
            mean, var = r * mean, r * r * var + sigma[j] ** 2 - (r * sigma[i]) ** 2
            continue
        a, s = alpha[i], sigma[i]
        c1 = a * V / (a * a * V + s * s)
        c0 = MU - c1 * a * MU
        coef, b, lam, gamma = _coefficients(a, s, alpha[j], sigma[j], noise_std)
        k = coef * (1 - lam * m) * c1 + b
        mean = k * mean + coef * (1 - lam * m) * c0 + coef * lam * m * y
        var = k * k * var + gamma
    return mean, var


def _assert_moments(x, info, noise_std):
    """Per-pixel sample mean and std against :func:`_moments` of the path run.

    4.5 standard errors: ``sd / sqrt(N)`` for a mean, ``sd / sqrt(2 N)`` for a std (Gaussian
    pixels), plus float32 rounding. The target is the sampler's own law, not the exact
    posterior ``N(mu_post, V s^2 / (V + s^2))`` of an observed pixel: DDNM+ is not a
    posterior sampler. Its ``lambda_t``/``gamma_t`` schedule pulls an observed pixel to
    ``y`` rather than to the posterior: at 50 steps and ``s = 0.3`` its law is
    N(1.642, 0.069^2) against the posterior's N(1.486, 0.276^2), and its std goes to 0
    as the steps grow (0.020 at 1000). An unobserved pixel's posterior is the prior
    N(0.3, 0.5) (independent pixels), which DDPM with an exact denoiser reaches only as
    the steps grow (std 0.599 at 50 steps, 0.691 at 1000, against 0.707).
    """
    x = x.reshape(N, -1).astype(np.float64)
    for j, m in enumerate(MASK.ravel()):
        mean, var = _moments(info["timesteps"], float(m), Y if m else 0.0, noise_std,
                             info["path"])
        sd = np.sqrt(var)
        assert abs(x[:, j].mean() - mean) < 4.5 * sd / np.sqrt(N) + 1e-4, (j, mean)
        assert abs(x[:, j].std() - sd) < 4.5 * sd / np.sqrt(2 * N) + 1e-4, (j, sd)


def test_ddnm_plus_matches_its_closed_form_moments_and_is_ddnm_without_noise():
    noise_std = 0.3
    x, _, info = _run(noise_std)
    assert info["nfe"] == 50 and info["path"].tolist() == list(range(51))
    _assert_moments(x, info, noise_std)
    # The measurement noise is not copied in: an observed pixel keeps a spread (pinned
    # above to its closed form, 0.069, within 4.5 * 0.069 / sqrt(2 N) = 0.0034), but one
    # narrower than the exact posterior's 0.276.
    post_sd = np.sqrt(V * noise_std**2 / (V + noise_std**2))
    assert x.reshape(N, -1)[:, MASK.ravel()].std(0).max() < post_sd / 2
    clean, y0, _ = _run(0.0, steps=10)
    np.testing.assert_array_equal(clean[:, MASK[..., 0]], y0[:, MASK[..., 0]])


def get_schedule_jump(t_sampling, travel_length, travel_repeat):
    """The official DDNM code's (and RePaint's) schedule, transcribed: positions T-1 ... -1."""
    jumps = {j: travel_repeat - 1 for j in range(0, t_sampling - travel_length, travel_length)}
    t, ts = t_sampling, []
    while t >= 1:
        t = t - 1
        ts.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] = jumps[t] - 1
            for _ in range(travel_length):
                t = t + 1
                ts.append(t)
    ts.append(-1)
    return ts


@pytest.mark.parametrize("steps,length,repeat", [(10, 1, 2), (20, 5, 2), (20, 3, 3), (7, 2, 1)])
def test_travel_path_is_the_official_schedule(steps, length, repeat):
    official = steps - 1 - np.asarray(get_schedule_jump(steps, length, repeat))
    # Theirs steps back one position at a time; the forward process makes a run of
    # steps back one jump, so only the last position of each run is kept.
    down = np.diff(official) > 0
    keep = np.concatenate([[True], down | np.append(down[1:], True)])
    np.testing.assert_array_equal(I.travel_path(steps, length, repeat=repeat), official[keep])


def test_time_travel_keeps_observed_pixels_counts_its_evaluations_and_its_moments():
    noise_std, travel = 0.3, dict(travel_length=5, travel_interval=5, travel_repeat=2)
    x, _, info = _run(noise_std, steps=20, **travel)
    # Trips back at steps 5, 10 and 15 before the end: 3 x 5 more evaluations.
    assert info["nfe"] == 20 + 3 * 5
    assert np.sum(np.diff(info["path"]) < 0) == 3
    # On a Gaussian prior with its exact denoiser the chain is near its target at every
    # level, so travel moves the law by less than a standard error here: this pins that
    # it keeps it; the trajectory test below pins the arithmetic of each jump.
    _assert_moments(x, info, noise_std)
    clean, y0, _ = _run(0.0, steps=20, **travel)
    np.testing.assert_array_equal(clean[:, MASK[..., 0]], y0[:, MASK[..., 0]])
    # Length 0 (or a single pass, repeat 1) is plain DDNM+, bit for bit.
    plain_x = _run(noise_std, steps=20)[0]
    np.testing.assert_array_equal(_run(noise_std, steps=20, travel_length=0)[0], plain_x)
    np.testing.assert_array_equal(
        _run(noise_std, steps=20, travel_length=5, travel_repeat=1)[0], plain_x)


def test_time_travel_trajectory_equals_its_float64_transcription():
    """Same injected noise (position ``n`` of the path draws ``step_noise(keys, n)``)."""
    batch, steps, noise_std, process, op = 4, 6, 0.3, D.VP(), I.Inpaint(MASK)
    ts = make_grid(process.default_grid, process, steps)
    alpha, sigma = _schedule(ts)
    path = I.travel_path(steps, 2, repeat=3)
    keys = jax.random.split(jax.random.key(5), batch)
    x_T = sigma[0] * np.asarray(jax.random.normal(jax.random.key(6), (batch, *D_SHAPE)))
    y = np.asarray(op(jnp.full((batch, *D_SHAPE), Y)))
    prior = gaussian_prior(process)
    denoise = make_denoiser(lambda x, t, c: prior(None, x, t, c), process, "x0")
    got = I.ddnm_plus(denoise, jnp.asarray(x_T, jnp.float32), jnp.asarray(ts, jnp.float32),
                      keys, process, operator=op, y=jnp.asarray(y), noise_std=noise_std,
                      path=path)
    x, m = x_T.astype(np.float64), MASK.astype(np.float64)
    for n, (i, j) in enumerate(itertools.pairwise(path)):
        z = np.asarray(step_noise(keys, n, jnp.zeros((batch, *D_SHAPE))), np.float64)
        if j < i:  # q(x_u | x_t)
            r = alpha[j] / alpha[i]
            x = r * x + np.sqrt(sigma[j] ** 2 - (r * sigma[i]) ** 2) * z
            continue
        a, s = alpha[i], sigma[i]
        x0 = MU + a * V / (a * a * V + s * s) * (x - a * MU)  # the exact denoiser
        coef, b, lam, gamma = _coefficients(a, s, alpha[j], sigma[j], noise_std)
        x0 = x0 - lam * m * (x0 - y)  # Eq. 17 with A = A^+ = the mask
        x = coef * x0 + b * x + np.sqrt(gamma) * z
    assert np.sum(np.diff(path) < 0) == 2 * 2  # two stretches, each sampled 3 times
    # float32 arithmetic over 14 steps of O(1) values: errors of a few 1e-7 each.
    np.testing.assert_allclose(np.asarray(got), x, atol=1e-5)


def test_ddnm_plus_is_refused_with_another_solver_and_bad_travel():
    fail = lambda *a: pytest.fail("traced")
    args = (fail, None, D.VP(), jax.random.key(0), jnp.zeros((1, *D_SHAPE)), I.Inpaint(MASK),
            (1, *D_SHAPE))
    with pytest.raises(InputError, match="solver='ddpm'"):
        I.posterior_sample(*args, prediction="x0", method="ddnm+", noise_std=0.1)
    with pytest.raises(InputError, match="0 <= length < steps"):
        I.posterior_sample(*args, prediction="x0", method="ddnm+", solver="ddpm", steps=10,
                           travel_length=10)
    with pytest.raises(InputError, match="an option of method='ddnm\\+', not 'pigdm'"):
        I.posterior_sample(*args, prediction="x0", method="pigdm", travel_length=2)
