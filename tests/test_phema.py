"""Power-function EMA and post-hoc reconstruction (EDM2 Section 3, Appendix C).

Values are pinned against the official ``training/phema.py`` (run by
``fixtures/make_edm2_reference.py``), the paper's figures, an independent
float64 quadrature of the profiles, and a synthetic training trajectory.
"""

import itertools
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.errors import InputError
from jaxgen.phema import main as phema_main
from jaxgen.train.phema import (
    SIGMA_REL_MAX,
    gamma_to_sigma_rel,
    list_snapshots,
    load_snapshot,
    posthoc_coefficients,
    power_ema_beta,
    power_ema_init,
    power_ema_update,
    reconstruct,
    save_snapshot,
    sigma_rel_to_gamma,
)

REF = np.load(Path(__file__).parent / "fixtures" / "edm2_reference.npz")


def test_sigma_rel_gamma_paper_values_and_round_trip():
    # The paper (Section 3.1): sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94 (2 decimals).
    np.testing.assert_allclose(sigma_rel_to_gamma([0.05, 0.10]), [16.97, 6.94], atol=5e-3)
    np.testing.assert_allclose(gamma_to_sigma_rel([16.97, 6.94]), [0.05, 0.10], atol=1e-4)
    s = np.linspace(0.01, 0.28, 28)
    np.testing.assert_allclose(gamma_to_sigma_rel(sigma_rel_to_gamma(s)), s, rtol=1e-12)
    assert abs(gamma_to_sigma_rel(0.0) - SIGMA_REL_MAX) < 1e-15
    for bad in (0.0, -0.1, 0.29):
        with pytest.raises(InputError, match=r"sigma_rel .* must lie in \(0, 0.2887\)"):
            sigma_rel_to_gamma(bad)


def test_matches_official_phema_functions():
    np.testing.assert_allclose(sigma_rel_to_gamma(REF["phema/std"]), REF["phema/exp"], rtol=1e-12)
    np.testing.assert_allclose(gamma_to_sigma_rel([6.94, 16.97, 3.0, 50.0]),
                               REF["phema/exp_to_std"], rtol=1e-12)
    # Official beta(t_next = nimg, t_delta = batch 8) is ours at update t = nimg / 8.
    beta = power_ema_beta(sigma_rel_to_gamma(0.05), np.float64([8, 64, 4096]) / 8)
    np.testing.assert_allclose(beta, REF["phema/beta"], rtol=1e-12)
    coefs = posthoc_coefficients(REF["phema/in_ofs"], REF["phema/in_std"], 4000,
                                 REF["phema/out_std"])
    np.testing.assert_allclose(coefs, REF["phema/coefs"], rtol=1e-9, atol=1e-9)


def test_least_squares_weights_against_float64_quadrature():
    """``A``, ``B`` by Gauss-Legendre quadrature of the profiles themselves, then solved.

    Profile of an EMA at time T with exponent g: ``(g + 1) tau^g / T^(g+1)`` on ``[0, T]``.
    Integrands are polynomials between the snapshot times, so 40 nodes per
    segment are exact to rounding; the solve amplifies that by cond(A).
    """
    in_t = np.float64([250, 500, 750, 1000] * 2)
    in_s = np.float64([0.05] * 4 + [0.10] * 4)
    out_s = np.float64([0.03, 0.07, 0.15])
    nodes, weights = np.polynomial.legendre.leggauss(40)
    edges = np.concatenate([[0.0], np.unique(in_t)])
    tau = np.concatenate([(b - a) / 2 * nodes + (a + b) / 2 for a, b in itertools.pairwise(edges)])
    w = np.concatenate([(b - a) / 2 * weights for a, b in itertools.pairwise(edges)])

    def profile(t_end, s):
        g = sigma_rel_to_gamma(s)
        return np.where(tau <= t_end, (g + 1) * tau**g / t_end ** (g + 1), 0.0)

    p_in = np.stack([profile(t, s) for t, s in zip(in_t, in_s, strict=True)])
    p_out = np.stack([profile(1000.0, s) for s in out_s])
    a, b = (p_in * w) @ p_in.T, (p_in * w) @ p_out.T
    x = np.linalg.solve(a, b)
    x /= x.sum(axis=0)
    got = posthoc_coefficients(in_t, in_s, 1000, out_s)
    np.testing.assert_allclose(got, x, rtol=1e-6, atol=1e-6 * np.abs(x).max())


def _train(tmp_path, steps=512, every=64, sigma_rels=(0.05, 0.10, 0.07)):
    """Power EMAs over a synthetic trajectory; snapshots of the first two every ``every``."""
    k = np.arange(1, steps + 1, dtype=np.float64)[:, None] / steps
    c = np.linspace(0.5, 3.0, 6)[None]
    traj = (np.sin(c * 6 * k) + c * k**2 + 0.05 * np.cos(97 * k * c)).astype(np.float32)
    params = {"layer": {"w": jnp.asarray(traj[0]), "b": jnp.float32(1.5)}}
    state = power_ema_init(params, sigma_rels)
    update = jax.jit(power_ema_update, static_argnums=2)
    for i in range(steps):
        params = {"layer": {"w": jnp.asarray(traj[i]), "b": jnp.float32(1.5)}}
        state = update(state, params, sigma_rels)
        if (i + 1) % every == 0:
            for s, ema in zip(sigma_rels[:2], state.emas[:2], strict=True):
                save_snapshot(tmp_path, ema, i + 1, s)
    return traj, state


