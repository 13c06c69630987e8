"""The KL autoencoder: parameter counts, parity with diffusers, round trip, bad input.

Parity fixtures come from ``tests/fixtures/make_autoencoder_reference.py``
(diffusers on random weights filled by ``tests/random_weights.py``); the
weights are rebuilt here, written as a safetensors file and read through
:func:`jaxgen.models.load_weights`, so the name tables are tested with the
network.
"""

import json
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch_files
from random_weights import random_state_dict

from jaxgen.errors import InputError
from jaxgen.models import MODEL_NAMES, AutoencoderKL, count_params, create_model, sample_latent
from jaxgen.models.checkpoints import export_weights, load_weights

FIXTURE = Path(__file__).parent / "fixtures" / "autoencoder_reference.npz"

# float32 on both sides, different summation orders (oneDNN vs XLA convolutions):
# rounding of ~1e-7 per layer over 20-60 layers with GroupNorm in between; measured
# max |diff| / max |reference|: 0.9-2.2e-6 for the small configs, 4.3e-6 for the SD one.
RTOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURE))


def _model(config: dict) -> AutoencoderKL:
    """jaxgen's AutoencoderKL for a diffusers AutoencoderKL config."""
    return AutoencoderKL(
        channels=tuple(config["block_out_channels"]),
        layers_per_block=config["layers_per_block"],
        latent_channels=config["latent_channels"],
        in_channels=config.get("in_channels", 3),
        num_groups=config["norm_num_groups"],
        use_quant_conv=config.get("use_quant_conv", True),
        use_post_quant_conv=config.get("use_post_quant_conv", True),
        mid_attention=config.get("mid_block_add_attention", True),
    )


def _write_reference_weights(ref: dict, name: str, path: Path, prefix: str = "") -> None:
    shapes = json.loads(str(ref[f"{name}_shapes"]))
    tensors = random_state_dict(shapes, int(ref[f"{name}_seed"]))
    safetensors.numpy.save_file({prefix + k: v for k, v in tensors.items()}, str(path))


def _close(got, want, what: str) -> None:
    err = float(np.max(np.abs(np.asarray(got) - want)))
    scale = float(np.max(np.abs(want)))
    assert err <= RTOL * scale, f"{what}: max |diff| {err:.3g} > {RTOL} x {scale:.3g}"


def _check_parity(ref: dict, name: str, path: Path, prefix: str = "") -> None:
    config = json.loads(str(ref[f"{name}_config"]))
    model = _model(config)
    _write_reference_weights(ref, name, path, prefix)
    variables = load_weights(path, model)
    mean, logvar = jax.jit(lambda v, x: model.apply(v, x, method="encode"))(
        variables, ref[f"{name}_x"])
    decoded = jax.jit(lambda v, z: model.apply(v, z, method="decode"))(variables, ref[f"{name}_z"])
    _close(mean, ref[f"{name}_mean"], f"{name} mean")
    _close(logvar, ref[f"{name}_logvar"], f"{name} logvar")
    _close(decoded, ref[f"{name}_decoded"], f"{name} decode")


@pytest.mark.parametrize("name", ["vae-sd", "vae-sdxl"])
def test_preset_parameter_count(name):
    assert name in MODEL_NAMES
    model = create_model(name)
    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert count_params(variables["params"]) == 83_653_863  # diffusers' AutoencoderKL count
    assert model.factor == 8 and model.latent_channels == 4
    assert model.scaling_factor == {"vae-sd": 0.18215, "vae-sdxl": 0.13025}[name]


@pytest.mark.parametrize("name", ["small", "plain"])
def test_parity_with_diffusers(reference, tmp_path, name):
    _check_parity(reference, name, tmp_path / "diffusion_pytorch_model.safetensors")


def test_parity_ldm_checkpoint(reference, tmp_path):
    # CompVis names (attention as 1x1 convs), inside a full SD checkpoint's first_stage_model.
    _check_parity(reference, "ldm", tmp_path / "sd.safetensors", prefix="first_stage_model.")


