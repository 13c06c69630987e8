"""Progressive distillation, reflow and DMD2 on Gaussian data with exact teachers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgen import diffusion as D
from jaxgen import sampling
from jaxgen.diffusion import distillation as T
from jaxgen.errors import InputError
from jaxgen.sampling.teacher import reflow_pairs

MU = np.array([0.3, -0.2], np.float32)
COV = np.array([[0.25, 0.06], [0.06, 0.09]], np.float32)
GAUSS = D.GaussianMixture(MU[None], COV[None], np.ones(1))


def test_progressive_target_makes_one_student_step_equal_two_teacher_ddim_steps():
    process = D.VP("cosine", None)
    teacher = GAUSS.denoiser(process)  # exact x0 model
    ts = np.linspace(process.t_max, 0.0, 9)  # teacher: 8 steps; student: 4

    @jax.jit
    def student_step(z, t, t_mid, t_next):  # one DDIM step with the target as x0
        target = T.progressive_target(teacher, None, z, t, t_mid, t_next, None,
                                      process=process, prediction="x0")
        eps = (z - process.alpha(t[0]) * target) / process.sigma(t[0])
        return process.alpha(t_next[0]) * target + process.sigma(t_next[0]) * eps

    for i in (0, 2, 3):  # first, middle and last (into t = 0) student step
        t, t_mid, t_next = (jnp.full((16,), ts[2 * i + j], jnp.float32) for j in range(3))
        z = process.alpha(t[0]) * GAUSS.sample(jax.random.key(i), 16) + process.sigma(
            t[0]) * jax.random.normal(jax.random.key(10 + i), (16, 2))
        one_step = student_step(z, t, t_mid, t_next)
        two_steps, _ = sampling.sample(
            model_fn=teacher, params=None, process=process, key=jax.random.key(0),
            shape=(16, 2), prediction="x0", solver="ddim", steps=2,
            grid=np.asarray(ts[2 * i : 2 * i + 3]), x_T=z,
        )
        # Same float32 arithmetic in another order: agreement to a few ulps of |z| <= ~4.
        np.testing.assert_allclose(one_step, two_steps, rtol=1e-5, atol=1e-5)
    # An eps teacher gives the same target (the prediction type is only a parametrisation).
    eps_teacher = lambda p, x, t, c: D.convert(teacher(p, x, t, c), "x0", "eps", x_t=x, t=t,
                                               process=process)
    t, t_mid, t_next = (jnp.full((16,), ts[j], jnp.float32) for j in (2, 3, 4))
    z = jax.random.normal(jax.random.key(3), (16, 2))
    a, b = (jax.jit(lambda fn, kind=kind: T.progressive_target(
        fn, None, z, t, t_mid, t_next, None, process=process, prediction=kind), static_argnums=0)(
        fn) for fn, kind in ((teacher, "x0"), (eps_teacher, "eps")))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_progressive_loss_is_zero_for_a_student_that_predicts_the_target():
    process = D.VP("cosine", None)
    teacher = GAUSS.denoiser(process)
    n = 4
    dt = process.t_max / (2 * n)

    def student(scale, z, t, cond):  # knows the teacher's uniform grid; scale 1 is exact
        t_next = jnp.maximum(t - 2 * dt, 0.0)
        return scale * T.progressive_target(teacher, None, z, t, t - dt, t_next, cond,
                                            process=process, prediction="x0")

    x0 = GAUSS.sample(jax.random.key(4), 64)
    loss = jax.jit(lambda p: T.progressive_loss(
        student, p, x0, None, jax.random.key(5), teacher_fn=teacher, teacher_params=None,
        process=process, prediction="x0", student_steps=n))
    per_ex, _ = loss(1.0)
    assert per_ex.shape == (64,) and float(jnp.max(per_ex)) < 1e-9
    wrong, _ = loss(0.9)
    assert float(jnp.mean(wrong)) > 1e-3
    with pytest.raises(InputError, match="needs 9"):
        T.progressive_loss(student, None, x0, None, jax.random.key(5), teacher_fn=teacher,
                           teacher_params=None, process=process, prediction="x0",
                           student_steps=n, ts=np.linspace(1, 0, 5))


def test_reflow_pairs_are_the_teacher_ode_endpoints():
    process = D.Flow()
    teacher = GAUSS.denoiser(process)
    key = jax.random.key(6)
    kw = dict(prediction="x0", solver="rk4", steps=16)
    z, x0 = reflow_pairs(teacher, None, process, key, (8, 2), **kw)
    # The linear-path PF-ODE of a Gaussian is linear with coefficients that are functions
    # of Sigma: it maps z to mu + Sigma^(1/2) z (symmetric root). RK4 with 16 steps on this
    # smooth field is accurate to ~1e-6 (float32 sums dominate).
    e, u = np.linalg.eigh(COV)
    np.testing.assert_allclose(x0, MU + z @ (u * np.sqrt(e)) @ u.T, atol=1e-4)
    z3, x3 = reflow_pairs(teacher, None, process, key, (3, 2), **kw)
    z5, x5 = reflow_pairs(teacher, None, process, key, (5, 2), first_index=3, **kw)
    np.testing.assert_array_equal(np.concatenate([z3, z5]), z)
    np.testing.assert_allclose(np.concatenate([x3, x5]), x0, atol=1e-6)
    with pytest.raises(InputError, match="deterministic"):
        reflow_pairs(teacher, None, process, key, (8, 2), prediction="x0", solver="ddpm")


def test_reflow_loss_vanishes_on_a_straight_coupling():
    # For the coupling x0 = mu + L z, x_t determines z, so the velocity z - x0 is a
    # function of x_t: the flow is straight, reflow's fixed point (Liu et al. 2023), zero loss.
    process = D.Flow()
    chol = np.linalg.cholesky(COV).astype(np.float32)
    z = jax.random.normal(jax.random.key(7), (64, 2))
    x0 = MU + z @ chol.T

    def straight(params, x_t, t, cond):
        m = (1 - t)[:, None, None] * chol + t[:, None, None] * np.eye(2, dtype=np.float32)
        zz = jnp.linalg.solve(m, (x_t - (1 - t)[:, None] * MU)[..., None])[..., 0]
        return zz - (MU + zz @ chol.T)

    per_ex, _ = T.reflow_loss(straight, None, z, x0, None, jax.random.key(8), process=process)
    assert per_ex.shape == (64,) and float(jnp.max(per_ex)) < 1e-9
    fresh = jax.random.normal(jax.random.key(9), (64, 2))  # an independent coupling is not
    bad, _ = T.reflow_loss(straight, None, fresh, x0, None, jax.random.key(8), process=process)
    assert float(jnp.mean(bad)) > 1e-2


def _gaussian_denoiser(process):
    """Exact x0 model of N(m, L L^T) with (m, L) the parameters: the fake score's family."""

    def model_fn(params, x, t, cond):
        m, chol = params["m"], jnp.tril(params["L"])
        cov = chol @ chol.T
        a, s = process.alpha(t)[:, None, None], process.sigma(t)[:, None, None]
        c = a * a * cov + s * s * jnp.eye(2)
        gain = a * cov @ jnp.linalg.inv(c)  # [B, 2, 2]
        return m + jnp.einsum("bij,bj->bi", gain, x - a[:, :, 0] * m)

    return model_fn


