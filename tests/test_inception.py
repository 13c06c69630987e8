"""The FID Inception: TF1 resize, parity with PyTorch on the same weights, invariances."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.metrics import GaussianStats, frechet_distance
from jaxgen.metrics.features import FeatureExtractor
from jaxgen.metrics.inception import resize_legacy_bilinear
from jaxgen.parallel import make_mesh

FIXTURE = Path(__file__).parent / "fixtures" / "inception_reference.npz"
GROUPS = ("gray28", "rgb64", "rgb37x53")


def tf_resize_bilinear_legacy(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """NumPy transcription of TF1's ResizeBilinear kernel (align_corners=False,
    half_pixel_centers=False): scale = in / out in float32, upper index
    ``min(ceil(in), size - 1)``, top/bottom lerp along x, then along y."""
    h, w = img.shape[:2]
    x = img.astype(np.float32)
    sy, sx = np.float32(h) / np.float32(out_h), np.float32(w) / np.float32(out_w)
    out = np.empty((out_h, out_w, img.shape[2]), np.float32)
    for i in range(out_h):
        in_y = np.float32(i) * sy
        top_i, bot_i = int(np.floor(in_y)), min(int(np.ceil(in_y)), h - 1)
        y_lerp = in_y - np.float32(np.floor(in_y))
        in_x = np.arange(out_w, dtype=np.float32) * sx
        left, right = np.floor(in_x).astype(int), np.minimum(np.ceil(in_x).astype(int), w - 1)
        x_lerp = (in_x - np.floor(in_x))[:, None]
        top = x[top_i, left] + (x[top_i, right] - x[top_i, left]) * x_lerp
        bottom = x[bot_i, left] + (x[bot_i, right] - x[bot_i, left]) * x_lerp
        out[i] = top + (bottom - top) * y_lerp
    return out


@pytest.mark.parametrize("shape", [(28, 28, 1), (37, 53, 3), (512, 401, 3), (299, 299, 3)])
def test_resize_matches_tf_legacy_kernel(shape):
    img = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    ours = np.asarray(resize_legacy_bilinear(jnp.asarray(img[None], jnp.float32), (299, 299)))[0]
    ref = tf_resize_bilinear_legacy(img, 299, 299)
    # Same float32 operations in the same order; XLA may contract a + (b - a) * w
    # into one FMA, a difference of at most a few ulp of 255 (ulp = 1.5e-5).
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def extractor(inception):
    return FeatureExtractor(*inception, batch_size=16)


@pytest.fixture(scope="module")
def ours(extractor, reference):
    return {g: extractor(reference[f"{g}_images"]) for g in GROUPS}


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("key", ["pool3", "spatial"])
def test_features_match_pytorch_on_same_weights(ours, reference, group, key):
    ref, got = reference[f"{group}_{key}"], ours[group][key]
    assert got.shape == ref.shape and got.dtype == np.float32
    # Two float32 implementations of ~95 layers (different conv algorithms, BN
    # folded here): a conv sums up to ~7e3 products, rounding ~sqrt(7e3) eps32 ~ 5e-6
    # of its inputs' scale. Measured (x86 CPU, 2026-12): pool3 2.3e-6 .. 4.0e-6 and
    # spatial 4.3e-6 .. 7.8e-6 of the largest feature; the bounds leave 25 % for
    # another CPU's conv blocking. (README's "4e-6" holds for pool3 to one digit only.)
    bound = {"pool3": 5e-6, "spatial": 1e-5}[key]
    assert np.abs(got - ref).max() <= bound * np.abs(ref).max()


def _halves(source):
    a = np.concatenate([source("gray28")[:12], source("rgb64")[:12]]).astype(np.float64)
    b = np.concatenate([source("gray28")[12:], source("rgb64")[12:]]).astype(np.float64)
    return a, b


def test_fid_matches_pytorch_features(ours, reference):
    def fid(source):
        a, b = _halves(source)
        return frechet_distance(GaussianStats.from_features(a), GaussianStats.from_features(b))

    ref = fid(lambda g: reference[f"{g}_pool3"])
    got = fid(lambda g: ours[g]["pool3"])
    # Golden value, independently: with S1 = A^T A and S2 = B^T B (A, B the centred
    # features / sqrt(N - 1)), tr sqrt(S1 S2) is the sum of the singular values of
    # A B^T (24 x 24), exact in float64 where scipy's sqrtm of the rank-23 2048 x 2048
    # product is off by 3e-4. Float64 rounding of trace terms ~1e3: ~1e-12 relative.
    a, b = _halves(lambda g: reference[f"{g}_pool3"])
    ca, cb = (a - a.mean(0)) / np.sqrt(23), (b - b.mean(0)) / np.sqrt(23)
    golden = (
        np.sum((a.mean(0) - b.mean(0)) ** 2) + np.sum(ca**2) + np.sum(cb**2)
        - 2 * np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    )
    assert golden == pytest.approx(122.4723061452753, rel=1e-10)
    assert ref == pytest.approx(golden, rel=1e-10)
    # sqrt(FID) is the W2 distance of the two Gaussians, a metric; the Gaussian fitted
    # to the pairs (ours_i, ref_i) couples ours' and ref's, so W2(ours, ref)^2 <=
    # N / (N - 1) mean_i |ours_i - ref_i|^2 for each half, and by the triangle
    # inequality |sqrt(got) - sqrt(ref)| <= the sum of the two (here ~1.4e-4).
    w2 = sum(
        np.sqrt(24 / 23 * np.mean(np.sum((x - y) ** 2, axis=1)))
        for x, y in zip(_halves(lambda g: ours[g]["pool3"]),
                        _halves(lambda g: reference[f"{g}_pool3"]), strict=True)
    )
    assert abs(np.sqrt(got) - np.sqrt(ref)) <= w2


def test_grayscale_is_repeated_to_rgb(extractor, reference, ours):
    gray = reference["gray28_images"][:8]
    rgb = extractor(np.repeat(gray, 3, axis=-1))
    np.testing.assert_allclose(rgb["pool3"], ours["gray28"]["pool3"][:8], rtol=1e-6, atol=1e-7)


def test_features_do_not_depend_on_batch_size_or_device_count(inception, reference, ours):
    images = reference["rgb37x53_images"]
    one_device = FeatureExtractor(*inception, batch_size=3, mesh=make_mesh(jax.devices()[:1]))
    got = one_device(images)  # batches of 3, 3, 2 (the last padded, nothing dropped)
    assert got["pool3"].shape == (8, 2048)
    # 8 devices x 2 images vs 1 device x 3: only the convolutions' blocking
    # differs, a float32 reassociation of ~1e-6 relative.
    np.testing.assert_allclose(got["pool3"], ours["rgb37x53"]["pool3"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["spatial"], ours["rgb37x53"]["spatial"], rtol=1e-5, atol=1e-5)
