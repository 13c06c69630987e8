"""DINOv2 and CLIP in Flax: PIL-exact resizes, parity with transformers / torch hub, readers."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from encoder_fixture import random_tensors
from PIL import Image

from jaxgen.encoders import clip, dinov2
from jaxgen.encoders.resize import resize_pil_float, resize_pil_uint8
from jaxgen.encoders.weights import (
    clip_from_tensors,
    dinov2_from_tensors,
    expected_shapes,
    load_clip,
    load_dinov2,
)
from jaxgen.errors import InputError

REF = np.load(Path(__file__).parent / "fixtures" / "encoder_reference.npz")


def _tensors(name: str, seed: int) -> dict[str, np.ndarray]:
    return random_tensors(json.loads(str(REF[f"{name}/shapes"])), seed)


@pytest.mark.parametrize("h,w,oh,ow", [(37, 53, 224, 224), (301, 250, 256, 212),
                                       (29, 31, 17, 13), (900, 600, 224, 149),
                                       (301, 250, 224, 224), (120, 90, 60, 61)])
def test_resize_matches_pil(h, w, oh, ow):
    """uint8: PIL's fixed-point arithmetic reproduced bit for bit (the last two sizes take
    Pillow 13's vertical-first order). Float (mode "F"): PIL sums in double, we in float32:
    within 2 float32 ulps of 255 (6.1e-5)."""
    x = np.random.default_rng(h * w).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    ref = np.stack([np.asarray(Image.fromarray(im).resize((ow, oh), Image.BICUBIC)) for im in x])
    np.testing.assert_array_equal(np.asarray(resize_pil_uint8(jnp.asarray(x), (oh, ow))), ref)
    xf = x.astype(np.float32)
    ref_f = np.stack([np.stack([np.asarray(Image.fromarray(im[..., c], mode="F")
                                           .resize((ow, oh), Image.BICUBIC)) for c in range(3)], -1)
                      for im in xf])
    np.testing.assert_allclose(np.asarray(resize_pil_float(jnp.asarray(xf), (oh, ow))), ref_f,
                               rtol=0, atol=6.2e-5)


def _relative_error(got, ref) -> float:
    return float(np.abs(np.asarray(got) - ref).max() / np.abs(ref).max())


# 1e-5 of the largest output: float32 rounding through two blocks and the resamplers; the
# measured errors are 2e-7 (CLS) to 1.1e-6 (patch tokens).
TOL = 1e-5
HF_DINOV2 = [("dinov2", 1, "gelu", 0), ("dinov2_swiglu", 2, "swiglu", 0),
             ("dinov2_reg", 3, "gelu", 4)]


@pytest.mark.parametrize("name,seed,mlp,registers", HF_DINOV2)
def test_dinov2_matches_transformers(name, seed, mlp, registers):
    """transformers' Dinov2(WithRegisters)Model + BitImageProcessor (PIL) on uint8 images of odd
    sizes; the tensors go through the reader under transformers 5's names."""
    module = dinov2.DINOv2(64, 2, 4, mlp, registers, pos_offset=0.0, pos_antialias=registers > 0)
    module, params = dinov2_from_tensors(_tensors(name, seed), name, module)
    fn = jax.jit(lambda p, x: module.apply({"params": p}, dinov2.preprocess_hf(x)))
    for key in ("small", "tall"):
        out = fn(params, REF[f"images/{key}"])
        assert out["patch"].shape == (2, 256, 64)
        for k in ("cls", "patch"):
            assert _relative_error(out[k], REF[f"{name}/{key}/{k}"]) < TOL, (key, k)


@pytest.mark.parametrize("name,seed,mlp,registers", [("hub", 6, "gelu", 0),
                                                     ("hub_reg_swiglu", 7, "swiglu", 4)])