def test_dmd_gradient_vanishes_when_fake_equals_real_and_points_to_the_data():
    process = D.Flow()
    real = GAUSS.denoiser(process)
    fake_fn = _gaussian_denoiser(process)
    generator = lambda p, z, c: p["m"] + z @ jnp.tril(p["L"]).T
    noise = jax.random.normal(jax.random.key(11), (4096, 2))
    exact = {"m": jnp.asarray(MU), "L": jnp.asarray(np.linalg.cholesky(COV))}

    @jax.jit
    def grad_at(gen_params):  # with the fake score equal to the generator's exact score
        loss = lambda p: jnp.mean(T.dmd_loss(generator, p, noise, None, jax.random.key(12),
                                             real_fn=real, real_params=None, fake_fn=fake_fn,
                                             fake_params=gen_params, process=process,
                                             prediction="x0")[0])
        return jax.grad(loss)(gen_params)

    # Fake = real (the generator already matches the data): the gradient is exactly 0
    # up to float32 differences of two equal denoisers.
    g = grad_at(exact)
    assert max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(g)) < 1e-5
    # A shifted generator (with the fake score that tracks it) is pulled towards the data.
    shifted = {"m": exact["m"] + jnp.array([0.5, -0.3]), "L": exact["L"]}
    g = grad_at(shifted)
    assert float(jnp.dot(g["m"], shifted["m"] - exact["m"])) > 0


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    # Generator = its own output (params are x): d loss / dx must be Eq. 7-8's
    # (x0_fake - x0_real) / mean|x - x0_real| per example, divided by D (mean over elements).
    process = D.Flow()
    real, fake_fn = GAUSS.denoiser(process), _gaussian_denoiser(process)
    fake = {"m": jnp.array([0.5, 0.1]), "L": jnp.array([[0.7, 0.0], [0.2, 0.4]])}
    x = jax.random.normal(jax.random.key(14), (8, 2))
    key, t_fixed = jax.random.key(15), lambda k, n, p: jnp.full((n,), 0.4)
    loss = lambda x: jnp.sum(T.dmd_loss(lambda p, z, c: p, x, None, None, key, real_fn=real,
                                        real_params=None, fake_fn=fake_fn, fake_params=fake,
                                        process=process, prediction="x0",
                                        time_sampler=t_fixed)[0])
    grad = jax.jit(jax.grad(loss))(x)
    eps = jax.random.normal(jax.random.split(key)[1], x.shape)
    x_t = 0.6 * x + 0.4 * eps
    t = jnp.full((8,), 0.4)
    x0_real = np.asarray(real(None, x_t, t, None), np.float64)
    x0_fake = np.asarray(fake_fn(fake, x_t, t, None), np.float64)
    x64 = np.asarray(x, np.float64)
    scale = np.mean(np.abs(x64 - x0_real), axis=1, keepdims=True)
    np.testing.assert_allclose(grad, (x0_fake - x0_real) / scale / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def _train_dmd2(generator, gen, process, steps: int = 600):
    """``steps`` DMD2 updates of ``generator(params, z, cond, key)`` against the exact real
    score of :data:`GAUSS`, the fake score in the Gaussian family (starting at N(0, I)),
    with DMD2's two time-scale rule: 5 fake-score updates per generator update."""
    real, fake_fn = GAUSS.denoiser(process), _gaussian_denoiser(process)
    fake = {"m": jnp.zeros(2), "L": jnp.eye(2)}
    opt_g, opt_f = optax.adam(optax.cosine_decay_schedule(1e-2, steps)), optax.adam(2e-2)
    kw = dict(process=process, prediction="x0")

    def body(carry, key):
        gen, fake, sg, sf = carry
        k_z, k_f, k_g = jax.random.split(key, 3)
        noise = jax.random.normal(k_z, (256, 2))
        bound = lambda p, z, c: generator(p, z, c, jax.random.fold_in(key, 3))
        x = bound(gen, noise, None)

        def fake_step(c, k):
            fake, sf = c
            loss = lambda p: jnp.mean(T.fake_score_loss(fake_fn, p, x, None, k, **kw)[0])
            upd, sf = opt_f.update(jax.grad(loss)(fake), sf)
            return (optax.apply_updates(fake, upd), sf), None

        (fake, sf), _ = jax.lax.scan(fake_step, (fake, sf), jax.random.split(k_f, 5))
        loss = lambda p: jnp.mean(T.dmd_loss(bound, p, noise, None, k_g, real_fn=real,
                                             real_params=None, fake_fn=fake_fn,
                                             fake_params=fake, **kw)[0])
        upd, sg = opt_g.update(jax.grad(loss)(gen), sg)
        return (optax.apply_updates(gen, upd), fake, sg, sf), None

    run = jax.jit(lambda c, k: jax.lax.scan(body, c, jax.random.split(k, steps))[0])
    return run((gen, fake, opt_g.init(gen), opt_f.init(fake)), jax.random.key(13))[0]


def test_dmd2_with_an_affine_generator_matches_the_data_covariance():
    # The fake score starts as the generator's distribution, N(0, I).
    generator = lambda p, z, c, key: p["m"] + z @ jnp.tril(p["L"]).T
    gen = _train_dmd2(generator, {"m": jnp.zeros(2), "L": jnp.eye(2)}, D.Flow())
    chol = jnp.tril(gen["L"])
    rel = np.linalg.norm(chol @ chol.T - COV) / np.linalg.norm(COV)
    assert rel < 0.05, rel
    np.testing.assert_allclose(gen["m"], MU, atol=0.05)


# ---------------------------------------------------------------- DMD2's multi-step generator


def test_generator_times_are_dmd2s_uniform_timesteps():
    # DMD2's DDPM timesteps 999, 749, 499, 249 at 4 steps: uniform in t from t_max.
    np.testing.assert_array_equal(sampling.generator_times(D.Flow(), 4), [1.0, 0.75, 0.5, 0.25])
    np.testing.assert_array_equal(sampling.generator_times(D.Flow(), 1), [1.0])
    np.testing.assert_array_equal(sampling.generator_times(D.VP(), 2), [1.0, 0.5])
    # EDM's time is sigma: its Karras levels, as the consistency sampler's.
    np.testing.assert_array_equal(sampling.generator_times(D.EDM(), 2),
                                  sampling.consistency_times(D.EDM(), 2))
    for bad in (0, 1.5):
        with pytest.raises(InputError, match="steps >= 1"):
            sampling.generator_times(D.Flow(), bad)


def _linear_x0(params, x, t, cond):
    """``x0 = a x + b t``: the output's derivative in ``a`` is the input it was given."""
    return params["a"] * x + params["b"] * t[:, None]


def test_few_step_generator_backward_simulation_is_its_own_sampler_cut_at_a_random_step():
    process, ts = D.VP(), (1.0, 0.6, 0.3)
    params = {"a": jnp.asarray(0.7), "b": jnp.asarray(0.2)}
    gen = T.few_step_generator(_linear_x0, process, prediction="x0", ts=ts)
    z = jax.random.normal(jax.random.key(0), (600, 2))
    key = jax.random.key(1)
    got = gen(params, z, None, key)
    # By hand, with the documented keys: step n ~ randint(k_step), step m's noise from
    # fold_in(k_eps, m); the input at ts[n] is n steps of the sampler, forward re-noised.
    k_step, k_eps = jax.random.split(key)
    step = np.asarray(jax.random.randint(k_step, (600,), 0, 3))
    assert sorted(np.unique(step)) == [0, 1, 2] and min(np.bincount(step)) > 150
    x_in, t_in = [process.sigma(1.0) * z], [1.0]
    for m in (1, 2):
        x0 = _linear_x0(params, x_in[-1], jnp.full((600,), t_in[-1]), None)
        eps = jax.random.normal(jax.random.fold_in(k_eps, m), z.shape)
        x_in.append(process.alpha(ts[m]) * x0 + process.sigma(ts[m]) * eps)
        t_in.append(ts[m])
    want = np.stack([_linear_x0(params, x_in[n], jnp.full((600,), t_in[n]), None)
                     for n in range(3)])[step, np.arange(600)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # The gradient reaches params through the last evaluation only: d sum(x)/da is the sum
    # of the inputs it was given, d sum(x)/db of their times (the simulation held fixed).
    inputs = np.stack(x_in)[step, np.arange(600)]
    grads = jax.grad(lambda p: jnp.sum(gen(p, z, None, key)))(params)
    np.testing.assert_allclose(grads["a"], inputs.sum(), rtol=1e-5)
    np.testing.assert_allclose(grads["b"], 2 * np.asarray(t_in)[step].sum(), rtol=1e-6)
    # One step: G(z) = x0(sigma(t_max) z, t_max), no key.
    one = T.few_step_generator(_linear_x0, process, prediction="x0")
    np.testing.assert_allclose(one(params, z, None), 0.7 * process.sigma(1.0) * z + 0.2,
                               rtol=1e-6, atol=1e-7)  # float32 cancellation near 0
    with pytest.raises(InputError, match="needs a key"):
        gen(params, z, None)
    with pytest.raises(InputError, match="strictly decreasing"):
        T.few_step_generator(_linear_x0, process, prediction="x0", ts=(1.0, 1.0))


def test_multistep_sampling_of_a_generator_renoises_by_the_forward_process():
    # VP's t_min > 0: CM's sampler would re-noise from s_min; a generator's output is clean.
    process, ts, key = D.VP(), (1.0, 0.5), jax.random.key(4)
    params = {"a": jnp.asarray(0.5), "b": jnp.asarray(-0.1)}
    got, info = sampling.consistency_sample(_linear_x0, params, process, key, (8, 2), ts=ts,
                                            prediction="x0", clean_output=True)
    from jaxgen.sampling.solvers import step_noise

    per_sample = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(8))
    draw = lambda k: jax.random.normal(jax.random.fold_in(k, 0), (2,))
    x = _linear_x0(params, process.sigma(1.0) * jax.vmap(draw)(per_sample), jnp.ones(8), None)
    z = step_noise(jax.vmap(lambda k: jax.random.fold_in(k, 1))(per_sample), 1, x)
    x = _linear_x0(params, process.alpha(0.5) * x + process.sigma(0.5) * z,
                   jnp.full((8,), 0.5), None)
    np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-6)
    assert info["nfe"] == 2
    cm, _ = sampling.consistency_sample(_linear_x0, params, process, key, (8, 2), ts=ts,
                                        prediction="x0")
    assert np.abs(np.asarray(cm) - np.asarray(got)).max() > 1e-6  # s_min = 1e-3-ish differs


