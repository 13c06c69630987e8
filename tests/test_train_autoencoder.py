"""python -m jaxgen.train_autoencoder: LDM's L1 + KL objective by hand, the measured latent
scale and PSNR by hand, and the written weights readable by load_weights."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_encode import TINY
from train_fixtures import tiny_images

from jaxgen import train_autoencoder
from jaxgen.models import AutoencoderKL, create_model, load_weights, sample_latent


def _encode(vae, variables, x):
    return jax.jit(lambda v, x: vae.apply(v, x, method="encode"))(variables, x)


def _decode(vae, variables, z):
    return jax.jit(lambda v, z: vae.apply(v, z, method="decode"))(variables, z)


@pytest.fixture(scope="module")
def tiny():
    vae = AutoencoderKL(**TINY)
    variables = jax.jit(vae.init)(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
    return vae, variables


def test_the_objective_is_l1_of_a_posterior_sample_plus_weighted_kl(tiny):
    vae, variables = tiny
    x = tiny_images(4)[0].astype(np.float32) / 127.5 - 1
    key = jax.random.key(3)
    loss, (l1, kl) = train_autoencoder.vae_objective(vae, variables["params"], x, key, 0.25)
    moments = _encode(vae, variables, x)
    mean, logvar = (np.asarray(a, np.float64) for a in moments)
    recon = np.asarray(_decode(vae, variables, sample_latent(key, *moments)), np.float64)
    want_l1 = np.abs(recon - x).sum(axis=(1, 2, 3)).mean()
    want_kl = (0.5 * (mean**2 + np.exp(logvar) - 1 - logvar)).sum(axis=(1, 2, 3)).mean()
    assert float(l1) == pytest.approx(want_l1, rel=1e-5)
    assert float(kl) == pytest.approx(want_kl, rel=1e-5)
    assert float(loss) == pytest.approx(want_l1 + 0.25 * want_kl, rel=1e-5)


def test_measure_gives_one_over_the_latent_std_and_the_uint8_psnr(tiny):
    vae, variables = tiny
    images = tiny_images(6)[0]
    got = train_autoencoder.measure(vae, variables, images, seed=1)
    x = images.astype(np.float32) / 127.5 - 1
    mean, logvar = _encode(vae, variables, x)
    z = np.asarray(sample_latent(jax.random.key(1), mean, logvar))
    recon = np.asarray(_decode(vae, variables, mean))
    recon = np.clip(np.floor((recon + 1) * 127.5 + 0.5), 0, 255)
    psnr = 10 * np.log10(255**2 / np.mean((recon - images) ** 2))
    assert got["latent_std"] == pytest.approx(z.std(), rel=1e-5)
    assert got["scale"] == pytest.approx(1 / z.std(), rel=1e-3)
    assert got["psnr"] == pytest.approx(psnr, abs=0.05)


@pytest.mark.slow
def test_cli_trains_writes_loadable_weights_and_never_overwrites(tmp_path, data_file, capsys):
    from jaxgen import cli

    out = tmp_path / "vae.safetensors"
    argv = [data_file, str(out), "--steps", "2", "--batch-size", "8", "--measure", "8"]
    assert train_autoencoder.main(argv) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["steps"] == 2 and stats["scale"] == pytest.approx(1 / stats["latent_std"],
                                                                   rel=1e-3)
    load_weights(out, create_model("vae-small"))  # every tensor named and shaped
    before = out.read_bytes()
    with pytest.raises(SystemExit) as e:
        cli.run(train_autoencoder.main, argv)
    assert e.value.code == 2 and out.read_bytes() == before
