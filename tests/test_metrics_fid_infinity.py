"""FID-infinity, IS-infinity and Sobol-normal latents."""

import numpy as np
import pytest
from scipy import linalg
from scipy.special import ndtr, softmax

from jaxgen.errors import InputError
from jaxgen.metrics import (
    GaussianStats,
    fid_infinity,
    frechet_distance,
    is_infinity,
    sobol_normal,
)
from jaxgen.metrics.qmc import SOBOL_MAX_DIM


def reference_fid(a, b):
    """Heusel et al. 2017 eq. 6 with scipy's sqrtm, float64."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)


def reference_line(n, scores):
    """Least squares score = a + b / N by the normal equations; returns (a, b)."""
    design = np.stack([np.ones(len(n)), 1.0 / n], 1)
    return np.linalg.solve(design.T @ design, design.T @ scores)


def test_fid_infinity_matches_reference():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(2000, 8))
    fake = (rng.normal(size=(1200, 8)) * 1.2 + 0.1).astype(np.float32)
    out = fid_infinity(real, fake, num_points=6, min_n=300, seed=5)
    # The reference code's grid, and subsets drawn as documented.
    np.testing.assert_array_equal(out.n, np.linspace(300, 1200, 6).astype(np.int32))
    draw = np.random.RandomState(5)
    f64 = fake.astype(np.float64)
    scores = [reference_fid(real, f64[draw.permutation(1200)[:k]]) for k in out.n]
    # Both are float64 FIDs of 8x8 covariances; sqrtm vs eigh differ by ~1e-12.
    np.testing.assert_allclose(out.scores, scores, rtol=1e-8)
    np.testing.assert_allclose((out.value, out.slope), reference_line(out.n, out.scores))
    # Statistics in place of real features give the same numbers.
    again = fid_infinity(GaussianStats.from_features(real), fake, 6, 300, seed=5)
    np.testing.assert_allclose(again.scores, out.scores, rtol=1e-12)


def test_fid_infinity_equals_the_direct_route_on_hard_cases():
    # A singular real covariance (6 samples in 10 dims: the factor F is 10 x 5) and fake
    # features far from the origin (mean 1e3, spread 1): every FID_N equals the Fréchet
    # distance of the subset's own statistics, whether the subset or its complement is summed.
    rng = np.random.default_rng(7)
    real = rng.normal(size=(6, 10)) + 1e3
    fake = (rng.normal(size=(900, 10)) * 0.7 + 1e3).astype(np.float32)
    out = fid_infinity(real, fake, num_points=5, min_n=100, seed=2)
    draw = np.random.RandomState(2)
    stats = GaussianStats.from_features(real)
    direct = [
        frechet_distance(stats, GaussianStats.from_features(fake[draw.permutation(900)[:k]]))
        for k in out.n
    ]
    # Both are float64 routes through the same pivoted-Cholesky factor with the sums taken
    # in other orders: the means (~1e3) round at ~1e-13, so FID_N (~6) agrees to ~1e-13
    # (measured 2e-14); 1e-11 leaves room for other BLAS summation orders.
    np.testing.assert_allclose(out.scores, direct, rtol=1e-11)


def test_fid_infinity_removes_the_1_over_n_bias():
    # Fake ~ real's exact Gaussian: FID_N is all bias (~ tr/N), FID_inf is ~0.
    rng = np.random.default_rng(1)
    stats = GaussianStats(np.zeros(16), np.eye(16))
    out = fid_infinity(stats, rng.normal(size=(4000, 16)), num_points=8, min_n=500, seed=0)
    assert out.scores.min() > 0.01 and abs(out.value) < 0.2 * out.scores.min()
    assert out.slope > 0


def softmax1(logits):
    return softmax(logits, axis=1)


def test_is_infinity_matches_reference():
    logits = np.random.default_rng(2).normal(size=(900, 20)) * 2
    out = is_infinity(logits, num_points=5, min_n=200, seed=1)
    draw = np.random.RandomState(1)
    scores = []
    for k in out.n:
        p = softmax(logits[draw.permutation(900)[:k]], axis=1)
        scores.append(np.exp((p * np.log(p / p.mean(0))).sum(1).mean()))  # splits = 1
    np.testing.assert_allclose(out.scores, scores, rtol=1e-12)
    np.testing.assert_allclose((out.value, out.slope), reference_line(out.n, out.scores))
    np.testing.assert_array_equal(is_infinity(logits, 5, 200, seed=1).scores, out.scores)
    # With splits, each IS_N is the mean over consecutive chunks of the drawn rows.
    split = is_infinity(logits, num_points=3, min_n=300, seed=4, splits=3)
    draw = np.random.RandomState(4)
    for k, score in zip(split.n, split.scores, strict=True):
        rows = logits[draw.permutation(900)[:k]]
        chunks = [rows[i * k // 3 : (i + 1) * k // 3] for i in range(3)]
        ref = [np.exp((p * np.log(p / p.mean(0))).sum(1).mean()) for p in map(softmax1, chunks)]
        np.testing.assert_allclose(score, np.mean(ref), rtol=1e-12)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda r, f: fid_infinity(r, f, min_n=5000), "f_fake has 400 samples, but the fit needs"),
        (lambda r, f: fid_infinity(r, f[:, :3], min_n=100), "f_fake has dimension 3"),
        (lambda r, f: fid_infinity(r, f, num_points=1, min_n=100), "num_points=1"),
        (lambda r, f: is_infinity(f, min_n=400), "logits_fake has 400 samples"),
        (lambda r, f: is_infinity(f, min_n=10, splits=20), "splits=20"),
    ],
)
def test_infinity_bad_input(call, match):
    rng = np.random.default_rng(3)
    with pytest.raises(InputError, match=match):
        call(rng.normal(size=(500, 4)), rng.normal(size=(400, 4)))


def test_sobol_normal_points():
    z = sobol_normal(256, (2, 3), seed=4)
    assert z.shape == (256, 2, 3) and z.dtype == np.float32
    # Balance: the first 2^m points put exactly one point in each interval [i/2^m, (i+1)/2^m)
    # of every coordinate, so the normal CDF of each coordinate is a stratified sample.
    cells = np.floor(ndtr(z.reshape(256, 6).astype(np.float64)) * 256).astype(int)
    for c in cells.T:
        np.testing.assert_array_equal(np.sort(c), np.arange(256))
    # Point i depends on (seed, i) only: batches with offsets rebuild the whole run.
    parts = [sobol_normal(100, (2, 3), 4, offset=o) for o in (0, 100)]
    np.testing.assert_array_equal(
        np.concatenate([*parts, sobol_normal(56, (2, 3), 4, offset=200)]), z
    )
    assert not np.array_equal(sobol_normal(8, (2, 3), seed=5), z[:8])


def test_sobol_normal_errors():
    with pytest.raises(InputError, match=f"at most {SOBOL_MAX_DIM} dimensions"):
        sobol_normal(2, (256, 256, 3))
    with pytest.raises(InputError, match="n >= 0 and offset >= 0"):
        sobol_normal(2, (4,), offset=-1)
    with pytest.raises(InputError, match="has no elements"):
        sobol_normal(2, (0, 3))
