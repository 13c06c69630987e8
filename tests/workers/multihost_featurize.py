"""Worker for tests/test_multihost_eval.py: one of several JAX processes on localhost.

Usage: python multihost_featurize.py PROCESS_ID NUM_PROCESSES PORT OUT.npz
"""

import sys

import jax

process_id, num_processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes, process_id)

import numpy as np  # noqa: E402
from tiny_inception import tiny_inception  # noqa: E402

from jaxgen.data import ArraySource  # noqa: E402
from jaxgen.metrics.evaluate import EvalInput, FeatureRequest, featurize  # noqa: E402
from jaxgen.metrics.features import FeatureExtractor  # noqa: E402

images = np.random.default_rng(0).integers(0, 256, (13, 9, 7, 3), dtype=np.uint8)
extractor = FeatureExtractor(*tiny_inception(), batch_size=4)
f = featurize(EvalInput("x", source=ArraySource(images, "x")),
              FeatureRequest(pool3=True, logits=True), extractor, progress=False)
np.savez(out, mu=f["pool3_stats"].mu, sigma=f["pool3_stats"].sigma, n=f["pool3_stats"].n,
         mu_s=f["spatial_stats"].mu, pool3=f["pool3"], logits=f["logits"])
jax.distributed.shutdown()
