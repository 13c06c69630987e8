"""IDDPM's learned variance: the bound's terms, the hybrid loss, and the ``ddpm_learned`` solver.

The bound is checked against :class:`IDDPM`, a float64 NumPy transcription of
``GaussianDiffusion`` (facebookresearch/DiT ``diffusion/gaussian_diffusion.py`` and
``diffusion_utils.py``, IDDPM's code) with ``LEARNED_RANGE`` variance; the solver
against diffusers' ``DDPMScheduler(variance_type="learned_range")``
(``tests/fixtures/make_learned_variance_reference.py``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from train_fixtures import UserNet, batch_of, tiny_config

from jaxgen import diffusion as D
from jaxgen import sampling as S
from jaxgen.diffusion import vlb
from jaxgen.errors import InputError
from jaxgen.models import as_model_fn
from jaxgen.parallel import make_mesh
from jaxgen.sampling import solvers
from jaxgen.sampling.teacher import solver_step
from jaxgen.train import init_state, make_run_parts, make_train_step, sample_images

FIXTURE = Path(__file__).parent / "fixtures" / "learned_variance_reference.npz"
N = 1000


class IDDPM:
    """``GaussianDiffusion`` (linear betas, EPSILON mean, LEARNED_RANGE variance) in float64."""

    def __init__(self, n: int = N):
        self.betas = np.linspace(1e-4, 0.02, n)
        self.abar = np.cumprod(1.0 - self.betas)
        abar_prev = np.append(1.0, self.abar[:-1])
        self.post_var = self.betas * (1.0 - abar_prev) / (1.0 - self.abar)
        self.post_log_var_clipped = np.log(np.append(self.post_var[1], self.post_var[1:]))
        self.coef1 = self.betas * np.sqrt(abar_prev) / (1.0 - self.abar)
        self.coef2 = (1.0 - abar_prev) * np.sqrt(1.0 - self.betas) / (1.0 - self.abar)

    @staticmethod
    def normal_kl(mean1, logvar1, mean2, logvar2):
        return 0.5 * (-1.0 + logvar2 - logvar1 + np.exp(logvar1 - logvar2)
                      + (mean1 - mean2) ** 2 * np.exp(-logvar2))

    @staticmethod
    def discretized_gaussian_log_likelihood(x, means, log_scales):
        cdf = lambda v: 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v**3)))
        inv = np.exp(-log_scales)
        cdf_plus = cdf(inv * (x - means + 1.0 / 255.0))
        cdf_min = cdf(inv * (x - means - 1.0 / 255.0))
        return np.where(x < -0.999, np.log(np.maximum(cdf_plus, 1e-12)),
                        np.where(x > 0.999, np.log(np.maximum(1.0 - cdf_min, 1e-12)),
                                 np.log(np.maximum(cdf_plus - cdf_min, 1e-12))))

    def at(self, a, i, x):
        return a[i].reshape(-1, *([1] * (x.ndim - 1)))

    def p_mean_log_var(self, x_t, i, eps, v):
        """``p_mean_variance``: mean and log-variance (``clip_denoised=False``)."""
        x0 = (np.sqrt(1 / self.at(self.abar, i, x_t)) * x_t
              - np.sqrt(1 / self.at(self.abar, i, x_t) - 1) * eps)
        frac = (v + 1) / 2
        log_var = (frac * np.log(self.at(self.betas, i, x_t))
                   + (1 - frac) * self.at(self.post_log_var_clipped, i, x_t))
        return self.at(self.coef1, i, x_t) * x0 + self.at(self.coef2, i, x_t) * x_t, log_var

    def vb_terms_bpd(self, x0, x_t, i, eps, v):
        mean = lambda a, b: (a.reshape(len(a), -1).mean(1)) / np.log(2.0) * b
        true_mean = self.at(self.coef1, i, x0) * x0 + self.at(self.coef2, i, x0) * x_t
        model_mean, model_log_var = self.p_mean_log_var(x_t, i, eps, v)
        kl = mean(self.normal_kl(true_mean, self.at(self.post_log_var_clipped, i, x0),
                                 model_mean, model_log_var), 1)
        nll = mean(self.discretized_gaussian_log_likelihood(
            x0, model_mean, 0.5 * model_log_var), -1)
        return np.where(i == 0, nll, kl)


REF = IDDPM()


def _draw(seed: int, idx):
    """8-bit data (both ends included), eps, a model's eps and v for time indices ``idx``."""
    rng = np.random.default_rng(seed)
    shape = (len(idx), 3, 3, 2)
    x0 = rng.integers(0, 256, shape) / 127.5 - 1.0
    x0[:, 0, 0, 0], x0[:, 0, 0, 1] = -1.0, 1.0
    eps = rng.standard_normal(shape)
    x_t = np.sqrt(REF.at(REF.abar, idx, x0)) * x0 + np.sqrt(1 - REF.at(REF.abar, idx, x0)) * eps
    eps_model = eps + 0.3 * rng.standard_normal(shape)
    return x0, x_t, eps_model, rng.uniform(-1, 1, shape)


