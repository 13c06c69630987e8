"""Feature statistics across JAX processes equal those of one process (gloo on localhost)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from tiny_inception import tiny_inception

from jaxgen.data import ArraySource
from jaxgen.metrics.evaluate import EvalInput, FeatureRequest, featurize
from jaxgen.metrics.features import FeatureExtractor

WORKER = Path(__file__).parent / "workers" / "multihost_featurize.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    # 13 images over 2 processes: parts of 6 and 7, so one process runs an idle
    # (all-padding) step; statistics are merged exactly, features gathered in order.
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")]))
    # Output to files, not pipes: a process whose pipe fills up (XLA prints long stack
    # dumps when a collective waits on a loaded machine) blocks, and its peer fails.
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    # String-hash seeds under which a set of {"pool3", "logits"} iterates in opposite
    # orders: every process must still run its collectives in one order.
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), "2", str(port),
                               str(tmp_path / f"p{i}.npz")], env=dict(env, PYTHONHASHSEED=seed),
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
             for i, (log, seed) in enumerate(zip(logs, ("0", "1"), strict=True))]
    for p, log in zip(procs, logs, strict=True):
        p.wait(timeout=300)
        assert p.returncode == 0, log.read_text()[-3000:]

    images = np.random.default_rng(0).integers(0, 256, (13, 9, 7, 3), dtype=np.uint8)
    one = featurize(EvalInput("x", source=ArraySource(images, "x")),
                    FeatureRequest(pool3=True, logits=True),
                    FeatureExtractor(*tiny_inception(), batch_size=8), progress=False)
    for i in range(2):
        with np.load(tmp_path / f"p{i}.npz") as r:
            assert int(r["n"]) == 13
            # per-image features agree to float32 reassociation; the float64
            # statistics built from them agree to the same relative level
            np.testing.assert_allclose(r["pool3"], one["pool3"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(r["logits"], one["logits"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(r["mu"], one["pool3_stats"].mu, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(r["sigma"], one["pool3_stats"].sigma, rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(r["mu_s"], one["spatial_stats"].mu, rtol=1e-5)
