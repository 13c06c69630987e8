"""`python -m jaxgen.evaluate` / `jaxgen.fid_stats` and the Python `evaluate` call."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxgen import cli, fid_stats
from jaxgen import evaluate as evaluate_cli
from jaxgen.errors import InputError
from jaxgen.metrics import GaussianStats
from jaxgen.metrics.evaluate import evaluate

N = 6


@pytest.fixture(scope="module")
def images():
    """Two small, different image sets of one shape (one compilation serves the file)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (N, 16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) // 2 + rng.integers(0, 60, a.shape), 0, 255).astype(np.uint8)
    return a, b


@pytest.fixture(scope="module")
def files(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("eval")
    a, b = images
    folder = root / "real"
    (folder / "sub").mkdir(parents=True)
    for i, im in enumerate(a):  # recursive, mixed formats (png lossless)
        Image.fromarray(im).save(folder / ("sub" if i % 2 else "") / f"{i:02d}.png")
    np.savez(root / "real.npz", arr_0=a)
    np.savez(root / "fake.npz", arr_0=b)
    return root


def _run(main, argv):
    with pytest.raises(SystemExit) as e:
        cli.run(main, argv)
    return e.value.code


def test_cli_folder_vs_npz_writes_json(files, fid_helper_wheel, capsys):
    out = files / "out.json"
    code = _run(evaluate_cli.main, [str(files / "real"), str(files / "fake.npz"), "--metrics",
                                    "fid,sfid,pr,dc", "--json", str(out), "--weights",
                                    str(fid_helper_wheel), "--no-progress"])
    assert code == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert set(result) == {"fid", "sfid", "precision", "recall", "density", "coverage",
                           "n_real", "n_fake", "weights"}
    assert result["n_real"] == result["n_fake"] == N
    assert result["weights"] == "fid-helper:default_1.pt"
    assert result["fid"] > 1.0 and result["sfid"] > 1.0


def test_same_images_score_as_identical(files, images, inception):
    a, _ = images
    r = evaluate(files / "real", a, ["fid", "pr", "dc"], inception=inception, progress=False,
                 batch_size=8)
    # identical features: FID is 0 up to float64 rounding of the trace terms
    assert abs(r["fid"]) < 1e-6
    assert r["precision"] == r["recall"] == r["coverage"] == 1.0


def test_fid_infinity_from_the_same_pass(files, images, inception):
    _, b = images
    r = evaluate(files / "real", b, ["fid", "fid_inf"], inception=inception, progress=False,
                 inf_points=3, inf_min_n=3)
    points = r["fid_inf_points"]
    assert [n for n, _ in points] == [3, 4, 6]
    # the last point uses every fake image: it is the FID itself (a permutation of
    # the same rows changes the float64 sums only by rounding)
    assert points[-1][1] == pytest.approx(r["fid"], rel=1e-9)
    # FID_N is biased upward by ~tr(S_fake) (M - N) / (N (M - 1)) (the subset mean's
    # variance, drawn without replacement from M = 6): the line falls with N, so its
    # intercept lies below the FID of all M (measured: 56.0 against 80.1).
    assert r["fid_inf"] < r["fid"]
    # the intercept of the least-squares line through the points, recomputed
    inv_n = 1.0 / np.array([n for n, _ in points])
    _, intercept = np.polyfit(inv_n, [v for _, v in points], 1)
    assert r["fid_inf"] == pytest.approx(intercept, rel=1e-9)


def test_stats_file_gives_the_same_fid(files, fid_helper_wheel, inception):
    stats = files / "real_stats.npz"
    assert _run(fid_stats.main, [str(files / "real"), str(stats), "--weights",
                                 str(fid_helper_wheel), "--no-progress"]) == 0
    assert GaussianStats.load(stats).n == N
    direct = evaluate(files / "real", files / "fake.npz", ["fid", "sfid"], inception=inception,
                      progress=False)
    via_stats = evaluate(stats, files / "fake.npz", ["fid", "sfid"], inception=inception,
                         progress=False)
    assert via_stats["fid"] == pytest.approx(direct["fid"], rel=1e-9)
    assert via_stats["sfid"] == pytest.approx(direct["sfid"], rel=1e-9)
    assert via_stats["n_real"] == N


def _write_bad(tmp_path, kind):
    if kind == "empty folder":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", "empty"
    if kind == "corrupt image":
        d = tmp_path / "imgs"
        d.mkdir()
        Image.new("RGB", (8, 8)).save(d / "ok.png")
        Image.new("RGB", (8, 8)).save(d / "ok2.png")
        (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
        return d, "broken.png"
    if kind == "float dtype":
        np.savez(tmp_path / "f.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
        return tmp_path / "f.npz", "float32"
    if kind == "nan":
        x = np.zeros((4, 8, 8, 3), np.float32)
        x[1, 2, 3, 0] = np.nan
        np.save(tmp_path / "nan.npy", x)
        return tmp_path / "nan.npy", "NaN"
    if kind == "rank":
        np.save(tmp_path / "r.npy", np.zeros((4, 8), np.uint8))
        return tmp_path / "r.npy", "shape"
    if kind == "one image":
        np.savez(tmp_path / "one.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
        return tmp_path / "one.npz", "at least 2"
    if kind == "missing":
        return tmp_path / "nope", "no such file"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["empty folder", "corrupt image", "float dtype", "nan", "rank",
                                  "one image", "missing"])
def test_bad_input_exits_2_with_one_line(tmp_path, files, fid_helper_wheel, capsys, kind):
    bad, words = _write_bad(tmp_path, kind)
    code = _run(evaluate_cli.main, [str(files / "real.npz"), str(bad), "--weights",
                                    str(fid_helper_wheel), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err
    assert words in err and bad.name in err


def test_stats_of_different_dimension(tmp_path, fid_helper_wheel, capsys):
    np.savez(tmp_path / "a.npz", mu=np.zeros(3), sigma=np.eye(3))
    np.savez(tmp_path / "b.npz", mu=np.zeros(4), sigma=np.eye(4))
    code = _run(evaluate_cli.main, [str(tmp_path / "a.npz"), str(tmp_path / "b.npz"),
                                    "--weights", str(fid_helper_wheel)])
    assert code == 2
    assert "different dimensions (3 vs 4)" in capsys.readouterr().err


def test_metric_requests_that_cannot_be_met(files, fid_helper_wheel, capsys, tmp_path):
    argv = [str(files / "real.npz"), str(files / "fake.npz"), "--weights", str(fid_helper_wheel)]
    assert _run(evaluate_cli.main, [*argv, "--metrics", "fid,lpips"]) == 2
    assert "unknown metric(s) ['lpips']" in capsys.readouterr().err
    assert _run(evaluate_cli.main, [*argv, "--metrics", "is"]) == 2
    assert "IS needs Inception weights with logits" in capsys.readouterr().err
    np.savez(tmp_path / "s.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    assert _run(evaluate_cli.main, [str(tmp_path / "s.npz"), str(files / "fake.npz"),
                                    "--weights", str(fid_helper_wheel), "--metrics", "pr"]) == 2
    assert "statistics file without images" in capsys.readouterr().err


def test_module_entry_point_exit_code(tmp_path, fid_helper_wheel):
    (tmp_path / "empty").mkdir()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "jaxgen.evaluate", str(tmp_path / "empty"),
                        str(tmp_path / "empty"), "--weights", str(fid_helper_wheel)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: ") and len(p.stderr.strip().splitlines()) == 1


def test_score_features_is_each_metric_on_the_same_features():
    from jaxgen.metrics import fid_infinity, frechet_distance, inception_score, kid, prdc
    from jaxgen.metrics.evaluate import score_features

    rng = np.random.default_rng(11)
    real = rng.normal(size=(300, 16)).astype(np.float32)
    fake = (rng.normal(size=(260, 16)) * 1.1 + 0.2).astype(np.float32)
    logits = rng.normal(size=(260, 10)).astype(np.float32) * 2
    r = {"pool3": real, "pool3_stats": GaussianStats.from_features(real)}
    f = {"pool3": fake, "pool3_stats": GaussianStats.from_features(fake), "logits": logits}
    opts = {"kid_subsets": 5, "kid_subset_size": 50, "inf_points": 4, "inf_min_n": 100}
    out = score_features(r, f, ("fid", "is", "kid", "pr", "dc", "fid_inf"), **opts)
    # The same calls by hand: score_features adds nothing of its own to any number.
    assert out["fid"] == frechet_distance(r["pool3_stats"], f["pool3_stats"])
    assert (out["is_mean"], out["is_std"]) == inception_score(logits, 10, seed=None)
    assert (out["kid_mean"], out["kid_std"]) == kid(real, fake, 5, 50, 0)
    assert {k: out[k] for k in ("precision", "recall", "density", "coverage")} == prdc(real, fake)
    assert out["fid_inf"] == fid_infinity(r["pool3_stats"], fake, 4, 100, 0).value
    with pytest.raises(InputError, match=r"the fake dict lacks \['logits'\]"):
        score_features(r, {"pool3": fake}, ("is",))