# ------------------------------------------------------------------ the bound's terms


def test_posterior_is_iddpms_in_float64():
    idx = np.array([1, 2, 3, 499, 998, 999])
    with jax.enable_x64(True):
        c_x0, c_xt, log_beta, log_var = (np.asarray(a) for a in vlb.posterior(
            D.VP(), jnp.asarray((idx + 1) / N), jnp.asarray(idx / N)))
        at_zero = [float(a) for a in vlb.posterior(D.VP(), 1 / N, 0.0)]
    # Both sides float64 from the same betas: measured <= 4e-13 relative (c_x0 goes
    # through log-SNRs of ~10 whose difference is ~0.02 at the end of the chain).
    np.testing.assert_allclose(c_x0, REF.coef1[idx], rtol=1e-11)
    np.testing.assert_allclose(c_xt, REF.coef2[idx], rtol=1e-11)
    np.testing.assert_allclose(log_beta, np.log(REF.betas[idx]), rtol=1e-12)
    np.testing.assert_allclose(log_var, np.log(REF.post_var[idx]), rtol=1e-12)
    # Into t = 0: mean x0 exactly, beta = beta_0, no posterior variance.
    assert at_zero[:2] == [1.0, 0.0] and at_zero[3] == -np.inf
    np.testing.assert_allclose(at_zero[2], np.log(1e-4), rtol=1e-12)


def test_learned_range_kl_and_decoder_likelihood_by_hand():
    lv = lambda v: float(vlb.learned_range_log_variance(jnp.float32(v), -2.0, -6.0))
    assert (lv(1.0), lv(-1.0), lv(0.0), lv(0.5)) == (-2.0, -6.0, -4.0, -3.0)
    kl = lambda *a: float(vlb.normal_kl(*map(jnp.float32, a)))
    assert kl(0.3, 0.0, 0.3, 0.0) == 0.0
    assert kl(1.0, 0.0, 0.0, 0.0) == 0.5  # (m1 - m2)^2 / 2
    # N(0, 1) || N(0, 4): log 2 + 1/8 - 1/2
    np.testing.assert_allclose(kl(0.0, 0.0, 0.0, np.log(4.0)), np.log(2) - 0.375, rtol=1e-6)
    x = jnp.asarray([-1.0, 0.0, 1.0])
    ll = np.asarray(vlb.discretized_gaussian_log_likelihood(x, jnp.zeros(3), jnp.zeros(3)))
    cdf = lambda v: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))
    # The edge bins reach to -inf / +inf: mass Phi(-1 + 1/255) ~ 0.16 for x = -1 and x = 1.
    want = [np.log(cdf(-1 + 1 / 255)), np.log(cdf(1 / 255) - cdf(-1 / 255)),
            np.log(1 - cdf(1 - 1 / 255))]
    np.testing.assert_allclose(want[0], np.log(0.1596), atol=2e-3)  # Phi(-0.996), tables
    np.testing.assert_allclose(ll, want, rtol=1e-5)  # float32 CDFs of ~0.16 and a 3e-3 bin


