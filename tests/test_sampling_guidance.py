"""Guidance variants: CFG++, APG and channel subsets against their formulas; scale 1 is plain."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import diffusion as D
from jaxgen import sampling as S
from jaxgen.errors import InputError

COND, UNCOND = {"y": jnp.array([1.0, 2.0, -1.0, 0.5])}, {"y": jnp.zeros(1)}


def model(params, x, t, cond):
    """An ``x0`` model whose condition shifts channel c by ``(c + 1) y / 4``."""
    shift = cond["y"].reshape((-1,) + (1,) * (x.ndim - 1)) * (jnp.arange(x.shape[-1]) + 1) / 4
    return 0.5 * x / (1 + t.reshape(shift.shape[:1] + (1,) * (x.ndim - 1))) + shift


def _parts(x, t, process):
    """The conditional and unconditional ``(x0, eps)`` in float64 numpy."""
    tb = jnp.full((x.shape[0],), t)
    x0_c = np.asarray(model(None, x, tb, COND), np.float64)
    x0_u = np.asarray(model(None, x, tb, {"y": jnp.zeros(4)}), np.float64)
    a, s = float(process.alpha(t)), float(process.sigma(t))
    eps = lambda x0: (np.asarray(x, np.float64) - a * x0) / s
    return x0_c, x0_u, eps(x0_c), eps(x0_u), eps


def _denoise(guidance):
    fn = lambda x, t, c: model(None, x, t, c)
    return S.make_denoiser(fn, D.EDM(), "x0", COND, guidance)


X = jax.random.normal(jax.random.key(0), (4, 3, 3, 4))
T = jnp.asarray(2.0)


def test_cfgpp_extrapolates_x0_and_renoises_with_the_unconditional_eps():
    x0_c, x0_u, _, eps_u, _ = _parts(X, T, D.EDM())
    x0, eps = _denoise(S.Guidance(0.6, uncond=UNCOND, method="cfg++"))(X, T)
    np.testing.assert_allclose(x0, x0_u + 0.6 * (x0_c - x0_u), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eps, eps_u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eta,threshold", [(0.0, 0.0), (0.3, 0.0), (0.0, 0.5)])
def test_apg_projects_the_update_on_the_conditional_prediction(eta, threshold):
    # Sadat et al. (2024), APG without momentum, per sample over all other axes.
    x0_c, x0_u, _, _, eps_of = _parts(X, T, D.EDM())
    g = S.Guidance(4.0, uncond=UNCOND, method="apg", apg_eta=eta, apg_threshold=threshold)
    x0, eps = _denoise(g)(X, T)
    want = []
    for c, u in zip(x0_c, x0_u, strict=True):
        diff = c - u
        if threshold:
            diff = diff * min(1.0, threshold / np.linalg.norm(diff))
        unit = c / np.linalg.norm(c)
        par = np.sum(diff * unit) * unit
        want.append(c + 3.0 * (diff - par + eta * par))
    np.testing.assert_allclose(x0, np.stack(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eps, eps_of(np.stack(want)), rtol=1e-5, atol=1e-5)
    if threshold:  # the cap is active here: the update is shorter than without it
        assert np.linalg.norm(np.asarray(x0) - x0_c) < 3.0 * np.linalg.norm(x0_c - x0_u)


def test_channel_subset_guides_like_dit_forward_with_cfg():
    # DiT's forward_with_cfg: guided eps on the first 3 channels, the conditional rest.
    x0_c, _, eps_c, eps_u, _ = _parts(X, T, D.EDM())
    x0, eps = _denoise(S.Guidance(4.0, uncond=UNCOND, channels=3))(X, T)
    want_eps = np.concatenate([eps_u[..., :3] + 4 * (eps_c - eps_u)[..., :3], eps_c[..., 3:]], -1)
    np.testing.assert_allclose(eps, want_eps, rtol=1e-5, atol=1e-5)
    # x0_c here comes from a separate call on the conditional half: equal to rounding.
    np.testing.assert_allclose(np.asarray(x0)[..., 3:], x0_c[..., 3:], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "guidance",
    [
        S.Guidance(1.0, uncond=UNCOND),
        S.Guidance(1.0, uncond=UNCOND, method="apg", apg_eta=0.5, apg_threshold=1.0),
        S.Guidance(1.0, uncond=UNCOND, channels=3, rescale=0.7),
        S.Guidance(0.0, uncond=UNCOND, method="cfg++"),
    ],
    ids=["cfg", "apg", "channels+rescale", "cfg++-lambda0"],
)
def test_no_guidance_point_is_plain_sampling_bit_for_bit(guidance):
    process = D.Flow()
    plain_cond = {"y": jnp.zeros(4)} if guidance.method == "cfg++" else COND
    kw = dict(prediction="x0", solver="dpmpp_2m_sde", steps=4)
    key = jax.random.key(1)
    calls = []

    def counted(params, x, t, cond):
        calls.append(x.shape[0])
        return model(params, x, t, cond)

    run = lambda fn, **k: S.sample(fn, None, process, key, (4, 3, 3, 4), **kw, **k)
    guided, info = run(model, cond=COND, guidance=guidance)
    plain, plain_info = run(model, cond=plain_cond)
    np.testing.assert_array_equal(np.asarray(guided), np.asarray(plain))
    with jax.disable_jit():  # every model call is seen
        run(counted, cond=COND, guidance=guidance)
    assert calls == [8] * info["nfe"] and info["nfe"] == plain_info["nfe"] == 4  # one call a step


def test_bad_guidance_is_refused_before_tracing():
    for bad, match in [
        (dict(method="pag"), "method"),
        (dict(channels=-1), "channels"),
        (dict(method="apg", apg_threshold=-1.0), "apg_threshold"),
    ]:
        with pytest.raises(InputError, match=match):
            S.sample(
                lambda *a: pytest.fail("traced"),
                None,
                D.EDM(),
                jax.random.key(0),
                (4, 2),
                prediction="x0",
                cond=COND,
                guidance=S.Guidance(2.0, uncond=UNCOND, **bad),
            )
