"""``python -m jaxgen.likelihood``: bits/dim of a run on a dataset, independent of batching."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from train_fixtures import tiny_config, tiny_images  # tests/ is on sys.path under pytest

from jaxgen import likelihood
from jaxgen.errors import InputError
from jaxgen.sampling.likelihood import bits_per_dim
from jaxgen.train import load_run, train_and_evaluate


@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("likelihood")
    images, labels = tiny_images()
    np.savez(root / "tiny.npz", arr_0=images, arr_1=labels)
    train_and_evaluate(tiny_config(str(root / "tiny.npz"), **{"train.num_steps": 2}),
                       str(root / "run"))
    return str(root / "run"), str(root / "tiny.npz"), images


@pytest.mark.slow  # a 2-step training run, then four likelihood compilations
def test_bits_per_dim_does_not_depend_on_the_batching(run_and_data, capsys):
    workdir, data, images = run_and_data
    argv = ["--workdir", workdir, "--data", data, "--num", "5", "--steps", "2"]
    outs = []
    for batch in ("8", "2"):  # one padded batch of 8 rows; three of 8 (2 per device, 8 devices)
        assert likelihood.main([*argv, "--batch-size", batch]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["n"] == 5 and outs[0]["nfe"] == 8 and outs[0]["divergence"] == "hutchinson"
    np.testing.assert_allclose(outs[0]["bits_per_dim"], outs[1]["bits_per_dim"], rtol=1e-5)
    run = load_run(workdir)
    cond = {"label": np.full(5, run.parts.num_classes, np.int32)}  # the null class: p(x)
    bpd, _ = bits_per_dim(run.parts.model_fn, run.params, run.parts.process, images[:5],
                          jax.random.key(0), prediction=run.parts.prediction, cond=cond,
                          divergence="hutchinson", steps=2)
    np.testing.assert_allclose(outs[0]["bits_per_dim"], float(np.mean(bpd)), rtol=1e-5)
    with pytest.raises(InputError, match="--num"):
        likelihood.main([*argv[:4], "--num", "0"])