@pytest.mark.parametrize("x64", [True, False])
def test_vb_terms_equal_iddpm(x64):
    idx = np.array([0, 1, 2, 500, 998, 999])  # 0: the decoder term; else the KL
    x0, x_t, eps, v = _draw(0, idx)
    want = REF.vb_terms_bpd(x0, x_t, idx, eps, v)
    with jax.enable_x64(x64):
        f = jnp.float64 if x64 else jnp.float32
        t = jnp.asarray((idx + 1) / N, f)
        x0_pred = D.to_x0_eps(jnp.asarray(eps, f), "eps", x_t=jnp.asarray(x_t, f), t=t,
                              process=D.VP())[0]
        got = np.asarray(vlb.vb_terms(*(jnp.asarray(a, f) for a in (x0, x_t)), t, x0_pred,
                                      jnp.asarray(v, f), process=D.VP()))
    assert np.all(want > 0) and abs(want[0]) > 1  # the NLL term is bits, the KLs smaller
    # float64: the same formulas rearranged, measured <= 7e-13 relative. float32: t = k / N
    # near 1 is off by up to half an ulp (3e-8), i.e. 3e-5 of a step of the table that
    # alpha and sigma interpolate, so beta, beta~ and the posterior mean of a one-step
    # transition carry ~3e-5..6e-5 relative error, which the KL inherits (measured
    # <= 7.5e-5); the model sees the same float32 t. Hence rtol 2e-4.
    np.testing.assert_allclose(got, want, rtol=1e-11 if x64 else 2e-4)


def _tiny_model(params, x_t, t, cond, keep_variance=False):
    """A "model" whose output is its parameters: eps channels, then v."""
    out = jnp.concatenate([params["eps"], params["v"]], axis=-1)
    return out if keep_variance else params["eps"]


def test_hybrid_loss_adds_the_bound_and_stops_its_gradient_on_the_mean():
    process = D.VP()
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.integers(0, 256, (4, 3, 3, 2)) / 127.5 - 1.0, jnp.float32)
    params = {"eps": jnp.asarray(rng.standard_normal(x0.shape), jnp.float32),
              "v": jnp.asarray(rng.uniform(-1, 1, x0.shape), jnp.float32)}
    base = functools.partial(D.loss, process=process, prediction="eps", time_sampler="discrete")
    hybrid = functools.partial(vlb.hybrid_loss, base_loss=base, process=process,
                               prediction="eps")
    seen = []

    def model(p, x_t, t, c, **kw):
        seen.append((x_t, t))  # tracers, returned by the objective below
        return _tiny_model(p, x_t, t, c, **kw)

    def objective(p):
        value, metrics = hybrid(model, p, x0, None, key)
        return value, (metrics, *seen.pop())

    key = jax.random.key(7)
    (value, (metrics, x_t, t)), grads = jax.jit(
        jax.value_and_grad(objective, has_aux=True))(params)
    base_value, base_grads = jax.jit(jax.value_and_grad(
        lambda p: base(_tiny_model, p, x0, None, key)[0]))(params)
    # The bound reaches the eps channels only through a stop gradient (IDDPM's frozen_out).
    np.testing.assert_array_equal(grads["eps"], base_grads["eps"])
    assert np.all(np.abs(np.asarray(grads["v"])).sum(axis=(1, 2, 3)) > 0)
    assert np.all(np.asarray(base_grads["v"]) == 0)
    # value = mse + vb, vb the IDDPM bound at the same x_t and t.
    x_t, t = np.asarray(x_t, np.float64), np.asarray(t)
    idx = np.round(t * N).astype(int) - 1
    eps, v = (np.asarray(params[k], np.float64) for k in ("eps", "v"))
    want_vb = REF.vb_terms_bpd(np.asarray(x0, np.float64), x_t, idx, eps, v).mean()
    np.testing.assert_allclose(float(metrics["vb"]), want_vb, rtol=2e-4)  # float32, as above
    np.testing.assert_allclose(float(value), float(base_value) + float(metrics["vb"]), rtol=1e-6)


