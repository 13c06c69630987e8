"""Feature caching (DeepCache on the U-Net, FORA on DiT) as denoiser state of any solver."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import diffusion as D
from jaxgen import models
from jaxgen import sampling as S
from jaxgen.errors import InputError

TINY = {
    "unet": models.UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                        head_channels=8, num_groups=4, dropout=0.0),
    "dit": models.DiT(patch=2, hidden=16, depth=2, num_heads=2, num_classes=0,
                      learn_sigma=False),
}
SHAPE = (3, 4, 4, 2)


def _model(name):
    """``(model_fn, params)`` with every parameter N(0, 0.3^2) (no zero-initialised output)."""
    module = TINY[name]
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(1), jnp.zeros(SHAPE),
                                     jnp.ones(SHAPE[0])))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                          shapes["params"])
    return models.as_model_fn(module), params


@pytest.mark.parametrize("name", ["unet", pytest.param("dit", marks=pytest.mark.slow)])
def test_cache_interval_one_is_uncached_sampling_bit_for_bit(name):
    fn, params = _model(name)
    run = lambda **k: S.sample(fn, params, D.Flow(), jax.random.key(0), SHAPE,
                               prediction="velocity", solver="heun", steps=3, **k)
    plain, info = run()
    cached, info_c = run(cache_interval=1)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(plain))
    assert info_c["nfe"] == info["nfe"] == 5


@pytest.mark.slow  # ~8 s idle: three compilations
def test_deepcache_every_second_call_matches_a_hand_unrolled_loop():
    fn, params = _model("unet")
    process, ts = D.Flow(), np.array([1.0, 0.7, 0.4, 0.2, 0.0], np.float32)
    x_T = jax.random.normal(jax.random.key(5), SHAPE)
    out, info = S.sample(fn, params, process, jax.random.key(0), SHAPE, prediction="velocity",
                         solver="ddim", grid=ts, steps=4, x_T=x_T, cache_interval=2)

    @jax.jit
    def by_hand(x):
        features = None
        for i in range(4):  # calls 0 and 2 are full, 1 and 3 reuse the last full call's
            t = jnp.full((SHAPE[0],), ts[i])
            if i % 2 == 0:
                v, features = fn(params, x, t, None, fill_cache=True)
            else:
                v = fn(params, x, t, None, cache=features)
            x0 = x - ts[i] * v  # linear flow: x = (1 - t) x0 + t eps, v = eps - x0
            eps = x0 + v
            x = (1 - ts[i + 1]) * x0 + ts[i + 1] * eps
        return x

    want = by_hand(x_T)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    uncached, _ = S.sample(fn, params, process, jax.random.key(0), SHAPE,
                           prediction="velocity", solver="ddim", grid=ts, steps=4, x_T=x_T)
    assert np.abs(np.asarray(uncached) - np.asarray(out)).max() > 1e-3  # the cache acted
    assert info["nfe"] == 4


def test_cache_on_a_model_without_it_is_refused_before_tracing():
    plain = lambda params, x, t, cond: x
    for model_fn, interval, match in [(plain, 2, "fill_cache"), (_model("dit")[0], 0, ">= 1")]:
        with pytest.raises(InputError, match=match):
            S.sample(model_fn, None, D.Flow(), jax.random.key(0), SHAPE,
                     prediction="velocity", cache_interval=interval)