def test_dinov2_matches_torch_hub(name, seed, mlp, registers):
    """facebookresearch/dinov2's own code (fused qkv; position grid resampled with offset 0.1, or
    antialiased with registers) on FD-DINOv2's input (EDM2 resize_mode="pil" = dgm-eval)."""
    module = dinov2.DINOv2(64, 2, 4, mlp, registers, pos_offset=0.0 if registers else 0.1,
                           pos_antialias=registers > 0)
    module, params = dinov2_from_tensors(_tensors(name, seed), name, module)
    fn = jax.jit(lambda p, x: module.apply({"params": p}, dinov2.preprocess_dgm_eval(x)))
    for key in ("small", "tall"):
        out = fn(params, REF[f"images/{key}"])
        for k in ("cls", "patch"):
            assert _relative_error(out[k], REF[f"{name}/{key}/{k}"]) < TOL, (key, k)


@pytest.mark.parametrize("name,seed,patch,size", [("clip_b32", 4, 32, 224),
                                                  ("clip_336", 5, 14, 336)])
def test_clip_matches_transformers(name, seed, patch, size):
    """CLIPVisionModelWithProjection (quick-GELU) + CLIPImageProcessor (PIL) on odd-sized uint8."""
    module = clip.CLIPVision(64, 2, 4, patch, size, 32, mlp_hidden=256)
    module, params = clip_from_tensors(_tensors(name, seed), name, module)
    fn = jax.jit(lambda p, x: module.apply({"params": p}, clip.preprocess_hf(x, size)))
    for key in ("small", "tall"):
        out = fn(params, REF[f"images/{key}"])
        assert _relative_error(out["projected"], REF[f"{name}/{key}/projected"]) < TOL, key
        np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=-1), 1.0, rtol=1e-6)


def test_clip_matches_openai_state_dict(tmp_path):
    """OpenAI's clip/model.py VisionTransformer (fused in_proj, proj as [width, embed]), its
    tensors named as in CLIP's state dict and read back from a torch zip file (no torch); the
    text tower's tensors are ignored."""
    from torch_files import zip_file

    from jaxgen.encoders.weights import read_tensors

    tensors = _tensors("openai_b32", 8)
    tensors["logit_scale"] = np.ones((), np.float32)
    tensors["transformer.resblocks.0.ln_1.weight"] = np.ones(16, np.float32)
    path = tmp_path / "ViT-tiny.pt"
    path.write_bytes(zip_file(tensors))
    module = clip.CLIPVision(64, 2, 4, 32, 224, 32, mlp_hidden=256)
    module, params = clip_from_tensors(read_tensors(path), str(path), module)
    fn = jax.jit(lambda p, x: module.apply({"params": p}, clip.preprocess_hf(x, 224)))
    for key in ("small", "tall"):
        out = fn(params, REF[f"images/{key}"])
        assert _relative_error(out["projected"], REF[f"openai_b32/{key}/projected"]) < TOL, key


@pytest.mark.slow
def test_released_architectures_parameter_counts():
    """Every released architecture has transformers' parameter count (DINOv2 without the unused
    mask token), computed without allocating."""
    counts = json.loads(str(REF["param_counts"]))
    for arch in dinov2.ARCHS:
        shapes = expected_shapes(dinov2.model(arch), 224)
        assert sum(int(np.prod(s)) for s in shapes.values()) == counts[f"dinov2_{arch}"], arch
    for arch, a in clip.ARCHS.items():
        shapes = expected_shapes(clip.model(arch), a.image_size)
        assert sum(int(np.prod(s)) for s in shapes.values()) == counts[f"clip_{arch}"], arch