def test_hybrid_loss_refuses_a_model_without_variance_and_a_continuous_process():
    x0 = jnp.zeros((2, 2, 2, 1))
    base = functools.partial(D.loss, process=D.VP(), prediction="eps", time_sampler="discrete")
    no_var = lambda p, x, t, c, keep_variance=False: jnp.zeros_like(x)
    with pytest.raises(InputError, match="2 x 1 output channels"):
        vlb.hybrid_loss(no_var, None, x0, None, jax.random.key(0), base_loss=base,
                        process=D.VP(), prediction="eps")
    with pytest.raises(InputError, match="discrete VP"):
        vlb.hybrid_loss(no_var, None, x0, None, jax.random.key(0), base_loss=base,
                        process=D.VP(num_steps=None), prediction="eps")


# ------------------------------------------------------------------ the solver


def _iddpm_step(x, eps, v, a: int, b: int, z):
    """IDDPM's ``p_sample`` of the respaced step from index ``a`` to ``b`` (``-1``: clean)."""
    abar_t, abar_s = REF.abar[a], (REF.abar[b] if b >= 0 else 1.0)
    beta = 1 - abar_t / abar_s
    post_var = beta * (1 - abar_s) / (1 - abar_t)
    x0 = (x - np.sqrt(1 - abar_t) * eps) / np.sqrt(abar_t)
    mean = (np.sqrt(abar_s) * beta * x0 + np.sqrt(1 - beta) * (1 - abar_s) * x) / (1 - abar_t)
    if b < 0:
        return mean
    frac = (v + 1) / 2
    return mean + np.exp(0.5 * (frac * np.log(beta) + (1 - frac) * np.log(post_var))) * z


def _one_step(dtype):
    """``ddpm_learned`` over one grid step, for a model whose output is ``out``; the
    noise arrives as ``keys`` (``step_noise`` is patched to return them)."""

    @jax.jit
    def run(x, out, noise, ts):
        model = lambda x_, t, c, keep_variance=False: out if keep_variance else out[..., :4]
        denoise = S.make_denoiser(model, D.VP(), "eps", learned_variance=True)
        return solvers.ddpm_learned(denoise, x, ts, noise, D.VP())

    return lambda *a: np.asarray(run(*(jnp.asarray(x, dtype) for x in a)), np.float64)


@pytest.mark.parametrize("x64", [True, False])
def test_ddpm_learned_step_equals_diffusers(x64, monkeypatch):
    # diffusers' DDPMScheduler(variance_type="learned_range") in float64, on the full
    # chain (t -> t - 1) and on DiT's 250-step respacing, t = 0 included.
    monkeypatch.setattr(solvers, "step_noise", lambda keys, i, x: keys)
    ref = np.load(FIXTURE)
    with jax.enable_x64(x64):
        run = _one_step(jnp.float64 if x64 else jnp.float32)
        for j, (t, prev) in enumerate(zip(ref["step_t"], ref["step_prev"], strict=True)):
            x, out, z = (ref[f"step_{k}"][j] for k in ("sample", "output", "noise"))
            want = ref["step_prev_sample"][j]
            # The fixture is IDDPM's p_sample (float64 vs float64: <= 1e-13 apart) ...
            iddpm = _iddpm_step(x, out[..., :4], out[..., 4:], t, prev, z)
            np.testing.assert_allclose(iddpm, want, rtol=0, atol=1e-12)
            got = run(x, out, z, [(t + 1) / N, (prev + 1) / N])
            # ... and jaxgen's step. float64: measured <= 5e-13 (log-SNRs of ~9 near t = 0,
            # as in test_posterior_is_iddpms_in_float64). float32: t = (k + 1) / N carries
            # the 3e-5-of-a-step error of test_vb_terms_equal_iddpm into beta, beta~ and the
            # mean's coefficients; measured <= 6e-6 (999 -> 995) on samples up to |x| ~ 3:
            # atol 2e-5, under 1e-5 of the samples' scale.
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-12 if x64 else 2e-5,
                                       err_msg=f"t={t} -> {prev}")