def _ema_weights(sigma_rel, steps):
    """The discrete power EMA's weight on each step's parameters (float64 recursion)."""
    g = sigma_rel_to_gamma(sigma_rel)
    w = np.zeros(steps)
    for t in range(1, steps + 1):
        beta = power_ema_beta(g, t)
        w *= beta
        w[t - 1] = 1 - beta
    return w


def test_power_ema_tracks_the_beta_recursion(tmp_path):
    traj, state = _train(tmp_path, steps=64, every=64)
    for s, ema in zip((0.05, 0.10, 0.07), state.emas, strict=True):
        want = _ema_weights(s, 64) @ traj.astype(np.float64)
        np.testing.assert_allclose(np.asarray(ema["layer"]["w"]), want, rtol=2e-6, atol=2e-6)
    assert int(state.count) == 64


def test_power_ema_step_weight_is_accurate_late_in_training():
    # At t = 10^6 updates the weight 1 - beta ~ (gamma + 1) 1e-6 must not come from a
    # float32 1 - 1/t (3% off); the float64 formula is the reference.
    state = power_ema_init({"w": jnp.zeros(())}, (0.05, 0.10))
    for t in (1_000_000, 777_777):
        state = state._replace(count=jnp.int32(t - 1))
        new = power_ema_update(state, {"w": jnp.ones(())}, (0.05, 0.10))
        want = 1 - power_ema_beta(sigma_rel_to_gamma([0.05, 0.10]), np.float64(t))
        np.testing.assert_allclose([float(e["w"]) for e in new.emas], want, rtol=1e-5)


def test_reconstruction_exact_for_stored_profile_and_bounded_otherwise(tmp_path):
    traj, state = _train(tmp_path)
    snaps = list_snapshots(tmp_path)
    assert [(s.t, s.sigma_rel) for s in snaps[:3]] == [(64, 0.05), (64, 0.10), (128, 0.05)]
    (_, r05), (_, r07) = reconstruct(snaps, [0.05, 0.07])
    # A stored profile is its own best fit: weights one-hot up to the solve's rounding.
    np.testing.assert_allclose(r05["layer/w"], np.asarray(state.emas[0]["layer"]["w"]),
                               rtol=1e-6, atol=1e-6)
    # 0.07 was tracked but not saved. Error per coordinate <= ||w_07 - sum_i x_i w_i||_2 *
    # ||theta||_2 (Cauchy-Schwarz over the steps), with the discrete EMA weights w.
    used = [(s.t, s.sigma_rel) for s in snaps]
    x = posthoc_coefficients([t for t, _ in used], [s for _, s in used], 512, [0.07])[:, 0]
    fit = sum(xi * np.pad(_ema_weights(s, t), (0, 512 - t))
              for xi, (t, s) in zip(x, used, strict=True))
    residual = np.linalg.norm(_ema_weights(0.07, 512) - fit)
    bound = residual * np.linalg.norm(traj.astype(np.float64), axis=0) + 1e-5
    err = np.abs(r07["layer/w"] - np.asarray(state.emas[2]["layer"]["w"]))
    assert np.all(err <= bound), (err, bound)
    assert err.max() < 0.01 * np.ptp(traj)  # and useful: well under the trajectory's spread
    # A constant parameter comes back exactly (the weights sum to one).
    assert abs(float(r07["layer/b"]) - 1.5) < 1e-6
    assert set(load_snapshot(snaps[0].path)["layer"]) == {"w", "b"}


def test_cli_writes_reconstructions_and_refuses_bad_input(tmp_path):
    runs = tmp_path / "run" / "phema"
    _train(runs, steps=128, every=64)
    out = tmp_path / "out"
    assert phema_main(["--workdir", str(tmp_path / "run"), "--sigma-rel", "0.07,0.05",
                       "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "phema-0000000128-0.050.npz", "phema-0000000128-0.070.npz"]
    before = (out / "phema-0000000128-0.050.npz").read_bytes()
    with pytest.raises(InputError, match="exists"):
        phema_main(["--snapshots", str(runs), "--sigma-rel", "0.05", "--out", str(out)])
    assert (out / "phema-0000000128-0.050.npz").read_bytes() == before
    with pytest.raises(InputError, match=r"must lie in \(0, 0.2887\)"):
        phema_main(["--snapshots", str(runs), "--sigma-rel", "0.3", "--out", str(out / "x")])
    with pytest.raises(InputError, match="no snapshot at that time"):
        phema_main(["--snapshots", str(runs), "--sigma-rel", "0.1", "--t", "100",
                     "--out", str(out / "y")])
    save_snapshot(runs, {"other": {"w": np.zeros(3)}}, 192, 0.05)  # another model's snapshot
    with pytest.raises(InputError, match="all snapshots must come from one model"):
        phema_main(["--snapshots", str(runs), "--sigma-rel", "0.1", "--out", str(out / "z")])
    assert not (out / "z").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    cmd = [sys.executable, "-m", "jaxgen.phema", "--snapshots", str(empty), "--sigma-rel",
           "0.1", "--out", str(out / "w")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "holds no power-EMA snapshots" in done.stderr
