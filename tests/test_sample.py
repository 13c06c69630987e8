"""``python -m jaxgen.sample`` writes ADM-layout npz files and a grid; ``jaxgen.train`` CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_fixtures import tiny_config, tiny_images  # tests/ is on sys.path under pytest

from jaxgen import sample
from jaxgen.configs import RECIPES
from jaxgen.errors import InputError
from jaxgen.train import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 2-step tiny run of the default recipe's structure. Two full-size steps (lr 0.05, no
    warmup) move the zero-initialised output layers and attention projections enough that
    its raw parameters' samples depend on the deep features, the label and the attention
    (at lr 1e-3 they are one flat image to the uint8 level)."""
    root = tmp_path_factory.mktemp("sample")
    images, labels = tiny_images()
    np.savez(root / "tiny.npz", arr_0=images, arr_1=labels)
    overrides = {"train.num_steps": 2, "optim.lr": 0.05, "optim.warmup_steps": 0}
    train_and_evaluate(tiny_config(str(root / "tiny.npz"), **overrides), str(root / "run"))
    return root / "run"


def test_sample_writes_adm_npz_and_grid(run_dir, tmp_path, capsys):
    out = tmp_path / "s.npz"
    argv = ["--workdir", str(run_dir), "--num", "10", "--solver", "heun", "--steps", "2",
            "--batch-size", "8", "--out", str(out)]
    assert sample.main(argv) == 0
    assert "10 samples, step 2" in capsys.readouterr().out
    with np.load(out) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        x, y = f["arr_0"], f["arr_1"]
    assert x.dtype == np.uint8 and x.shape == (10, 8, 8, 1)
    np.testing.assert_array_equal(y, np.arange(10) % 4)
    grid = Image.open(out.with_suffix(".png"))
    assert grid.size == (8 * 10 + 2, 2 * 10 + 2)  # 8 columns, 2 rows of 8x8 tiles, 2 px gaps
    # Sample i depends only on (seed, i): another batch size gives the same images.
    again = tmp_path / "t.npz"
    assert sample.main([*argv[:-4], "--batch-size", "4", "--out", str(again)]) == 0
    np.testing.assert_array_equal(np.load(again)["arr_0"], x)


def test_sample_with_guidance_and_raw_params(run_dir, tmp_path):
    out = tmp_path / "g.npz"
    assert sample.main(["--workdir", str(run_dir), "--num", "4", "--steps", "2",
                        "--cfg-scale", "2.0", "--ema", "params", "--out", str(out)]) == 0
    assert np.load(out)["arr_0"].shape == (4, 8, 8, 1)


def test_sample_errors(run_dir, tmp_path):
    with pytest.raises(InputError, match="config.json: not found"):
        sample.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "x.npz")])
    for bad in ("0.5", "best"):  # a decay the run does not keep; not a decay at all
        with pytest.raises(InputError, match=f"ema='{bad}': the run keeps EMAs with decays"):
            sample.main(["--workdir", str(run_dir), "--ema", bad, "--out", str(tmp_path / "x.npz")])


def _samples(run_dir: Path, out: Path, *flags: str) -> np.ndarray:
    """``--num 4`` Euler samples of the run's raw parameters, 3 steps, with ``flags``."""
    argv = ["--workdir", str(run_dir), "--num", "4", "--steps", "3", "--ema", "params",
            "--out", str(out), *flags]
    assert sample.main(argv) == 0
    return np.load(out)["arr_0"].astype(np.int64)


def test_sample_cache_interval_flag(run_dir, tmp_path):
    plain = _samples(run_dir, tmp_path / "plain.npz")
    assert plain.std() > 5  # not one flat image: the comparisons below can fail
    # Interval 1 refreshes the cache at every evaluation: uncached sampling, bit for bit.
    np.testing.assert_array_equal(_samples(run_dir, tmp_path / "c1.npz", "--cache-interval",
                                           "1"), plain)
    # Interval 2: evaluation 2 (of 3) reuses the deep features of evaluation 1.
    assert np.abs(_samples(run_dir, tmp_path / "c2.npz", "--cache-interval", "2") - plain
                  ).max() > 2


def test_sample_pag_scale_flag(run_dir, tmp_path):
    plain = _samples(run_dir, tmp_path / "plain.npz")
    # PAG at scale 0 compiles no perturbed pass (and --cfg-scale 1 is no guidance).
    np.testing.assert_array_equal(
        _samples(run_dir, tmp_path / "p0.npz", "--pag-scale", "0", "--cfg-scale", "1"), plain)
    # PAG moves the samples (the U-Net's middle attention is perturbed).
    assert np.abs(_samples(run_dir, tmp_path / "p1.npz", "--pag-scale", "2") - plain).max() > 2


