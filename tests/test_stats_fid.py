"""Streaming float64 statistics, the Fréchet distance, and statistics files."""

import numpy as np
import pytest
import scipy.linalg

from jaxgen.errors import InputError
from jaxgen.metrics import GaussianStats, MomentAccumulator, frechet_distance, save_stats


def _stats_in_batches(x: np.ndarray, batch: int) -> GaussianStats:
    acc = MomentAccumulator()
    for i in range(0, len(x), batch):
        acc.update(x[i : i + batch])
    return acc.finalize()


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_streaming_matches_two_pass_float64_for_any_batching(batch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(301, 16)).astype(np.float32) * rng.uniform(0.1, 3, 16) + 2.0
    s = _stats_in_batches(x, batch)
    ref_mu = x.astype(np.float64).mean(0)
    ref_sigma = np.cov(x.astype(np.float64), rowvar=False)
    assert s.n == 301
    # Chan's update is backward-stable: errors of order N * eps64 ~ 1e-13 relative.
    np.testing.assert_allclose(s.mu, ref_mu, rtol=1e-12)
    np.testing.assert_allclose(s.sigma, ref_sigma, rtol=1e-10, atol=1e-12)


def test_no_cancellation_when_mean_dwarfs_spread():
    # mean 1e6, std 1: the one-pass "sum x^2 - n mu^2" formula loses all
    # ~16 digits here (1e12 - 1e12); pairwise centring keeps them.
    rng = np.random.default_rng(1)
    x = 1e6 + rng.normal(size=(1000, 4))
    s = _stats_in_batches(x, 33)
    ref = np.cov(x - x.mean(0), rowvar=False)
    np.testing.assert_allclose(s.sigma, ref, rtol=1e-8)


def test_merge_equals_single_accumulator():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 5))
    a, b = MomentAccumulator(), MomentAccumulator()
    a.update(x[:37])
    b.update(x[37:])
    a.merge(b)
    whole = GaussianStats.from_features(x)
    got = a.finalize()
    np.testing.assert_allclose(got.mu, whole.mu, rtol=1e-13)
    np.testing.assert_allclose(got.sigma, whole.sigma, rtol=1e-12, atol=1e-14)


def test_accumulator_rejects_bad_input():
    acc = MomentAccumulator()
    with pytest.raises(InputError, match=r"\[N, D\]"):
        acc.update(np.zeros(3))
    acc.update(np.zeros((2, 3)))
    with pytest.raises(InputError, match="dimension changed from 3 to 4"):
        acc.update(np.zeros((2, 4)))
    with pytest.raises(InputError, match="NaN"):
        acc.update(np.full((2, 3), np.nan))
    one = MomentAccumulator()
    one.update(np.zeros((1, 3)))
    with pytest.raises(InputError, match="at least 2 samples, got 1"):
        one.finalize()


def _fid_sqrtm(a: GaussianStats, b: GaussianStats) -> float:
    """pytorch-fid's formula: tr sqrtm(S1 S2) with scipy."""
    covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma).real
    d = a.mu - b.mu
    return float(d @ d + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def test_fid_matches_scipy_sqrtm_full_rank():
    rng = np.random.default_rng(3)
    a = GaussianStats.from_features(rng.normal(size=(2000, 64)))
    mix = rng.normal(size=(64, 64)) / 8
    b = GaussianStats.from_features(rng.normal(size=(2000, 64)) @ mix + 0.3)
    # Both are float64 evaluations of the same quantity on well-conditioned
    # matrices (condition ~1e2): agreement to ~1e-10 relative is expected.
    assert frechet_distance(a, b) == pytest.approx(_fid_sqrtm(a, b), rel=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert abs(frechet_distance(a, a)) < 1e-9 * np.trace(a.sigma)


def test_fid_rank_deficient_is_finite_and_exact():
    # N = 40 samples in D = 128 dims: both covariances have rank 39.
    rng = np.random.default_rng(4)
    xa, xb = rng.normal(size=(40, 128)), rng.normal(size=(40, 128)) * 1.5 + 0.1
    a, b = GaussianStats.from_features(xa), GaussianStats.from_features(xb)
    got = frechet_distance(a, b)
    assert np.isfinite(got)
    # Independent exact route: with S_a = A A^T (A = centred xa^T / sqrt(N-1)),
    # the non-zero eigenvalues of S_a S_b are those of the small PSD A^T S_b A.
    ac = (xa - xa.mean(0)).T / np.sqrt(39)
    small = ac.T @ b.sigma @ ac
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0, None)).sum()
    d = a.mu - b.mu
    exact = d @ d + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_sqrt
    assert got == pytest.approx(exact, rel=1e-9)
    # scipy's sqrtm on the singular product: close, but only to its own accuracy
    assert got == pytest.approx(_fid_sqrtm(a, b), rel=1e-4)


def test_fid_with_zero_covariance():
    # every sample identical: S_a = 0, so FID = |mu_a - mu_b|^2 + tr(S_b) exactly
    a = GaussianStats.from_features(np.ones((5, 8)))
    b = GaussianStats.from_features(np.random.default_rng(6).normal(size=(50, 8)))
    want = np.sum((a.mu - b.mu) ** 2) + np.trace(b.sigma)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-12)
    assert frechet_distance(b, a) == pytest.approx(want, rel=1e-12)


def test_fid_dimension_mismatch():
    a = GaussianStats(np.zeros(3), np.eye(3))
    b = GaussianStats(np.zeros(4), np.eye(4))
    with pytest.raises(InputError, match="different dimensions"):
        frechet_distance(a, b)


def test_stats_files_roundtrip_pytorch_fid_and_adm(tmp_path):
    rng = np.random.default_rng(5)
    pool = GaussianStats.from_features(rng.normal(size=(10, 6)))
    spatial = GaussianStats.from_features(rng.normal(size=(10, 4)))
    path = tmp_path / "ref.npz"
    save_stats(path, pool, spatial)
    with np.load(path) as f:  # what pytorch-fid and the ADM evaluator read
        assert {"mu", "sigma", "mu_s", "sigma_s"} <= set(f.files)
        np.testing.assert_array_equal(f["sigma"], pool.sigma)
    back = GaussianStats.load(path)
    np.testing.assert_array_equal(back.mu, pool.mu)
    assert back.n == 10
    np.testing.assert_array_equal(GaussianStats.load(path, spatial=True).sigma, spatial.sigma)
    # a pytorch-fid file (mu, sigma only) and an ADM reference batch (with arr_0)
    np.savez(tmp_path / "pf.npz", mu=pool.mu, sigma=pool.sigma)
    assert GaussianStats.load(tmp_path / "pf.npz").n is None
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=pool.mu,
             sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    np.testing.assert_array_equal(GaussianStats.load(tmp_path / "adm.npz", spatial=True).mu,
                                  spatial.mu)


def test_stats_file_errors(tmp_path):
    np.savez(tmp_path / "pf.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(InputError, match="lacks mu_s, sigma_s"):
        GaussianStats.load(tmp_path / "pf.npz", spatial=True)
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(InputError, match="bad.npz: not a readable .npz"):
        GaussianStats.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(InputError, match="shape.npz"):
        GaussianStats.load(tmp_path / "shape.npz")
    with pytest.raises(InputError, match="no such file"):
        GaussianStats.load(tmp_path / "missing.npz")


def test_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "ref.npz"
    good = GaussianStats(np.zeros(2), np.eye(2), 5)
    save_stats(path, good)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError):
        save_stats(path, GaussianStats(np.ones(2), np.eye(2), 5))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]
