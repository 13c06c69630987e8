"""REPA (Yu et al. 2025): the alignment loss, the projector on a DiT, and training with it."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from train_fixtures import assert_same, batch_of, leaves, tiny_config

from jaxgen import diffusion
from jaxgen.errors import InputError
from jaxgen.models import as_model_fn, dit
from jaxgen.models.repa import REPAModel
from jaxgen.train import init_state, loop, make_train_step, repa


def repa_loss_numpy(z, y):
    """sihyun-yu/REPA ``loss.py``'s ``proj_loss`` (one encoder), float64 NumPy:
    ``-mean_tokens(normalize(z) . normalize(y))`` per example."""
    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
    unit = lambda v: v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    return -np.mean(np.sum(unit(z) * unit(y), -1), -1)


def bilinear_numpy(y, out):
    """``F.interpolate(mode="bilinear", align_corners=False)`` for upsampling, float64."""
    def taps(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo
    y = np.asarray(y, np.float64)
    lo, hi, w = taps(y.shape[1], out[0])
    y = y[:, lo] * (1 - w)[None, :, None, None] + y[:, hi] * w[None, :, None, None]
    lo, hi, w = taps(y.shape[2], out[1])
    return y[:, :, lo] * (1 - w)[None, None, :, None] + y[:, :, hi] * w[None, None, :, None]


def test_alignment_loss_at_a_hand_point():
    # token 1 along y: cos 1; token 2 at 45 degrees: cos 1/sqrt(2); token 3 zero: cos 0
    z = jnp.array([[[2.0, 0.0], [0.0, 3.0], [0.0, 0.0]]])
    y = jnp.array([[[5.0, 0.0], [1.0, 1.0], [1.0, 0.0]]])
    want = -(1 + 2**-0.5 + 0) / 3
    assert float(repa.alignment_loss(z, y)[0]) == pytest.approx(want, rel=1e-6)
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(3, 5, 7)), rng.normal(size=(3, 5, 7))
    np.testing.assert_allclose(repa.alignment_loss(jnp.asarray(z), jnp.asarray(y)),
                               repa_loss_numpy(z, y), rtol=1e-5)


def test_encoder_grid_is_interpolated_to_the_token_grid():
    y = np.random.default_rng(1).normal(size=(2, 3, 2, 4)).astype(np.float32)
    got = repa.match_grid(jnp.asarray(y), (6, 5))
    np.testing.assert_allclose(got, bilinear_numpy(y, (6, 5)).reshape(2, 30, 4), atol=1e-6)
    np.testing.assert_array_equal(repa.match_grid(jnp.asarray(y), (3, 2)), y.reshape(2, 6, 4))


def _tiny_repa_dit(z_dim=6, learn_sigma=True):
    backbone = dit("DiT-S/2", hidden=32, depth=3, num_heads=2, num_classes=4,
                   learn_sigma=learn_sigma)
    return REPAModel(backbone, depth=2, projector_dim=16, z_dim=z_dim)


def test_repa_loss_equals_float64_transcription():
    """loss = denoising loss + lambda * REPA's projection loss on the tokens of the same
    forward pass, against a stand-in encoder on a 2 x 2 grid (the model's is 4 x 4)."""
    module = _tiny_repa_dit()
    x0 = jax.random.uniform(jax.random.key(0), (3, 8, 8, 1), minval=-1, maxval=1)
    cond = {"label": jnp.array([0, 1, 2])}
    params = nn.unbox(jax.jit(module.init)(jax.random.key(1), x0, jnp.zeros(3), cond)["params"])
    w = jax.random.normal(jax.random.key(2), (16, 6))
    tokens = lambda v, x: jnp.einsum("bhpwqc,pqcd->bhwd", x.reshape(3, 2, 4, 2, 4, 1),
                                     v["w"].reshape(4, 4, 1, 6))
    model_fn = lambda p, x, t, c, **kw: as_model_fn(module, **kw)(p, x, t, c)
    base = functools.partial(diffusion.loss, process=diffusion.Flow(), prediction="velocity")
    key = jax.random.key(3)
    # the x_t the loss draws from key (diffusion.loss's order of draws)
    k_t, k_eps, _ = jax.random.split(key, 3)
    t = jax.random.uniform(k_t, (3,))
    x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * jax.random.normal(
        k_eps, x0.shape)

    @jax.jit
    def everything(p, frozen):
        bare = {k: v for k, v in p.items() if k != "repa_projector"}
        return (repa.repa_loss(model_fn, p, x0, cond, key, frozen=frozen, base_loss=base,
                               tokens=tokens, lam=0.5),
                base(model_fn, p, x0, cond, key)[0],
                model_fn(p, x_t, t, cond, return_repa=True)[1],
                model_fn(p, x_t, t, cond),
                as_model_fn(module.backbone)(bare, x_t, t, cond))

    (total, metrics), plain, z, out, out_bare = everything(params, {"repa_encoder": {"w": w}})
    y = bilinear_numpy(tokens({"w": w}, x0), (4, 4)).reshape(3, 16, 6)
    proj = repa_loss_numpy(z, y)
    assert float(metrics["repa"]) == pytest.approx(proj.mean(), rel=1e-5)
    assert float(total) == pytest.approx(float(plain) + 0.5 * proj.mean(), rel=1e-5)
    # the plain call is the bare DiT's, bit for bit, and the learned sigma is cut off
    assert out.shape == x0.shape
    np.testing.assert_array_equal(out, out_bare)


def _config(data_file, encoder="inception", lam=0.5, weights=""):
    c = tiny_config(data_file, **{"optim.warmup_steps": 0, "train.num_steps": 2})
    c.model.name = "DiT-S/2"
    c.model.kwargs = ml_collections.ConfigDict(dict(hidden=32, depth=1, num_heads=2,
                                                    num_classes=4, learn_sigma=False))
    c.diffusion.process, c.diffusion.prediction = "flow", "velocity"
    c.diffusion.time_sampler = "uniform"
    c.train.repa.encoder, c.train.repa.weights = encoder, weights
    c.train.repa.depth, c.train.repa.projector_dim = 1, 16
    c.train.repa["lambda"] = lam
    return c


def _train(config, steps=2):
    parts, _ = loop.build(config)
    state = init_state(parts, 0)
    first = leaves(state.params)
    step = make_train_step(parts)
    for i in range(steps):
        state, metrics = step(state, batch_of(parts, start=8 * i))
    return parts, first, state, metrics


@pytest.mark.slow
def test_training_with_inception_features(data_file, fid_helper_wheel):
    """The projector trains with the model; the encoder's weights arrive as the step's
    frozen argument."""
    parts, first, state, metrics = _train(_config(data_file, weights=str(fid_helper_wheel)), 1)
    assert set(parts.frozen) == {"repa_encoder"}
    assert "mixed_6" in parts.frozen["repa_encoder"]["params"]
    assert -1 <= float(metrics["repa"]) <= 1 and float(metrics["finite"]) == 1
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    for a, (path, b) in zip(first, flat, strict=True):
        if path[0].key == "repa_projector":
            assert not np.array_equal(a, np.asarray(b)), path


@pytest.mark.slow
def test_lambda_zero_is_plain_training(data_file):
    """The wrapped DiT starts from the bare DiT's parameters and, with lambda = 0, trains
    exactly as it does (bit for bit); no encoder is loaded."""
    parts, _, zero, _ = _train(_config(data_file, lam=0.0, encoder="dinov2-vitg14",
                                       weights="/nonexistent"), 1)
    assert parts.frozen is None and "repa_projector" in zero.params
    _, _, plain, _ = _train(_config(data_file, encoder=""), 1)
    assert_same({k: v for k, v in zero.params.items() if k != "repa_projector"}, plain.params)
    assert_same({k: v for k, v in zero.ema["0.9"].items() if k != "repa_projector"},
                plain.ema["0.9"])


def test_repa_config_is_checked(data_file):
    bad = {"encoder": "dinov3", "depth": 0, "lambda": -1.0}
    for key, value in bad.items():
        c = _config(data_file)
        c.train.repa[key] = value
        with pytest.raises(InputError, match=f"train.repa.{key}"):
            loop.build(c)
    c = _config(data_file)
    c.train.repa.depth = 5
    with pytest.raises(InputError, match="has 1 blocks"):
        loop.build(c)
    c = _config(data_file)
    c.model.name, c.model.kwargs = "unet-small", ml_collections.ConfigDict()
    with pytest.raises(InputError, match="DiT/SiT backbone"):
        loop.build(c)


def test_dit_returns_the_tokens_after_a_block_scanned_or_not():
    """``return_hidden=k`` returns block k's output whether the blocks are unrolled or
    scanned, and leaves the prediction unchanged bit for bit."""
    from jaxgen.models.dit import stack_blocks

    kw = dict(hidden=32, depth=2, num_heads=2, num_classes=0, learn_sigma=False)
    x, t = jax.random.normal(jax.random.key(0), (2, 8, 8, 1)), jnp.array([0.3, 0.7])
    loop_dit, scan_dit = dit("DiT-S/4", **kw), dit("DiT-S/4", scan_blocks=True, **kw)
    params = nn.unbox(jax.jit(loop_dit.init)(jax.random.key(1), x, t))["params"]
    leaves_, tree = jax.tree.flatten(params)  # adaLN-Zero starts every block as the identity
    params = jax.tree.unflatten(tree, [v + 0.1 * jax.random.normal(jax.random.key(i), v.shape)
                                       for i, v in enumerate(leaves_)])

    @jax.jit
    def run(p):
        hidden = [loop_dit.apply({"params": p}, x, t, return_hidden=k) for k in (1, 2)]
        scanned = scan_dit.apply({"params": stack_blocks(p, 2)}, x, t, return_hidden=1)
        return hidden, scanned, loop_dit.apply({"params": p}, x, t)

    hidden, (s_out, s_h1), plain = run(params)
    for out, _ in hidden:
        np.testing.assert_array_equal(out, plain)
    h1, h2 = (h for _, h in hidden)
    assert h1.shape == (2, 4, 32) and not np.allclose(h1, h2)
    np.testing.assert_allclose(s_h1, h1, atol=1e-5)
    np.testing.assert_allclose(s_out, plain, atol=1e-5)
    with pytest.raises(InputError, match="return_hidden=3"):
        loop_dit.apply({"params": params}, x, t, return_hidden=3)


def test_old_config_files_resume_unchanged(data_file):
    """train.repa absent from a saved config.json counts as REPA off; turning it on is a
    change that resuming refuses."""
    import json

    from jaxgen.train.workdir import config_differences

    new = json.loads(tiny_config(data_file).to_json())
    saved = json.loads(json.dumps(new))
    del saved["train"]["repa"]
    assert config_differences(saved, new) == []
    new["train"]["repa"]["encoder"] = "inception"
    assert config_differences(saved, new) == ["train.repa.encoder: '(absent)' -> 'inception'"]


@pytest.mark.parametrize("name, size, grid, width", [
    ("dinov2-vitb14", 256, 16, 768),  # the paper's: 224 x 224 input, 16 x 16 patch tokens
    ("dinov2-vits14", 28, 16, 384),
    ("dinov2-vitl14", 512, 32, 1024),  # 448 x 448 at 512 (REPA's 224 * resolution // 256)
    ("inception", 28, 17, 192),
])
def test_encoder_feature_shapes(name, size, grid, width):
    """Each encoder's tokens on its grid and width (shapes only: no weights, no compute)."""
    module, z_dim = repa.encoder_module(name)
    x0 = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x),
                               jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    out = jax.eval_shape(lambda v, x: repa.encoder_tokens(name, module, v, x), variables, x0)
    assert out.shape == (2, grid, grid, width) and z_dim == width