def test_sample_guidance_variant_flags_reach_guidance(run_dir, tmp_path):
    # A large weight: two training steps leave the label a small effect (3 levels at w = 3).
    cfg = _samples(run_dir, tmp_path / "cfg.npz", "--cfg-scale", "20")
    # APG without a norm cap or momentum and with the parallel part kept (eta = 1) is CFG on
    # x0 (Sadat et al. 2024, Sec. 4); it derives eps from x0 where CFG extrapolates eps, the
    # same number in exact arithmetic: float32 rounding moves a value by at most one level.
    apg = _samples(run_dir, tmp_path / "apg.npz", "--cfg-scale", "20", "--cfg-method", "apg",
                   "--apg-eta", "1")
    assert np.abs(apg - cfg).max() <= 1
    # The default eta = 0 drops the update's part parallel to D_cond: more than rounding
    # moves (4 levels, in 91 of 256 pixels, when written).
    apg0 = _samples(run_dir, tmp_path / "apg0.npz", "--cfg-scale", "20", "--cfg-method", "apg")
    assert np.abs(apg0 - cfg).max() > 1 and np.sum(apg0 != cfg) > 20


@pytest.mark.parametrize("flags,message", [
    (["--cache-interval", "0"], "--cache-interval 0: must be a positive integer"),
    (["--cfg-method", "apg"], "--cfg-method apg needs --cfg-scale W"),
    (["--cfg-method", "cfg++"], "--cfg-method cfg\\+\\+ needs --cfg-scale W"),
    (["--cfg-method", "pcg", "--cfg-scale", "2"], "method='pcg': use one of cfg, cfg\\+\\+, apg"),
    (["--cfg-scale", "2", "--apg-eta", "1"], "--apg-eta is an option of --cfg-method apg"),
    (["--guidance-interval", "0.1", "1"], "--guidance-interval shapes guidance, and there is "
                                          "none"),
    (["--cfg-scale", "2", "--guidance-interval", "1", "0.5"], "interval=\\(1.0, 0.5\\): need"),
    (["--cfg-scale", "2", "--cfg-method", "apg", "--apg-momentum", "1"], "momentum in"),
    (["--pag-scale", "nan"], "need a finite pag_scale"),
])
def test_sample_refuses_bad_guidance_and_cache_flags_before_loading(tmp_path, flags, message):
    # The workdir does not exist: these are refused before anything is read.
    argv = ["--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "x.npz"), *flags]
    with pytest.raises(InputError, match=message) as e:
        sample.main(argv)
    assert "\n" not in str(e.value)


def test_sample_refuses_pag_on_a_model_without_the_switch(run_dir, tmp_path):
    # The same weights, but PAG asked of an attention block this U-Net does not have.
    shutil.copytree(run_dir, tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["model"]["kwargs"]["pag_layers"] = ["down0_attn0"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    argv = ["--workdir", str(tmp_path / "run"), "--num", "2", "--out", str(tmp_path / "x.npz")]
    with pytest.raises(InputError, match="pag_scale needs a model that reads "
                                         "cond\\['perturb_attention'\\].*down0_attn0") as e:
        sample.main([*argv, "--pag-scale", "1"])
    assert "\n" not in str(e.value) and not (tmp_path / "x.npz").exists()


def test_sample_cli_bad_flag_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxgen.sample", "--workdir", str(tmp_path), "--cfg-method",
         "cfg++", "--out", str(tmp_path / "x.npz")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --cfg-method cfg++ needs --cfg-scale W (its guidance weight; CFG++'s lambda, "
        "usually in [0, 1])."]


def test_train_cli_dry_run():
    proc = subprocess.run(
        [sys.executable, "-m", "jaxgen.train", "--config", "jaxgen/configs/fashion_mnist.py",
         "--workdir", "/nonexistent/run", "--dry-run", "--config.data.batch_size=16"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unet-small" in proc.stdout and "717,633 parameters" in proc.stdout
    assert "train: batch 16" in proc.stdout
    assert not Path("/nonexistent/run").exists()


def test_train_cli_bad_config_value_is_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "jaxgen.train", "--config", "jaxgen/configs/fashion_mnist.py",
         "--workdir", "/nonexistent/run", "--dry-run", "--config.diffusion.process=ve"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: diffusion.process='ve'")


@pytest.mark.parametrize("name", RECIPES)
def test_every_config_describes_itself_offline(name):
    import importlib

    from jaxgen.train import describe

    module = importlib.import_module(f"jaxgen.configs.{name}")
    assert "python -m jaxgen.train --config jaxgen/configs/" in module.__doc__  # the exact command
    text = describe(module.get_config(), "/nonexistent")
    assert " parameters, compute " in text and "eval: " in text
