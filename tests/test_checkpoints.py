"""Released denoiser checkpoints into jaxgen's DiT and U-Net; the readers' errors.

Parity fixtures come from ``tests/fixtures/make_denoiser_reference.py``
(diffusers on random weights filled by ``tests/random_weights.py``): the
weights are rebuilt here under the released names, written in a released
file format and read through :func:`jaxgen.models.load_weights`.
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
from jaxgen.models import DiT, UNet, count_params, create_model
from jaxgen.models.checkpoints import KNOWN_FILES, export_weights, load_weights

FIXTURE = Path(__file__).parent / "fixtures" / "denoiser_reference.npz"

# float32 both sides with different summation orders; measured max |diff| / max
# |reference|: 2.2e-6 (DiT, official names), 2.4e-6 (DiT, diffusers), 1.4e-6 (U-Net).
RTOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURE))


def _tensors(ref: dict, name: str) -> dict[str, np.ndarray]:
    tied = json.loads(str(ref[f"{name}_tied"])) if f"{name}_tied" in ref else None
    return random_state_dict(json.loads(str(ref[f"{name}_shapes"])), int(ref[f"{name}_seed"]), tied)


def _small_dit(**kw) -> DiT:
    return DiT(patch=2, hidden=32, depth=2, num_heads=2, num_classes=10, **kw)


def _small_unet() -> UNet:
    return UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=1,
                num_groups=8, dropout=0.0)


def _close(got, want, what: str) -> None:
    err = float(np.max(np.abs(np.asarray(got) - want)))
    scale = float(np.max(np.abs(want)))
    assert err <= RTOL * scale, f"{what}: max |diff| {err:.3g} > {RTOL} x {scale:.3g}"


def _random_like(abstract) -> dict:
    """Standard normal values for every parameter, so that no swap can hide behind 0s or 1s."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                        flax.linen.unbox(abstract))


def _assert_same_params(a, b) -> None:
    fa = flax.traverse_util.flatten_dict(flax.linen.unbox(a["params"]))
    fb = flax.traverse_util.flatten_dict(flax.linen.unbox(b["params"]))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fb[k]), np.asarray(fa[k]), err_msg=str(k))


def test_dit_official_checkpoint_parity(ref, tmp_path):
    # A .pt state dict as facebookresearch/DiT and willisma/SiT release them.
    path = tmp_path / "DiT-tiny.pt"
    path.write_bytes(torch_files.zip_file(_tensors(ref, "dit_official")))
    model = _small_dit()
    variables = load_weights(path, model)
    out = jax.jit(model.apply)(variables, ref["dit_x"], ref["dit_t"],
                               {"label": jnp.asarray(ref["dit_labels"], jnp.int32)})
    assert out.shape == ref["dit_official_out"].shape  # learned sigma: 2 x 4 channels
    _close(out, ref["dit_official_out"], "DiT (official names)")


