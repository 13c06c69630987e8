"""Precision/recall and density/coverage against a float64 NumPy version of the papers' formulas."""

import jax
import numpy as np
import pytest

from jaxgen.errors import InputError
from jaxgen.metrics import density_coverage, prdc, precision_recall
from jaxgen.parallel import make_mesh


def _dist(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def _nnd(a, k):
    """Distance from each row to its k-th nearest other row (Kynkäänniemi et al., eq. 1)."""
    d = _dist(a, a)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, k - 1]


def reference(real, fake, k_pr=3, k_dc=5):
    """Kynkäänniemi et al. 2019 eq. 1-3, Naeem et al. 2020 eq. 4-5, with strict balls."""
    d = _dist(real, fake)  # [N, M]
    r_pr, f_pr, r_dc = _nnd(real, k_pr), _nnd(fake, k_pr), _nnd(real, k_dc)
    return {
        "precision": (d < r_pr[:, None]).any(0).mean(),
        "recall": (d < f_pr[None, :]).any(1).mean(),
        "density": (d < r_dc[:, None]).sum() / (k_dc * fake.shape[0]),
        "coverage": (d.min(1) < r_dc).mean(),
    }


def grid_sets(seed=0, n=300, m=250, d=16):
    """Integer features in [0, 4): every distance is exact in float32, and ties abound."""
    rng = np.random.default_rng(seed)
    real = rng.integers(0, 4, (n, d)).astype(np.float32)
    fake = (rng.integers(0, 4, (m, d)) + (rng.random((m, 1)) < 0.3)).astype(np.float32)
    return real, fake


@pytest.mark.parametrize("k_pr,k_dc", [(3, 5), (1, 2), (7, 3)])
def test_exact_on_integer_grid(k_pr, k_dc):
    # Integer features stay on a coarse grid after centring (see prdc's docstring), so
    # every float32 d^2 is exact and the counts must equal the float64 ones, ties included.
    real, fake = grid_sets()
    assert prdc(real, fake, k_pr=k_pr, k_dc=k_dc, block_size=64) == reference(
        real, fake, k_pr, k_dc
    )


def test_continuous_features_match_float64_within_rounding_bound():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(400, 64)).astype(np.float32)
    fake = (1.2 * rng.normal(size=(350, 64)) + 0.2).astype(np.float32)
    ref = reference(real, fake)
    got = prdc(real, fake, block_size=96)
    # prdc's docstring: a comparison can flip only for pairs whose exact d^2 is within
    # 2 Delta of a radius^2, Delta = 4 gamma_{D+2} max|x|^2 on the centred features.
    both = np.concatenate([real, fake]).astype(np.float64)
    u = 2.0**-24
    delta = 4 * (66 * u / (1 - 66 * u)) * ((both - both.mean(0)) ** 2).sum(1).max()
    d2 = _dist(real, fake) ** 2
    near = lambda r: np.abs(d2 - r**2) < 2 * delta
    near_real = near(_nnd(real, 3)[:, None]) | near(_nnd(real, 5)[:, None])
    near_fake = near(_nnd(fake, 3)[None, :])
    n_fake_flip = (near_real.any(0)).sum()
    n_real_flip = (near_real | near_fake).any(1).sum()
    tol = {
        "precision": n_fake_flip / 350,
        "recall": n_real_flip / 400,
        "density": near_real.sum() / (5 * 350),
        "coverage": n_real_flip / 400,
    }
    for key in ref:
        assert abs(got[key] - ref[key]) <= tol[key], (key, got[key], ref[key], tol[key])


def test_identical_sets():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 32)).astype(np.float32)
    # Each point is in its own ball, and with no ties in exactly k balls (its own and
    # those of the k - 1 points of which it is a nearer neighbour than the k-th).
    assert prdc(x, x) == {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}


def test_disjoint_far_sets():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(120, 32)).astype(np.float32)
    fake = rng.normal(size=(90, 32)).astype(np.float32) + 100.0
    assert prdc(real, fake) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_independent_of_block_size_and_device_count():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(301, 48)).astype(np.float32)
    fake = (rng.normal(size=(257, 48)) * 0.9).astype(np.float32)
    one = make_mesh(jax.devices()[:1])
    eight = make_mesh(jax.devices()[:8])
    results = [
        prdc(real, fake, block_size=b, mesh=m)
        for b, m in [(32, one), (96, one), (2048, one), (8, eight), (2048, eight)]
    ]
    assert all(r == results[0] for r in results), results
    assert results[0] == reference(real, fake)


def test_wrappers_agree_with_prdc():
    real, fake = grid_sets(seed=5, n=150, m=140)
    both = prdc(real, fake, k_pr=4, k_dc=6)
    assert precision_recall(real, fake, k=4) == (both["precision"], both["recall"])
    assert density_coverage(real, fake, k=6) == (both["density"], both["coverage"])
    assert set(prdc(real, fake, k_dc=None)) == {"precision", "recall"}


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda r, f: prdc(r, f[:, :5]), "different feature dimensions"),
        (
            lambda r, f: precision_recall(r, f[:3], k=3),
            "k_pr=3 must be >= 1 and smaller than the number of fake",
        ),
        (lambda r, f: density_coverage(r[:5], f, k=5), "k_dc=5 .* real samples \\(5\\)"),
        (lambda r, f: density_coverage(r, f, k=0), "k_dc=0"),
        (lambda r, f: prdc(r, f, k_pr=None, k_dc=None), "both None"),
        (lambda r, f: prdc(r, f, block_size=0), "block_size=0"),
        (lambda r, f: prdc(r, np.full_like(f, np.nan)), "f_fake contains NaN"),
        (lambda r, f: prdc(r[0], f), "f_real must be a non-empty \\[N, D\\]"),
    ],
)
def test_bad_input(call, match):
    real, fake = grid_sets(n=20, m=20)
    with pytest.raises(InputError, match=match):
        call(real, fake)


def test_copied_points_tie_exactly_on_radii():
    # Fake points that copy real ones (memorisation) lie exactly on k-NN radii of real
    # points; the strict ball must exclude them on every mesh and block size, as in float64.
    rng = np.random.default_rng(6)
    real = rng.normal(size=(260, 40)).astype(np.float32)
    fake = np.concatenate([real[::2], rng.normal(size=(100, 40)).astype(np.float32)])
    ref = reference(real, fake)
    for block, devices in [(32, 1), (1024, 1), (64, 8)]:
        mesh = make_mesh(jax.devices()[:devices])
        assert prdc(real, fake, block_size=block, mesh=mesh) == ref
