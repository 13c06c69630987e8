"""benchmarks/device_suite.sh: shellcheck, the chip table, and a run at smoke size on the CPU."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "device_suite.sh"


def test_device_suite_passes_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed; scripts/install.sh (run by .ci/run) installs it")
    r = subprocess.run(["shellcheck", str(SUITE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


def test_peak_table_prefers_the_most_specific_chip_name():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from device_suite import peak_tflops
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert peak_tflops("TPU v5p") == 459.0
    assert peak_tflops("TPU v5 lite") == 197.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("cpu") is None


@pytest.mark.slow  # ~40 s of CPU time, mostly compiling (Inception, DiT step, sampler)
def test_device_suite_runs_at_smoke_size(tmp_path):
    # One CPU device (the suite's own default); the generous limit is for a shared machine.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable, "XLA_FLAGS": "",
           "SUITE_TIMEOUT": "600"}
    r = subprocess.run(["bash", str(SUITE), "--smoke"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=630)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 4, r.stdout  # header and three measurements
    assert "Inception features/s" in rows[1] and "img/s" in rows[2] and "DDIM 2 steps" in rows[3]