def test_deprecated_diffusers_attention_names(reference, tmp_path):
    # Older diffusers uploads (e.g. the first sd-vae-ft-* files) name the attention
    # query/key/value/proj_attn; they load into the same parameters.
    model = _model(json.loads(str(reference["small_config"])))
    _write_reference_weights(reference, "small", tmp_path / "new.safetensors")
    tensors = safetensors.numpy.load_file(str(tmp_path / "new.safetensors"))
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in tensors.items():
        for new, dep in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{dep}.")
        renamed[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in renamed
    safetensors.numpy.save_file(renamed, str(tmp_path / "old.safetensors"))
    a = flax.traverse_util.flatten_dict(load_weights(tmp_path / "new.safetensors", model))
    b = flax.traverse_util.flatten_dict(load_weights(tmp_path / "old.safetensors", model))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_lightning_ckpt_of_a_full_sd_checkpoint(reference, tmp_path):
    # An original SD .ckpt: {"state_dict": {"first_stage_model.*": ..., "model.*": ...}}.
    model = _model(json.loads(str(reference["ldm_config"])))
    _write_reference_weights(reference, "ldm", tmp_path / "vae.safetensors")
    tensors = safetensors.numpy.load_file(str(tmp_path / "vae.safetensors"))
    wrapped = {f"state_dict.first_stage_model.{k}": v for k, v in tensors.items()}
    wrapped["state_dict.model.diffusion_model.out.0.weight"] = np.ones(4, np.float32)
    (tmp_path / "sd.ckpt").write_bytes(torch_files.zip_file(wrapped))
    a = flax.traverse_util.flatten_dict(load_weights(tmp_path / "vae.safetensors", model))
    b = flax.traverse_util.flatten_dict(load_weights(tmp_path / "sd.ckpt", model))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_parity_sd_config(reference, tmp_path):
    _check_parity(reference, "sd", tmp_path / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("fmt", ["diffusers", "ldm"])
def test_export_import_round_trip_is_bit_exact(tmp_path, fmt):
    model = AutoencoderKL(channels=(16, 32), layers_per_block=1, latent_channels=3, num_groups=8)
    abstract = jax.eval_shape(model.init, jax.random.key(1), jnp.zeros((1, 4, 4, 3)))
    # Standard normal values everywhere, so that no swap can hide behind 0s or 1s.
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                             flax.linen.unbox(abstract))
    path = tmp_path / f"{fmt}.safetensors"
    safetensors.numpy.save_file(export_weights(variables, model, fmt), str(path))
    back = load_weights(path, model)
    flat_a = flax.traverse_util.flatten_dict(variables["params"])
    flat_b = flax.traverse_util.flatten_dict(back["params"])
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_b[k]), np.asarray(flat_a[k]), err_msg=str(k))


def _zero_variables(model: AutoencoderKL, x_shape: tuple[int, ...]) -> dict:
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(x_shape))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), flax.linen.unbox(abstract))


def test_sample_latent_is_the_reparameterisation():
    mean = jnp.full((2, 3, 3, 4), 0.5)
    logvar = jnp.full((2, 3, 3, 4), np.log(4.0))
    key = jax.random.key(3)
    z = sample_latent(key, mean, logvar)
    np.testing.assert_allclose(z, 0.5 + 2.0 * jax.random.normal(key, mean.shape), rtol=1e-6)


def test_logvar_is_clipped_as_ldm():
    model = AutoencoderKL(channels=(8,), layers_per_block=1, latent_channels=2, num_groups=4)
    params = flax.traverse_util.flatten_dict(_zero_variables(model, (1, 4, 4, 3))["params"])
    params[("quant_conv", "bias")] = jnp.array([0.0, 0.0, 100.0, -100.0])
    variables = {"params": flax.traverse_util.unflatten_dict(params)}
    _, logvar = model.apply(variables, jnp.zeros((1, 4, 4, 3)), method="encode")
    assert float(logvar[..., 0].min()) > 19.0 and float(logvar[..., 0].max()) == 20.0
    assert float(logvar[..., 1].max()) == -30.0


