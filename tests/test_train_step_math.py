"""The train step against a hand computation: the loss, AdamW, EMA, accumulation, bf16.

``make_train_step`` is compared with ``jaxgen.diffusion.loss`` differentiated
here and AdamW / EMA written out in float64 NumPy, on the same batch and the
same random draws: step ``s`` uses ``fold_in(state.rng, s)`` split into (loss
key, dropout key), as ``jaxgen/train/state.py`` does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_fixtures import UserNet, batch_of, leaves, tiny_config, tiny_images

from jaxgen import diffusion as D
from jaxgen.parallel import make_mesh
from jaxgen.train import init_state, make_run_parts, make_train_step

pytestmark = pytest.mark.usefixtures("module_compile_cache")

# Adam's eps comparable to the gradients (|g| ~ 1e-3 .. 1e-1 here): the update
# g / (|g| + eps) then depends on the gradient's value, not only on its sign as
# with eps = 1e-8, so the comparison checks the gradient itself.
EPS = 1e-2
LR = 1e-3


def _parts(data_file, module=None, loss_fn=None, **overrides):
    config = tiny_config(data_file, **{"optim.warmup_steps": 0, "optim.lr": LR,
                                       "optim.eps": EPS, **overrides})
    parts = make_run_parts(config, make_mesh(), (8, 8, 1), config.train.num_steps,
                           module=module, loss_fn=loss_fn)
    return config, parts


def _f64(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _assert_params_close(got, want, what):
    # Adam's step is lr m_hat / (sqrt(v_hat) + eps) with |m_hat / sqrt(v_hat)| <= ~3 in
    # the first steps; a relative gradient difference r (float32 reassociation between
    # two compiled programs, < 1e-5) moves it by < 3e-5 lr; plus one float32 ulp of
    # |p| <= ~2 when the update is added (2.4e-7).
    for g, w in zip(_f64(got), want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=3e-5 * LR + 2.4e-7, err_msg=what)


def _adam(grads, mu, nu, count, cfg):
    """optax.chain(clip_by_global_norm, adamw) by hand, float64: one update."""
    norm = np.sqrt(sum(np.sum(g * g) for g in grads))
    if cfg.grad_clip > 0 and norm > cfg.grad_clip:
        grads = [g * cfg.grad_clip / norm for g in grads]
    mu = [cfg.b1 * m + (1 - cfg.b1) * g for m, g in zip(mu, grads, strict=True)]
    nu = [cfg.b2 * v + (1 - cfg.b2) * g * g for v, g in zip(nu, grads, strict=True)]
    updates = [
        -cfg.lr * ((m / (1 - cfg.b1**count)) / (np.sqrt(v / (1 - cfg.b2**count)) + cfg.eps))
        for m, v in zip(mu, nu, strict=True)
    ]
    return updates, mu, nu, norm


def test_two_steps_equal_adamw_and_ema_by_hand(data_file):
    """Loss, gradient, clipped AdamW and the warmed-up EMA, two steps, against NumPy."""
    config, parts = _parts(data_file, module=UserNet())
    cfg = config.optim
    assert config.diffusion.process == "flow" and config.diffusion.prediction == "velocity"
    assert cfg.grad_clip == 1.0 and config.train.ema_warmup
    state = init_state(parts, seed=0)
    rng = jnp.asarray(np.array(state.rng))  # a copy: the step donates the state
    treedef = jax.tree.structure(state.params)
    p = _f64(state.params)
    ema = {d: list(p) for d in config.train.ema_decays}
    mu, nu = [np.zeros_like(x) for x in p], [np.zeros_like(x) for x in p]
    batch = batch_of(n=8)
    x0 = jnp.asarray(tiny_images(8)[0], jnp.float32) / 127.5 - 1  # [-1, 1], by hand
    cond = {"label": batch["label"]}

    def hand_loss(params, key):
        model = lambda prm, x, t, c: UserNet().apply({"params": prm}, x, t, c)  # time_scale 1
        return D.loss(model, params, x0, cond, key, process=D.Flow(), prediction="velocity",
                      time_sampler="logit_normal")[0]

    hand_grad = jax.jit(jax.value_and_grad(hand_loss))
    step = make_train_step(parts)
    for s in (0, 1):
        k_loss, _ = jax.random.split(jax.random.fold_in(rng, s))
        params = jax.tree.unflatten(treedef, [jnp.asarray(x, jnp.float32) for x in p])
        loss, grads = hand_grad(params, k_loss)
        updates, mu, nu, norm = _adam(_f64(grads), mu, nu, s + 1, cfg)
        state, metrics = step(state, batch)
        # Loss and gradient norm of one float32 program vs another: ~1e-6 relative.
        np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
        np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)
        assert float(metrics["lr"]) == pytest.approx(LR)
        assert norm > cfg.grad_clip  # the clipping branch is the one exercised
        p = [x + u for x, u in zip(p, updates, strict=True)]
        _assert_params_close(state.params, p, f"params after step {s + 1}")
        n = s + 1  # optimizer updates applied, this one included
        for d in config.train.ema_decays:
            decay = min(d, (1 + n) / (10 + n))  # the warmup: 2/11, then 3/12
            ema[d] = [decay * e + (1 - decay) * x for e, x in zip(ema[d], p, strict=True)]
            _assert_params_close(state.ema[repr(float(d))], ema[d], f"EMA {d} at step {n}")
    assert int(state.step) == 2


def _fixed_noise_loss(model_fn, params, x0, cond, key):
    """Per-example flow matching at t = 0.5 with noise fixed by the example (not the key):
    the loss of a batch is the mean of its examples' whatever the batch is split into."""
    del key
    t = jnp.full((x0.shape[0],), 0.5)
    eps = jnp.sin(12.9898 * x0 + 4.1414 * (1 + jnp.arange(x0.shape[-1])))
    pred = model_fn(params, 0.5 * x0 + 0.5 * eps, t, cond)
    return jnp.mean((pred - (eps - x0)) ** 2, axis=(1, 2, 3)), {}


