"""``python -m jaxgen.sample`` writes ADM-layout npz files and a grid; ``jaxgen.train`` CLI."""

from __future__ import annotations

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
    """A 2-step tiny run of the default recipe's structure."""
    root = tmp_path_factory.mktemp("sample")
    images, labels = tiny_images()
    np.savez(root / "tiny.npz", arr_0=images, arr_1=labels)
    train_and_evaluate(tiny_config(str(root / "tiny.npz"), **{"train.num_steps": 2}),
                       str(root / "run"))
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
