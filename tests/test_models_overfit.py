"""A tiny U-Net memorises 8 images: the epsilon-prediction loss falls 10x in 300 steps.

The loss is a plain DDPM epsilon-MSE written here (linear betas 1e-4..0.02,
1000 steps), so this test depends on nothing but the model and optax.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgen.models import UNet

BETAS = np.linspace(1e-4, 0.02, 1000)
ALPHA_BAR = jnp.asarray(np.cumprod(1 - BETAS), jnp.float32)


def eight_images() -> jax.Array:
    """8 distinct 16x16 grayscale plane waves in [-1, 1]."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16] / 16
    waves = [np.sin(2 * np.pi * (a * xx + b * yy) + c) for a, b, c in rng.uniform(0, 2, (8, 3))]
    return jnp.asarray(np.stack(waves)[..., None], jnp.float32)


def eps_mse(model, params, x0, key, repeats=1):
    """Mean ||eps_hat(x_t, t) - eps||^2 over random t ~ U{0..999} and eps ~ N(0, I)."""
    x0 = jnp.tile(x0, (repeats, 1, 1, 1))
    kt, ke = jax.random.split(key)
    t = jax.random.randint(kt, x0.shape[:1], 0, 1000)
    eps = jax.random.normal(ke, x0.shape)
    a = ALPHA_BAR[t][:, None, None, None]
    x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps
    return jnp.mean((model.apply({"params": params}, x_t, t.astype(jnp.float32)) - eps) ** 2)


@pytest.mark.slow  # ~15 s alone on 2 cores, ~40 s when they are shared
def test_tiny_unet_overfits_eight_images():
    model = UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_groups=4,
                 dropout=0.0, scale_shift=True)
    x0 = eight_images()
    # Level-0 XLA optimisation: the initialisers otherwise take ~15 s to compile on CPU.
    init = jax.jit(model.init, compiler_options={"xla_backend_optimization_level": 0})
    params = init(jax.random.key(0), x0, jnp.zeros(8))["params"]
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, key):
        grads = jax.grad(lambda p: eps_mse(model, p, x0, key))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    # A fixed evaluation set of 8 x 32 (t, eps) draws measures the loss before and after.
    evaluate = jax.jit(lambda p: eps_mse(model, p, x0, jax.random.key(-1), repeats=32))
    before = float(evaluate(params))
    for i in range(300):
        params, state = step(params, state, jax.random.key(i))
    after = float(evaluate(params))
    print(f"eps-MSE before {before:.4f}, after 300 steps {after:.4f}")
    assert 0.9 < before < 1.1  # zero-initialised output: the loss is E[eps^2] = 1
    assert after < before / 10, (before, after)