def test_reader_names_bad_tensors():
    t = _tensors("dinov2", 1)
    module = dinov2.DINOv2(64, 2, 4, pos_offset=0.0)
    bad = dict(t, **{"layernorm.weight": np.zeros(65, np.float32)})
    with pytest.raises(InputError, match=r"'layernorm.weight' has shape \(65,\)"):
        dinov2_from_tensors(bad, "f.safetensors", module)
    missing = {k: v for k, v in t.items() if k != "layernorm.bias"}
    with pytest.raises(InputError, match="'layernorm.bias'.*missing"):
        dinov2_from_tensors(missing, "f.safetensors", module)
    with pytest.raises(InputError, match=r"unexpected tensors \['extra'\]"):
        dinov2_from_tensors(dict(t, extra=np.zeros(1, np.float32)), "f.safetensors", module)
    with pytest.raises(InputError, match="none of the released DINOv2 models"):
        dinov2_from_tensors(t, "f.safetensors")  # width 64 is not a released model
    with pytest.raises(InputError, match="neither OpenAI nor transformers CLIP"):
        clip_from_tensors(t, "f.safetensors")


def test_load_missing_says_what_to_get(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXGEN_CACHE", str(tmp_path))
    monkeypatch.delenv("JAXGEN_DINOV2_WEIGHTS", raising=False)
    monkeypatch.delenv("JAXGEN_CLIP_WEIGHTS", raising=False)
    with pytest.raises(InputError, match=r"dinov2_vitl14_pretrain\.pth to .*JAXGEN_DINOV2"):
        load_dinov2()
    with pytest.raises(InputError, match=r"ViT-L-14-336px\.pt.*facebook|ViT-L-14-336px\.pt"):
        load_clip()


def test_load_converts_once_and_caches(tmp_path, monkeypatch):
    """A released-size (ViT-S/14) safetensors file: read, converted, cached, reloaded from cache."""
    from safetensors.numpy import save_file

    monkeypatch.setenv("JAXGEN_CACHE", str(tmp_path / "cache"))
    shapes = json.loads(str(REF["dinov2/shapes"]))
    rng = np.random.default_rng(0)
    width, depth = 384, 12
    tensors = {}
    for name, shape in shapes.items():
        if name.startswith("encoder.layer."):
            if not name.startswith("encoder.layer.0."):
                continue
            for i in range(depth):
                shape2 = [width * s // 64 if s in (64, 256) else s for s in shape]
                tensors[name.replace("layer.0.", f"layer.{i}.")] = rng.standard_normal(
                    shape2, np.float32)
        else:
            tensors[name] = rng.standard_normal(
                [width if s == 64 else s for s in shape], np.float32)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    module, variables, ident = load_dinov2(tmp_path, "vits14")
    assert module.width == 384 and module.pos_offset == 0.1 and ident.startswith("dinov2:vits14:")
    assert len(list((tmp_path / "cache" / "encoders").glob("dinov2-*.npz"))) == 1
    path.write_bytes(path.read_bytes())  # same bytes: the cache is used
    _, again, ident2 = load_dinov2(path, "vits14")
    assert ident2 == ident
    jax.tree.map(np.testing.assert_array_equal, variables, again)
    with pytest.raises(InputError, match="not the requested vitb14"):
        load_dinov2(path, "vitb14")


def test_repa_input_is_normalised_then_resampled():
    """REPA's order: normalise, then torch bicubic (weights summing to 1 per output pixel): a
    flat image stays flat at its normalised value; a horizontal ramp stays a ramp in the rows."""
    x = np.full((1, 256, 256, 3), 100, np.uint8)
    y = np.asarray(dinov2.preprocess_repa(jnp.asarray(x)))
    want = (100 / 255 - np.array(dinov2.IMAGENET_MEAN)) / np.array(dinov2.IMAGENET_STD)
    assert y.shape == (1, 224, 224, 3)
    np.testing.assert_allclose(y, np.broadcast_to(want, y.shape), atol=1e-6)
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, None, :, None], (1, 256, 256, 3))
    r = np.asarray(dinov2.preprocess_repa(jnp.asarray(ramp)))
    np.testing.assert_allclose(r[0, 0], r[0, 223], atol=1e-6)  # every row the same