def _chain_model(var: float):
    """The fixture's chain model: the exact eps of N(0, var) data, then
    ``v = 0.9 sin(3 x + index / 100)`` at the model's step index ``t N - 1``."""

    def model(params, x, t, cond, keep_variance=False):
        abar = D.VP().alpha(t)[:, None, None, None] ** 2
        eps = jnp.sqrt(1 - abar) * x / (abar * var + 1 - abar)
        v = 0.9 * jnp.sin(3 * x + (t * N - 1)[:, None, None, None] / 100)
        return jnp.concatenate([eps, v], -1) if keep_variance else eps

    return model


def test_the_250_step_chain_is_dits_sampler(monkeypatch):
    # The whole respaced chain through jaxgen.sampling.sample (driver, iddpm grid,
    # denoiser, solver) against diffusers on DiT's space_timesteps(1000, "250").
    ref = np.load(FIXTURE)
    spaced = ref["spaced"]
    np.testing.assert_array_equal(S.iddpm(D.VP(), 250)[:-1] * N - 1, spaced[::-1])
    assert list(spaced[:4]) == [0, 4, 8, 12] and spaced[-1] == 999
    with jax.enable_x64(True):
        noise = jnp.asarray(ref["chain_noise"])
        monkeypatch.setattr(solvers, "step_noise", lambda keys, i, x: noise[i])
        x, info = S.sample(_chain_model(float(ref["var"])), None, D.VP(), jax.random.key(0),
                           noise.shape[1:], prediction="eps", solver="ddpm_learned",
                           steps=250, x_T=jnp.asarray(ref["chain_x_T"]))
    assert info["nfe"] == 250
    np.testing.assert_array_equal(info["timesteps"], S.iddpm(D.VP(), 250))
    # 250 float64 steps, each within ~5e-13 of the reference (test above): measured 1.6e-13.
    np.testing.assert_allclose(np.asarray(x), ref["chain_sample"], rtol=0, atol=1e-11)


def test_sample_i_depends_only_on_seed_and_i_and_each_step_costs_one_call():
    model, calls = _chain_model(0.5), []

    def counted(*args, **kwargs):  # counts executed calls, not traces
        jax.debug.callback(lambda: calls.append(1))
        return model(*args, **kwargs)

    key = jax.random.key(3)
    kw = dict(prediction="eps", solver="ddpm_learned", steps=4)
    four, info = S.sample(counted, None, D.VP(), key, (4, 2, 2, 1), **kw)
    jax.effects_barrier()
    assert info["nfe"] == 4 and len(calls) == 4  # the variance check's call is abstract
    two, _ = S.sample(counted, None, D.VP(), key, (2, 2, 2, 1), first_index=2, **kw)
    np.testing.assert_allclose(four[2:], two, rtol=1e-6)  # one float32 program vs another
    again, _ = S.sample(counted, None, D.VP(), key, (4, 2, 2, 1), **kw)
    np.testing.assert_array_equal(four, again)


