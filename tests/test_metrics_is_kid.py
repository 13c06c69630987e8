"""Inception Score and KID against float64 NumPy versions written from the papers."""

import jax
import numpy as np
import pytest

from jaxgen.errors import InputError
from jaxgen.metrics import inception_score, kid
from jaxgen.parallel import make_mesh


def reference_is(logits, splits):
    """Salimans et al. 2016: exp(E_x KL(p(y|x) || p(y))) per consecutive chunk."""
    logits = logits.astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n = len(p)
    scores = []
    for i in range(splits):
        c = p[i * n // splits : (i + 1) * n // splits]
        py = c.mean(0)
        scores.append(np.exp(np.mean([np.sum(q * np.log(q / py)) for q in c])))
    return np.mean(scores), np.std(scores)


def test_is_matches_reference_and_torch_fidelity_order():
    logits = np.random.default_rng(0).normal(size=(1003, 50)).astype(np.float32) * 3
    # float64 throughout; differences are reassociation only (~1e-15 relative).
    np.testing.assert_allclose(
        inception_score(logits, 7, seed=None), reference_is(logits, 7), rtol=1e-12
    )
    # torch-fidelity shuffles with RandomState(rng_seed).permutation before splitting.
    shuffled = logits[np.random.RandomState(2020).permutation(1003)]
    np.testing.assert_allclose(
        inception_score(logits, 10, seed=2020), reference_is(shuffled, 10), rtol=1e-12
    )
    assert inception_score(logits, seed=3) == inception_score(logits, seed=3)


def test_is_hand_computable():
    # Uniform predictions: p(y|x) = p(y), KL = 0, IS = 1.
    assert inception_score(np.zeros((40, 10)), 4) == pytest.approx((1.0, 0.0), abs=1e-12)
    # Confident, balanced predictions over C classes in every split: IS = C.
    logits = np.tile(np.eye(8) * 60.0, (10, 1))  # softmax(60 e_i) is one-hot to ~1e-26
    mean, std = inception_score(logits, 10, seed=None)
    assert mean == pytest.approx(8.0, rel=1e-9) and std < 1e-9


def test_is_bad_input():
    with pytest.raises(InputError, match="splits=11 must be between 1 and the number of samples"):
        inception_score(np.zeros((10, 5)), 11)
    with pytest.raises(InputError, match=r"logits must be a numeric array \[N, classes\]"):
        inception_score(np.zeros(10))
    with pytest.raises(InputError, match="NaN or inf"):
        inception_score(np.full((10, 5), np.inf))


def reference_kid(real, fake, subsets, m, seed):
    """Bińkowski et al. 2018: unbiased MMD^2 (Gretton et al. eq. 3), k = (x.y/d + 1)^3."""
    rng = np.random.RandomState(seed)
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3
    out = []
    for _ in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)].astype(np.float64)
        y = fake[rng.choice(len(fake), m, replace=False)].astype(np.float64)
        kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
        off = ~np.eye(m, dtype=bool)
        out.append(kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean())
    return np.asarray(out)


def features(seed, n, d=64, shift=0.0):
    return (np.random.default_rng(seed).random((n, d)) + shift).astype(np.float32)


def test_kid_matches_float64_reference():
    real, fake = features(1, 300), features(2, 250, shift=0.05)
    ref = reference_kid(real, fake, 12, 100, 7)
    mean, std = kid(real, fake, 12, 100, 7)
    # Each kernel entry has relative error <~ 3 gamma_D (float32 dot, cubed) and each float32
    # row sum adds <~ m u; MMD^2 adds four such means, so the error is below
    # 8 (3 gamma_D + m u) times the kernel scale, here ~1e-4 * |k - 1|.
    x = real.astype(np.float64)
    scale = np.abs((x @ x.T / 64 + 1) ** 3 - 1).mean()
    assert abs(mean - ref.mean()) < 1.5e-4 * scale
    assert abs(std - ref.std()) < 1.5e-4 * scale


def test_kid_hand_computable():
    # Constant sets: every kernel entry is known, MMD^2 = k(a,a) + k(b,b) - 2 k(a,b).
    a, b = np.full((20, 4), 0.5, np.float32), np.full((30, 4), 1.0, np.float32)
    k = lambda u, v: (u @ v / 4 + 1) ** 3
    expect = k(a[0], a[0]) + k(b[0], b[0]) - 2 * k(a[0], b[0])
    assert kid(a, b, 3, 10) == pytest.approx((expect, 0.0), rel=1e-6, abs=1e-9)
    # A set against itself with full subsets: X and Y are the same points, and
    # MMD^2_u = 2/m^2 (sum_{i!=j} k_ij / (m - 1) - sum_i k_ii), about 0 (O(1/m)).
    x = features(3, 50)
    kxx = (x.astype(np.float64) @ x.T.astype(np.float64) / 64 + 1) ** 3
    off = kxx.sum() - np.trace(kxx)
    expect = 2 / 50**2 * (off / 49 - np.trace(kxx))
    mean, _ = kid(x, x, 4, 50)
    assert mean == pytest.approx(expect, abs=1e-4 * abs(kxx).mean()) and abs(mean) < 0.1


def test_kid_seed_and_device_count():
    real, fake = features(4, 120), features(5, 130)
    one = kid(real, fake, 9, 40, 3, mesh=make_mesh(jax.devices()[:1]))
    eight = kid(real, fake, 9, 40, 3, mesh=make_mesh(jax.devices()[:8]))
    # Same subsets, same per-subset computation on every device: same numbers.
    np.testing.assert_allclose(one, eight, rtol=1e-12)
    assert kid(real, fake, 9, 40, 3) == kid(real, fake, 9, 40, 3)
    assert kid(real, fake, 9, 40, 4) != kid(real, fake, 9, 40, 3)


@pytest.mark.parametrize(
    "args,match",
    [
        ((features(0, 10, 8), features(0, 10, 9)), "different feature dimensions"),
        ((features(0, 10), features(0, 20), 5, 11), "subset_size=11 must be between 2 and"),
        ((features(0, 10), features(0, 20), 5, 1), "subset_size=1"),
        ((features(0, 10), features(0, 20), 0, 5), "subsets=0"),
    ],
)
def test_kid_bad_input(args, match):
    with pytest.raises(InputError, match=match):
        kid(*args)
