"""APG momentum (Sadat et al. 2024, Alg. 1) and perturbed-attention guidance (Ahn et al. 2024)."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import diffusion as D
from jaxgen import models
from jaxgen import sampling as S
from jaxgen.errors import InputError
from jaxgen.models import layers as nn_layers
from jaxgen.sampling.guidance import PERTURB_KEY

COND, UNCOND = {"y": jnp.array([1.0, 2.0, -1.0, 0.5])}, {"y": jnp.zeros(1)}
X = jax.random.normal(jax.random.key(0), (4, 3, 3, 2))


def model(params, x, t, cond):
    """An ``x0`` model whose condition shifts channel c by ``(c + 1) y / 4``."""
    shift = cond["y"].reshape((-1,) + (1,) * (x.ndim - 1)) * (jnp.arange(x.shape[-1]) + 1) / 4
    return 0.5 * x / (1 + t.reshape(shift.shape[:1] + (1,) * (x.ndim - 1))) + shift


def _np_apg(c, u, m, beta, eta, r, w):
    """Algorithm 1 of Sadat et al. (2024) for one sample, in float64."""
    m = (c - u) + beta * m
    diff = m * min(1.0, r / np.linalg.norm(m)) if r else m
    unit = c / np.linalg.norm(c)
    par = np.sum(diff * unit) * unit
    return c + (w - 1) * (diff - par + eta * par), m


def test_apg_momentum_zero_ignores_the_history_bit_for_bit():
    g = S.Guidance(4.0, uncond=UNCOND, method="apg", apg_eta=0.3, apg_threshold=2.0)
    denoise = S.make_denoiser(lambda x, t, c: model(None, x, t, c), D.EDM(), "x0", COND, g)
    t = jnp.asarray(2.0)
    _, _, state = denoise.step(X, t, denoise.init(X))
    assert np.abs(np.asarray(state["apg"])).max() > 0  # a real history to ignore
    fresh = denoise.step(X, t, denoise.init(X))[:2]
    again = denoise.step(X, t, state)[:2]
    for a, b in zip(fresh, again, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_apg_momentum_two_ddim_steps_match_a_numpy_transcription():
    beta, eta, r, w = -0.5, 0.3, 1.5, 4.0
    g = S.Guidance(w, uncond=UNCOND, method="apg", apg_eta=eta, apg_threshold=r,
                   apg_momentum=beta)
    ts = np.array([2.0, 1.0, 0.5])  # EDM: alpha = 1, sigma = t; both steps call the model
    out, info = S.sample(model, None, D.EDM(), jax.random.key(0), X.shape, prediction="x0",
                         solver="ddim", steps=2, grid=ts, cond=COND, guidance=g, x_T=X)
    x, m = np.asarray(X, np.float64), np.zeros(X.shape)
    for t, t1 in itertools.pairwise(ts):
        tb = jnp.full((4,), t, jnp.float32)
        xj = jnp.asarray(x, jnp.float32)
        c = np.asarray(model(None, xj, tb, COND), np.float64)
        u = np.asarray(model(None, xj, tb, {"y": jnp.zeros(4)}), np.float64)
        x0 = np.empty_like(x)
        for b in range(4):
            x0[b], m[b] = _np_apg(c[b], u[b], m[b], beta, eta, r, w)
        x = x0 + t1 * (x - x0) / t  # DDIM: alpha_s x0 + sigma_s eps
    np.testing.assert_allclose(np.asarray(out), x, rtol=1e-5, atol=1e-5)
    assert info["nfe"] == 2 and info["model_passes"] == 4
    # The momentum changed the result: without it the second step differs.
    g0 = S.Guidance(w, uncond=UNCOND, method="apg", apg_eta=eta, apg_threshold=r)
    plain, _ = S.sample(model, None, D.EDM(), jax.random.key(0), X.shape, prediction="x0",
                        solver="ddim", steps=2, grid=ts, cond=COND, guidance=g0, x_T=X)
    assert np.abs(np.asarray(plain) - x).max() > 1e-3


def test_apg_momentum_at_scale_one_is_plain_sampling_bit_for_bit():
    # Heun: two evaluations a step, each one advancing the state.
    g = S.Guidance(1.0, uncond=UNCOND, method="apg", apg_momentum=-0.5, apg_eta=0.2)
    run = lambda **k: S.sample(model, None, D.Flow(), jax.random.key(3), X.shape,
                               prediction="x0", solver="heun", steps=3, cond=COND, **k)[0]
    np.testing.assert_array_equal(np.asarray(run(guidance=g)), np.asarray(run()))


def _random_variables(module, x, cond):
    """Every parameter N(0, 0.3^2): zero-initialised outputs would hide the attention."""
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(1), x, jnp.ones(x.shape[0]),
                                     cond))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                        shapes)


def test_perturbed_attention_is_the_projected_values():
    layer = nn_layers.Attention(num_heads=2)
    x = jax.random.normal(jax.random.key(2), (3, 5, 4))
    params = nn.unbox(layer.init(jax.random.key(3), x))["params"]
    flag = jnp.array([True, False, True])
    out = layer.apply({"params": params}, x, flag)
    v = x @ params["qkv"]["kernel"][:, 8:] + params["qkv"]["bias"][8:]  # q, k, v: 4 each
    want = v @ params["proj"]["kernel"] + params["proj"]["bias"]  # softmax(QK^T) -> I
    np.testing.assert_allclose(out[flag], want[flag], rtol=1e-5, atol=1e-6)
    plain = layer.apply({"params": params}, x)
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(plain[1]))
    assert np.abs(np.asarray(out[0] - plain[0])).max() > 1e-2


TINY = {
    "dit": models.DiT(patch=2, hidden=16, depth=3, num_heads=2, num_classes=4,
                      learn_sigma=False, pag_layers=(1,)),
    "unet": models.UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                        head_channels=8, num_groups=4, num_classes=4, dropout=0.0),
}


@pytest.mark.parametrize("name", ["dit", pytest.param("unet", marks=pytest.mark.slow)])
def test_pag_guides_with_the_perturbed_model_in_one_batched_call(name):
    module, x = TINY[name], jax.random.normal(jax.random.key(4), (2, 4, 4, 2))
    cond, uncond = {"label": jnp.array([1, 3])}, {"label": jnp.array([4])}
    params = _random_variables(module, x, cond)["params"]
    fn = models.as_model_fn(module)
    calls = []

    def counted(x, t, c):
        calls.append(x.shape[0])
        return fn(params, x, t, c)

    @jax.jit
    def run(x, t):
        flag = lambda on: {PERTURB_KEY: jnp.full((2,), on)}
        parts = [fn(params, x, t, c | flag(on)) for c, on in
                 [(cond, False), ({"label": jnp.full(2, 4)}, False), (cond, True)]]
        g = S.Guidance(2.5, uncond=uncond, pag_scale=1.5)
        guided = S.make_denoiser(counted, D.Flow(), "x0", cond, g)(x, t)[0]
        alone = S.Guidance(1.0, pag_scale=2.0)
        bound = lambda x, t, c: fn(params, x, t, c)
        return fn(params, x, t, cond), parts, guided, S.make_denoiser(bound, D.Flow(), "x0",
                                                                      cond, alone)(x, t)[0]

    plain, (x0_c, x0_u, x0_p), x0, alone = run(x, jnp.asarray(0.7))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(x0_c))  # switch off: plain
    assert np.abs(np.asarray(x0_p - x0_c)).max() > 1e-3
    want = x0_u + 2.5 * (x0_c - x0_u) + 1.5 * (x0_c - x0_p)  # Ahn et al. (2024), Eq. 11
    np.testing.assert_allclose(np.asarray(x0), np.asarray(want), rtol=1e-4, atol=1e-5)
    assert calls == [6]  # cond, uncond and perturbed rows in one call
    np.testing.assert_allclose(np.asarray(alone), np.asarray(x0_c + 2.0 * (x0_c - x0_p)),
                               rtol=1e-4, atol=1e-5)


def test_pag_scale_zero_is_plain_guidance_and_passes_are_counted():
    module, x = TINY["dit"], jax.random.normal(jax.random.key(4), (2, 4, 4, 2))
    cond, uncond = {"label": jnp.array([1, 3])}, {"label": jnp.array([4])}
    params = _random_variables(module, x, cond)["params"]
    fn = models.as_model_fn(module)
    run = lambda g: S.sample(fn, params, D.Flow(), jax.random.key(0), x.shape,
                             prediction="velocity", solver="euler", steps=3, cond=cond,
                             guidance=g)
    a, _ = run(S.Guidance(2.0, uncond=uncond, pag_scale=0.0))
    b, info_b = run(S.Guidance(2.0, uncond=uncond))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, info_c = run(S.Guidance(2.0, uncond=uncond, pag_scale=1.0))
    assert (info_b["model_passes"], info_c["model_passes"]) == (6, 9) and info_c["nfe"] == 3


def test_pag_on_a_model_without_the_switch_is_refused_before_sampling():
    module = models.EDM2(img_resolution=4, img_channels=2, num_classes=0, model_channels=8,
                         channel_mult=(1,), num_blocks=1, attn_resolutions=(4,),
                         channels_per_head=4)
    x = jnp.zeros((2, 4, 4, 2))
    abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(1), x, jnp.ones(2)))
    fn = models.as_model_fn(module, constants={"buffers": abstract["buffers"]})
    with pytest.raises(InputError, match="pag_scale needs a model that reads"):
        S.sample(fn, abstract["params"], D.EDM(), jax.random.key(0), x.shape,
                 prediction="x0", guidance=S.Guidance(1.0, pag_scale=1.0))