def test_cfg_guides_eps_and_takes_the_conditional_variance(monkeypatch):
    # DiT's forward_with_cfg: eps = eps_u + w (eps_c - eps_u); v is the conditional pass's.
    monkeypatch.setattr(solvers, "step_noise", lambda keys, i, x: jnp.full_like(x, 0.7))

    def model(params, x, t, cond, keep_variance=False):
        c = cond["label"].astype(x.dtype)[:, None, None, None]  # 0: a class, 2: none
        eps, v = (0.3 + c) * x, 0.5 - 0.4 * c + 0 * x
        return jnp.concatenate([eps, v], -1) if keep_variance else eps

    with jax.enable_x64(True):
        x_T = jnp.linspace(-1, 1, 8).reshape(2, 2, 2, 1)
        x, _ = S.sample(model, None, D.VP(), jax.random.key(0), x_T.shape, prediction="eps",
                        solver="ddpm_learned", steps=1, grid=np.array([0.5, 0.4]), x_T=x_T,
                        cond={"label": jnp.zeros(2, jnp.int32)},
                        guidance=S.Guidance(1.5, uncond={"label": jnp.array([2])}))
    x_T = np.asarray(x_T)
    eps = 2.3 * x_T + 1.5 * (0.3 * x_T - 2.3 * x_T)
    want = _iddpm_step(x_T, eps, np.full_like(x_T, 0.5), 499, 399, np.full_like(x_T, 0.7))
    np.testing.assert_allclose(np.asarray(x), want, rtol=1e-12)  # both float64


def test_ddpm_learned_refuses_models_without_variance_and_other_processes():
    eps_only = lambda params, x, t, cond: 0.1 * x
    with pytest.raises(InputError, match="keep_variance=True"):
        S.sample(eps_only, None, D.VP(), jax.random.key(0), (1, 2, 2, 1), prediction="eps",
                 solver="ddpm_learned", steps=2)
    with pytest.raises(InputError, match="discrete VP"):
        S.sample(_chain_model(0.5), None, D.EDM(), jax.random.key(0), (1, 2, 2, 1),
                 prediction="eps", solver="ddpm_learned", steps=2)
    plain = S.make_denoiser(lambda x, t, c: 0.1 * x, D.VP(), "eps")  # no variance in its state
    with pytest.raises(InputError, match="learned_variance=True"):
        solvers.ddpm_learned(plain, jnp.ones((1, 2)), jnp.array([1.0, 0.0]), None, D.VP())
    with pytest.raises(InputError, match="adds noise"):  # a distillation teacher's ODE step
        solver_step(_chain_model(0.5), None, D.VP(), prediction="eps", solver="ddpm_learned")

    class Net(nn.Module):
        learn_sigma: bool = False

        @nn.compact
        def __call__(self, x, t, cond=None, train=False):
            return nn.Dense(x.shape[-1] * (2 if self.learn_sigma else 1))(x)

    x, t = jnp.ones((1, 2, 2, 3)), jnp.ones(1)
    for learn_sigma, channels in ((True, 6), (False, None)):
        net = Net(learn_sigma)
        params = net.init(jax.random.key(0), x, t)["params"]
        fn = as_model_fn(net)
        assert fn(params, x, t).shape[-1] == 3  # the prediction only, by default
        if channels:
            assert fn(params, x, t, keep_variance=True).shape[-1] == channels
            assert as_model_fn(net, keep_variance=True)(params, x, t).shape[-1] == channels
        else:
            with pytest.raises(InputError, match="learn_sigma=True"):
                fn(params, x, t, keep_variance=True)


# ------------------------------------------------------------------ training


def _vlb_config(data_file, **overrides):
    return tiny_config(data_file, **{
        "diffusion.process": "vp", "diffusion.prediction": "eps",
        "diffusion.process_kwargs": ml_collections.ConfigDict(dict(num_steps=N)),
        "diffusion.time_sampler": "discrete", "diffusion.time_scale": float(N),
        "model.kwargs.learn_sigma": True, "diffusion.learned_variance": "vlb",
        "train.ema_decays": (), **overrides})


class VarianceNet(UserNet):
    """train_fixtures' user model with a learned variance: 2C output channels."""

    learn_sigma: bool = True

    @nn.compact
    def __call__(self, x, t, cond=None, train: bool = False):
        out = UserNet(self.num_classes, name="net")(x, t, cond)
        return jnp.concatenate([out, jnp.tanh(nn.Dense(x.shape[-1])(out))], -1)