@pytest.mark.parametrize(
    ("method", "shape", "match"),
    [("encode", (1, 8, 8, 1), r"\[B, H, W, 3\]"), ("encode", (1, 5, 8, 3), "divisible by 2"),
     ("decode", (1, 4, 4, 3), r"\[B, H, W, 2\]")],
)
def test_bad_input(method, shape, match):
    model = AutoencoderKL(channels=(8, 8), layers_per_block=1, latent_channels=2, num_groups=4)
    variables = _zero_variables(model, (1, 4, 4, 3))
    with pytest.raises(InputError, match=match):
        model.apply(variables, jnp.zeros(shape), method=method)


@pytest.mark.parametrize("shards", [1, 4])
def test_micro_batched_decode_and_encode_equal_the_batch(shards):
    """One image per shard at a time under lax.map computes what the whole batch does.

    A convolution over one image sums the same terms as over the batch, in
    possibly another order: float32 rounding only, far below 1e-5 relative.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxgen.models import micro_batched
    from jaxgen.parallel import make_mesh

    model = create_model("vae-small", in_channels=3)
    x = jax.random.uniform(jax.random.key(1), (8, 128, 128, 3), minval=-1, maxval=1)
    variables = model.init(jax.random.key(0), x[:1])
    mesh = make_mesh(jax.devices()[:shards])
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec(mesh.axis_names)))
    encode = lambda u: model.apply(variables, u, method="encode")
    decode = lambda u: model.apply(variables, u, method="decode")
    calls = []

    def counted(u):
        calls.append(u.shape[0])
        return encode(u)

    mean, logvar = jax.jit(lambda u: micro_batched(counted, u, pixels=128 * 128,
                                                   shards=shards))(x)
    assert calls == [shards]  # traced once, on one image per shard
    want_mean, want_logvar = jax.jit(encode)(x)
    np.testing.assert_allclose(mean, want_mean, rtol=RTOL, atol=RTOL * np.abs(want_mean).max())
    np.testing.assert_allclose(logvar, want_logvar, rtol=RTOL,
                               atol=RTOL * np.abs(want_logvar).max())
    got = jax.jit(lambda u: micro_batched(decode, u, pixels=128 * 128, shards=shards))(mean)
    want = jax.jit(decode)(mean)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())
    # Small images, or a batch that is one image per shard, are the plain call.
    calls.clear()
    jax.jit(lambda u: micro_batched(counted, u, pixels=64 * 64, shards=shards))(x)
    assert calls == [8]


def test_upsample_conv_equals_nearest_upsampling_then_convolution():
    """The decoder's sub-pixel upsample-conv is ``conv3x3(repeat(repeat(x)))`` with the same
    parameters (names, shapes and init included)."""
    import flax.linen as nn

    from jaxgen.models.layers import NearestUpsampleConv, conv

    x = jax.random.normal(jax.random.key(2), (2, 5, 7, 6))
    up = NearestUpsampleConv(8, ("conv_in", "embed"), name="up")
    plain = conv(8, ("conv_in", "embed"), dtype=jnp.float32, param_dtype=jnp.float32, name="up")
    params = nn.unbox(up.init(jax.random.key(3), x))
    plain_params = nn.unbox(plain.init(jax.random.key(3), jnp.zeros((2, 10, 14, 6))))
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, plain_params)
    np.testing.assert_array_equal(params["params"]["kernel"], plain_params["params"]["kernel"])
    params["params"]["bias"] = jax.random.normal(jax.random.key(4), (8,))
    got = up.apply(params, x)
    want = plain.apply(params, jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
    assert got.shape == (2, 10, 14, 8)
    # Summed taps (w1 + w2) round differently: a few float32 ulps of the output scale.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