def test_accumulated_micro_batches_equal_one_large_batch(data_file):
    big_cfg, big = _parts(data_file, module=UserNet(), loss_fn=_fixed_noise_loss)
    _, acc = _parts(data_file, module=UserNet(), loss_fn=_fixed_noise_loss,
                    **{"optim.grad_accum": 2})
    s_big, _ = make_train_step(big)(init_state(big, seed=0), batch_of(n=16))
    step = make_train_step(acc)
    s_acc = init_state(acc, seed=0)
    before = leaves(s_acc.params)
    s_acc, _ = step(s_acc, batch_of(n=8))
    for a, b in zip(before, leaves(s_acc.params), strict=True):
        np.testing.assert_array_equal(a, b)  # first micro-batch: nothing applied yet
    s_acc, _ = step(s_acc, batch_of(n=8, start=8))
    # MultiSteps averages the two micro-batch gradients: (g_a + g_b) / 2 is the
    # 16-example mean up to float32 summation order; with eps = 1e-2 the update is
    # not scale-invariant, so a sum instead of a mean would differ by ~lr.
    _assert_params_close(s_acc.params, _f64(s_big.params), "accumulated params")
    for d in big_cfg.train.ema_decays:  # one update each: decay min(d, 2/11)
        name = repr(float(d))
        _assert_params_close(s_acc.ema[name], _f64(s_big.ema[name]), f"EMA {d}")


@pytest.mark.slow  # two compilations of the U-Net's train step: ~30-60 s on 2 cores
def test_bfloat16_compute_matches_float32_within_its_rounding(data_file):
    # The tiny U-Net (its output layer starts at zero: one float32 step first, so the
    # output and the loss depend on the compute dtype).
    _, f32 = _parts(data_file)
    _, bf16 = _parts(data_file, **{"train.compute_dtype": "bfloat16"})
    step32 = make_train_step(f32)
    state, _ = step32(init_state(f32, seed=0), batch_of(n=8))
    params = leaves(state.params)
    copy = jax.tree.map(jnp.array, state)
    state32, m32 = step32(state, batch_of(n=8))
    state16, m16 = make_train_step(bf16)(copy, batch_of(n=8))
    assert jax.tree.leaves(state16.params)[0].dtype == jnp.float32  # storage stays float32
    # bf16 keeps 8 significant bits: each rounding is <= 2^-9 = 2e-3 relative; about 20
    # rounded layers whose errors add like a random walk give ~sqrt(20) 2^-9 ~ 1e-2 on
    # the output, and the squared-error loss and gradient norm move by about as much.
    for k in ("loss", "grad_norm"):
        a, b = float(m32[k]), float(m16[k])
        assert abs(a - b) <= 2e-2 * abs(a), (k, a, b)
    # The update: Adam's lr g / (|g| + eps) with eps = 1e-2 changes by at most lr times
    # the gradient's relative error; 2e-2 lr per element, plus the ulp of |p| <= 2.
    for p0, a, b in zip(params, leaves(state32.params), leaves(state16.params), strict=True):
        np.testing.assert_allclose(b - p0, a - p0, rtol=0, atol=2e-2 * LR + 2.4e-7)