def test_training_with_the_bound_trains_the_variance_and_samples_with_it(data_file):
    config = _vlb_config(data_file)
    parts = make_run_parts(config, make_mesh(), (8, 8, 1), config.train.num_steps,
                           module=VarianceNet())
    state = init_state(parts, 0)
    step = make_train_step(parts)
    state, metrics = step(state, batch_of(parts))
    # L_vlb is a KL or decoder NLL in bits per dimension: positive, finite, part of the loss.
    assert 0 < float(metrics["vb"]) < float(metrics["loss"]) and float(metrics["finite"]) == 1
    images = np.concatenate(list(sample_images(parts, state.params, jax.random.key(0), num=2,
                                               batch_size=2, solver="ddpm_learned", steps=3)))
    assert images.shape == (2, 8, 8, 1) and images.dtype == np.uint8

    # The solver reads the learned variance through the run's model function: with the
    # eps network zeroed (eps = 0: every step's mean is linear in x and the same for
    # both), the head pinned to v = -1 (the posterior variance) and to v = +1 (beta_t)
    # gives other samples from the same noise. (Unclipped x0 = x_t / alpha_t makes these
    # samples large, ~150, so the difference is the noise terms' O(1), not rounding.)
    def draw(v):
        params = dict(state.params)
        params["net"] = jax.tree.map(jnp.zeros_like, params["net"])
        head = params["Dense_0"]
        params["Dense_0"] = {"kernel": jnp.zeros_like(head["kernel"]),
                             "bias": jnp.full_like(head["bias"], 20.0 * v)}  # tanh = v
        x, _ = S.sample(parts.model_fn, params, parts.process, jax.random.key(0), (64, 8, 8, 1),
                        prediction=parts.prediction, solver="ddpm_learned", steps=3,
                        cond={"label": jnp.zeros(64, jnp.int32)})
        return np.asarray(x, np.float64)

    small, large = draw(-1.0), draw(1.0)
    assert np.abs(small - large).max() > 0.1


@pytest.mark.parametrize("overrides,match", [
    ({"model.kwargs.learn_sigma": False}, "learn_sigma=True"),
    ({"diffusion.process_kwargs": ml_collections.ConfigDict(dict(num_steps=None))},
     "discrete VP"),
    ({"diffusion.time_sampler": "uniform"}, "time_sampler"),
    ({"diffusion.learned_variance": "kl"}, "use '' .off. or 'vlb'"),
])
def test_learned_variance_config_is_checked(data_file, overrides, match):
    config = _vlb_config(data_file, **overrides)
    with pytest.raises(InputError, match=match):
        make_run_parts(config, make_mesh(), (8, 8, 1), config.train.num_steps)


class TimeEcho(nn.Module):
    """Outputs the time it is given, in all ``2C`` channels."""

    learn_sigma: bool = True
    num_classes: int = 4

    def __call__(self, x, t, cond=None, train: bool = False):
        return jnp.broadcast_to(t[:, None, None, None], (*x.shape[:3], 2 * x.shape[-1]))


def test_dit_recipes_feed_dits_zero_based_step_index():
    # DiT (IDDPM) embeds the index i = 0..999 of its steps; jaxgen's t = (i + 1) / N.
    from jaxgen.configs import imagenet256_dit_xl2, imagenet256_sit_xl2

    config = imagenet256_dit_xl2.get_config()
    assert (config.diffusion.learned_variance, config.eval.solver) == ("vlb", "ddpm_learned")
    assert imagenet256_sit_xl2.get_config().diffusion.learned_variance == ""
    parts = make_run_parts(config, make_mesh(), (4, 4, 4), 1, module=TimeEcho())
    i = np.array([0, 1, 499, 998, 999])
    seen = parts.apply({}, jnp.zeros((5, 4, 4, 4)), jnp.asarray((i + 1) / N, jnp.float32), None)
    assert seen.shape == (5, 4, 4, 4)  # the prediction channels
    np.testing.assert_allclose(seen[:, 0, 0, 0], i, atol=1e-4)  # float32 t = (i + 1) / 1000
