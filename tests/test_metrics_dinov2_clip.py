"""CMMD, clean-FID's resize and the DINOv2 / CLIP feature passes."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from encoder_fixture import random_tensors
from PIL import Image

from jaxgen.encoders import clip, dinov2
from jaxgen.encoders.weights import clip_from_tensors, dinov2_from_tensors
from jaxgen.errors import InputError
from jaxgen.metrics.cmmd import cmmd
from jaxgen.metrics.encoder_features import clip_forward, dinov2_forward, preprocess_clean
from jaxgen.metrics.features import FeatureExtractor

REF = np.load(Path(__file__).parent / "fixtures" / "encoder_reference.npz")


def cmmd_numpy(x, y, sigma=10.0, scale=1000.0):
    """google-research cmmd/distance.py's ``mmd``, transcribed to float64 NumPy."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x_sq, y_sq = np.diag(x @ x.T), np.diag(y @ y.T)
    gamma = 1 / (2 * sigma**2)
    k_xx = np.mean(np.exp(-gamma * (-2 * x @ x.T + x_sq[:, None] + x_sq[None])))
    k_xy = np.mean(np.exp(-gamma * (-2 * x @ y.T + x_sq[:, None] + y_sq[None])))
    k_yy = np.mean(np.exp(-gamma * (-2 * y @ y.T + y_sq[:, None] + y_sq[None])))
    return scale * (k_xx + k_yy - 2 * k_xy)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_cmmd_equals_float64_transcription():
    """Unit-norm embeddings as CMMD's; blocks smaller than, equal to and larger than N. Both
    sides are float64 sums of the same terms in another order: agreement to 1e-10 relative."""
    rng = np.random.default_rng(0)
    x = _unit(rng.standard_normal((301, 32)))
    y = _unit(rng.standard_normal((257, 32)) + 0.3)
    ref = cmmd_numpy(x, y)
    assert ref > 0.1  # a real difference, not rounding noise
    for block in (37, 257, 4096):
        assert cmmd(x, y, block_size=block) == pytest.approx(ref, rel=1e-10)
    assert cmmd(x, x, block_size=50) == pytest.approx(0.0, abs=1e-10)
    # sigma and scale: MMD^2 is linear in the scale; a wider kernel sees the shift less
    assert cmmd(x, y, scale=1.0) == pytest.approx(ref / 1000, rel=1e-10)
    assert cmmd(x, y, sigma=1.0) == pytest.approx(cmmd_numpy(x, y, sigma=1.0), rel=1e-10)


def test_cmmd_closed_form_two_points():
    """One point per side at distance d: scale * (1 + 1 - 2 exp(-d^2 / (2 sigma^2)))."""
    x, y = np.zeros((1, 3)), np.array([[3.0, 4.0, 0.0]])
    assert cmmd(x, y) == pytest.approx(1000 * (2 - 2 * np.exp(-25 / 200)), rel=1e-12)


def test_cmmd_bad_input():
    with pytest.raises(InputError, match="different embedding dimensions"):
        cmmd(np.zeros((4, 3)), np.zeros((4, 5)))
    with pytest.raises(InputError, match=r"\[N, D\]"):
        cmmd(np.zeros(4), np.zeros((4, 5)))
    with pytest.raises(InputError, match="block_size"):
        cmmd(np.zeros((4, 3)), np.zeros((4, 3)), block_size=0)


def clean_fid_resize(image: np.ndarray) -> np.ndarray:
    """clean-fid's ``make_resizer("PIL", False, "bicubic", (299, 299))``, transcribed."""
    chans = [np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F")
                        .resize((299, 299), resample=Image.BICUBIC)).clip(0, 255)
             for c in range(3)]
    return np.stack(chans, -1)