def test_dit_diffusers_pipeline_folder_parity(ref, tmp_path):
    (tmp_path / "transformer").mkdir()
    safetensors.numpy.save_file(
        _tensors(ref, "dit_diffusers"),
        str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    model = _small_dit()
    variables = load_weights(tmp_path, model)  # a pipeline root: found in transformer/
    out = jax.jit(model.apply)(variables, ref["dit_x"], ref["dit_t"],
                               {"label": jnp.asarray(ref["dit_labels"], jnp.int32)})
    _close(out, ref["dit_diffusers_out"], "DiT (diffusers names)")


def test_dit_scan_blocks_gets_stacked_params(ref, tmp_path):
    path = tmp_path / "dit.safetensors"
    safetensors.numpy.save_file(_tensors(ref, "dit_official"), str(path))
    plain = load_weights(path, _small_dit())
    stacked = load_weights(path, _small_dit(scan_blocks=True))
    np.testing.assert_array_equal(stacked["params"]["blocks"]["fc1"]["kernel"][1],
                                  plain["params"]["block1"]["fc1"]["kernel"])


def test_unet_diffusers_parity(ref, tmp_path):
    path = tmp_path / "diffusion_pytorch_model.bin"
    path.write_bytes(torch_files.zip_file(_tensors(ref, "unet")))
    model = _small_unet()
    variables = load_weights(tmp_path, model)
    out = jax.jit(model.apply)(variables, ref["unet_x"], ref["unet_t"])
    _close(out, ref["unet_out"], "UNet2DModel")


def test_ddpm_cifar10_config_imports_with_every_shape_checked(ref, tmp_path):
    shapes = json.loads(str(ref["ddpm_cifar10_shapes"]))
    tensors = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    safetensors.numpy.save_file(tensors, str(path))
    variables = load_weights(path, create_model("unet-ddpm-cifar10"))
    assert count_params(variables["params"]) == sum(int(np.prod(s)) for s in shapes.values())


@pytest.mark.parametrize(("which", "fmt"), [("dit", "dit"), ("dit", "diffusers"),
                                            ("unet", "diffusers")])
def test_export_import_round_trip_is_bit_exact(tmp_path, which, fmt):
    if which == "dit":
        model, x = _small_dit(), jnp.zeros((1, 4, 4, 4))
        init = lambda k: model.init(k, x, jnp.zeros((1,)), {"label": jnp.zeros((1,), jnp.int32)})
    else:
        model, x = _small_unet(), jnp.zeros((1, 4, 4, 3))
        init = lambda k: model.init(k, x, jnp.zeros((1,)))
    variables = _random_like(jax.eval_shape(init, jax.random.key(0)))
    path = tmp_path / "w.safetensors"
    safetensors.numpy.save_file(export_weights(variables, model, fmt), str(path))
    _assert_same_params(variables, load_weights(path, model))


# ---------------------------------------------------------------- bad input


def test_missing_known_file_says_where_it_comes_from(tmp_path):
    with pytest.raises(InputError, match="dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"):
        load_weights(tmp_path / "DiT-XL-2-256x256.pt", create_model("DiT-XL/2"))
    assert "SiT-XL-2-256x256.pt" in KNOWN_FILES


def test_folder_without_weights_names_the_files(tmp_path):
    with pytest.raises(InputError, match="diffusion_pytorch_model.safetensors"):
        load_weights(tmp_path, _small_unet())


def test_unknown_suffix(tmp_path):
    path = tmp_path / "w.npz"
    path.write_bytes(b"x")
    with pytest.raises(InputError, match=r"unknown weight file type '\.npz'"):
        load_weights(path, _small_unet())


def test_weights_of_another_model(ref, tmp_path):
    path = tmp_path / "unet.safetensors"
    safetensors.numpy.save_file(_tensors(ref, "unet"), str(path))
    with pytest.raises(InputError, match="not a DiT checkpoint in any known format"):
        load_weights(path, _small_dit())


def test_missing_unexpected_and_misshaped_tensors_are_named(ref, tmp_path):
    tensors = _tensors(ref, "dit_official")
    del tensors["blocks.1.mlp.fc2.bias"]
    tensors["blocks.2.mlp.fc2.bias"] = np.zeros(32, np.float32)
    path = tmp_path / "dit.safetensors"
    safetensors.numpy.save_file(tensors, str(path))
    with pytest.raises(InputError) as info:
        load_weights(path, _small_dit())
    msg = str(info.value)
    assert "missing blocks.1.mlp.fc2.bias" in msg and "unexpected blocks.2.mlp.fc2.bias" in msg
    assert "\n" not in msg
    # The wrong number of classes: the embedding table's shape is named.
    safetensors.numpy.save_file(_tensors(ref, "dit_official"), str(path))
    with pytest.raises(InputError, match=r"y_embedder.embedding_table.weight \(11, 32\)"):
        load_weights(path, _small_dit().clone(num_classes=5))


def test_diffusers_dit_with_differing_block_embedders_is_refused(ref, tmp_path):
    tensors = _tensors(ref, "dit_diffusers")
    tensors["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"] += 1
    path = tmp_path / "dit.safetensors"
    safetensors.numpy.save_file(tensors, str(path))
    with pytest.raises(InputError, match="per-block embedders differ"):
        load_weights(path, _small_dit())


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(torch_files.zip_file(
        {}, root=torch_files.Call(torch_files.Global("os", "system"), ("true",))))
    with pytest.raises(InputError, match="os.system"):
        load_weights(path, _small_dit())