def test_two_step_dmd2_with_affine_steps_matches_the_data_covariance():
    # Each of the two steps an affine map of its input (step 0: of the noise at t = 1;
    # step 1: of x_t at t = 0.5), trained by DMD2 with backward simulation against the
    # exact real score. The fake score fits all the generator's training outputs, both
    # steps' (DMD2's fake score is not told the step), so the distribution-matching
    # gradient vanishes when their mixture, half of each step's, is the data's: that is
    # the fixed point, and what is checked. (It does not pin each step alone: with the
    # fake score in the Gaussian family, step 0 too wide and step 1 too narrow by as much
    # is a fixed point too; a network's outputs are not that free.)
    process, ts = D.Flow(), (1.0, 0.5)

    def model_fn(p, x, t, cond):
        first = (t > 0.75)[:, None]
        out0 = p["m0"] + x @ jnp.tril(p["L0"]).T
        out1 = p["m1"] + x @ p["A1"].T
        return jnp.where(first, out0, out1)

    gen = T.few_step_generator(model_fn, process, prediction="x0", ts=ts)
    theta = _train_dmd2(gen, {"m0": jnp.zeros(2), "L0": jnp.eye(2), "m1": jnp.zeros(2),
                              "A1": jnp.eye(2)}, process)
    x = gen(theta, jax.random.normal(jax.random.key(5), (40000, 2)), None, jax.random.key(6))
    x = np.asarray(x, np.float64)
    rel = np.linalg.norm(np.cov(x.T) - COV) / np.linalg.norm(COV)
    assert rel < 0.05, rel
    np.testing.assert_allclose(x.mean(0), MU, atol=0.05)