@pytest.mark.parametrize("shape", [(28, 28, 1), (37, 53, 3), (320, 300, 3)])
def test_clean_resize_matches_clean_fid(shape):
    """Within 2 float32 ulps of 255 per pixel (PIL sums in double, we in float32: 6.1e-5 / 128 =
    4.8e-7 after the normalisation) plus the normalisation's own rounding: atol 1e-6. Grayscale
    is repeated to RGB first, as clean-fid's ``convert("RGB")`` does."""
    x = np.random.default_rng(1).integers(0, 256, (2, *shape), dtype=np.uint8)
    rgb = np.repeat(x, 3, axis=-1) if shape[-1] == 1 else x
    ref = (np.stack([clean_fid_resize(im) for im in rgb]) - 128) / 128
    got = np.asarray(preprocess_clean(jnp.asarray(x)))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_feature_passes_batch_as_one_call():
    """DINOv2 and CLIP forwards through FeatureExtractor (padding, 8 devices) equal one direct
    call, and are the torch hub / transformers reference features."""
    shapes = json.loads(str(REF["hub/shapes"]))
    module = dinov2.DINOv2(64, 2, 4, pos_offset=0.1)
    module, params = dinov2_from_tensors(random_tensors(shapes, 6), "hub", module)
    images = REF["images/tall"]
    ext = FeatureExtractor(module, {"params": params}, batch_size=8, forward=dinov2_forward)
    f = ext(np.concatenate([images, images, images[:1]]))["dinov2"]
    assert f.shape == (5, 64)
    ref = REF["hub/tall/cls"]
    np.testing.assert_allclose(f[:2], ref, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_array_equal(f[2:4], f[:2])

    shapes = json.loads(str(REF["clip_336/shapes"]))
    module = clip.CLIPVision(64, 2, 4, 14, 336, 32, mlp_hidden=256)
    module, params = clip_from_tensors(random_tensors(shapes, 5), "clip", module)
    ext = FeatureExtractor(module, {"params": params}, batch_size=8, forward=clip_forward)
    e = ext(images)["clip"]
    direct = jax.jit(lambda p, x: clip_forward(module, {"params": p}, x))(params, images)["clip"]
    np.testing.assert_allclose(e, direct, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-6)


@pytest.mark.slow
def test_evaluate_encoders_one_pass_pins_values():
    """FD-DINOv2, CMMD and KID/PR on DINOv2 features from one pass over each side equal the
    metrics of features computed directly (tiny random DINOv2 / CLIP standing in for the
    released weights). The features differ by float32 rounding (~1e-7) between the sharded
    batches and one call; FD's covariances here have rank 11 < 64, whose square root amplifies
    that to ~2e-6 relative: FD to 1e-4. CMMD is 1000 x a difference of kernel means near 1,
    each moved ~1e-11 by that rounding: to 1e-7 absolute (its value here is 6e-3)."""
    from jaxgen.metrics.encoder_eval import evaluate_encoders
    from jaxgen.metrics.fid import frechet_distance
    from jaxgen.metrics.stats import GaussianStats

    dino = dinov2.DINOv2(64, 2, 4, pos_offset=0.1)
    dino, dp = dinov2_from_tensors(random_tensors(json.loads(str(REF["hub/shapes"])), 6), "h",
                                   dino)
    tower = clip.CLIPVision(64, 2, 4, 32, 224, 32, mlp_hidden=256)
    tower, cp = clip_from_tensors(random_tensors(json.loads(str(REF["clip_b32/shapes"])), 4), "c",
                                  tower)
    rng = np.random.default_rng(3)
    real = rng.integers(0, 256, (12, 40, 36, 3), dtype=np.uint8)
    fake = np.clip(real.astype(int) + rng.integers(-40, 40, real.shape), 0, 255).astype(np.uint8)
    out = evaluate_encoders(real, fake, ["fd_dinov2", "cmmd", "kid", "pr"], features="dinov2",
                            dinov2=(dino, {"params": dp}, "dinov2:test"),
                            clip=(tower, {"params": cp}),
                            batch_size=8, kid_subsets=3, kid_subset_size=6, progress=False)
    f = {k: jax.jit(lambda x: dinov2_forward(dino, {"params": dp}, x))(v)["dinov2"]
         for k, v in (("real", real), ("fake", fake))}
    e = {k: jax.jit(lambda x: clip_forward(tower, {"params": cp}, x))(v)["clip"]
         for k, v in (("real", real), ("fake", fake))}
    fd = frechet_distance(GaussianStats.from_features(np.asarray(f["real"])),
                          GaussianStats.from_features(np.asarray(f["fake"])))
    assert out["fd_dinov2"] == pytest.approx(fd, rel=1e-4)
    assert out["cmmd"] == pytest.approx(cmmd_numpy(e["real"], e["fake"]), abs=1e-7)
    assert {"kid_mean", "kid_std", "precision", "recall"} <= set(out)
    assert out["features"] == "dinov2" and out["dinov2_weights"] == "dinov2:test"
    assert (out["n_real"], out["n_fake"]) == (12, 12)
    with pytest.raises(InputError, match="cannot be computed here"):
        evaluate_encoders(real, fake, ["kid"], dinov2=(dino, {"params": dp}))
