"""Training on latents: the iterator serves the stored mirror views in the images' order,
the step draws DiT's scaled posterior sample, a dataset of another VAE or scale is refused,
and samples decode through the VAE exactly as the module decodes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
from test_encode import TINY
from train_fixtures import UserNet, tiny_config, tiny_images

from jaxgen import sampling
from jaxgen.data import ArraySource, TrainIterator, global_positions, open_source
from jaxgen.data.sources.latents import weights_identity
from jaxgen.encode import encode_dataset
from jaxgen.errors import InputError
from jaxgen.models import AutoencoderKL, export_weights
from jaxgen.train import build, init_state, load_run, make_train_step, sample_images
from jaxgen.train.latent import check_dataset, sample_latents

SCALE, SHIFT = 0.5, 0.1


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """A 16-image latent dataset of a tiny random VAE, the VAE file and a latent config."""
    tmp = tmp_path_factory.mktemp("latent")
    vae = AutoencoderKL(**TINY)
    variables = jax.jit(vae.init)(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
    weights = tmp / "vae.safetensors"
    safetensors.numpy.save_file(export_weights(variables, vae), str(weights))
    images, labels = tiny_images(16)
    inputs = dict(source="tiny", resolution=8, vae=weights_identity(weights),
                  vae_model="vae-small", scale=SCALE, shift=SHIFT)
    encode_dataset(ArraySource(images, "tiny", labels), tmp / "lat", vae, variables,
                   inputs=inputs, batch_size=16, progress=False)
    config = tiny_config(str(tmp / "lat"), **{
        "latent.vae": str(weights), "latent.vae_model": "vae-small", "latent.scale": SCALE,
        "latent.shift": SHIFT, "data.resolution": 8, "data.flip": True, "train.num_steps": 2})
    config.latent.vae_kwargs = ml_collections.ConfigDict(TINY)
    return tmp, vae, variables, config


def test_the_iterator_serves_the_stored_mirror_views_and_resumes_exactly(latents):
    tmp, *_ = latents
    source = open_source(str(tmp / "lat"), resolution=8)
    moments = np.load(tmp / "lat" / "moments.npy")
    it = TrainIterator(source, 8, seed=3, flip=True, with_labels=True, prefetch=0)
    batches = [next(it) for _ in range(3)]  # 24 positions: two epochs of 16
    for s, batch in enumerate(batches):
        idx, flips = global_positions(3, 16, np.arange(8 * s, 8 * s + 8))
        np.testing.assert_array_equal(batch["image"], moments[idx, flips.astype(int)])
        np.testing.assert_array_equal(batch["label"], tiny_images(16)[1][idx])
    assert 0 < sum(global_positions(3, 16, np.arange(24))[1]) < 24  # both views were served
    again = TrainIterator(source, 8, seed=3, flip=True, with_labels=True, prefetch=0,
                          state={**it.get_state(), "step": 1})
    np.testing.assert_array_equal(next(again)["image"], batches[1]["image"])


def test_the_step_trains_on_a_fresh_scaled_posterior_sample(latents):
    _, _, _, config = latents

    def loss_fn(model_fn, params, x0, cond, key):  # reports what the step fed it
        return 0.0 * jnp.sum(x0), {"x0_sum": jnp.sum(x0), "x0_sq": jnp.sum(x0**2),
                                   "x0_pick": x0[3, 1, 2, 1]}

    parts, source = build(config, module=UserNet(), loss_fn=loss_fn)
    state = init_state(parts, config.seed)
    rng = np.asarray(state.rng)
    data = TrainIterator(source, 8, seed=config.seed, flip=True, with_labels=True, prefetch=0)
    batch = data.batch(0)
    _, metrics = make_train_step(parts)(state, {k: jnp.asarray(v) for k, v in batch.items()})
    seen = {k: float(v) for k, v in metrics.items()}
    key = jax.random.fold_in(jax.random.fold_in(rng, 0), 2)
    want = np.asarray(sample_latents(jnp.asarray(batch["image"]), key, np.full(2, SCALE),
                                     np.full(2, SHIFT)))
    mean, logvar = np.split(batch["image"], 2, axis=-1)
    eps = np.asarray(jax.random.normal(key, mean.shape))
    np.testing.assert_allclose(want, SCALE * (mean + np.exp(logvar / 2) * eps - SHIFT),
                               rtol=1e-5, atol=1e-6)
    assert seen["x0_sum"] == pytest.approx(want.sum(), rel=1e-4, abs=1e-3)
    assert seen["x0_sq"] == pytest.approx((want**2).sum(), rel=1e-4)
    assert seen["x0_pick"] == pytest.approx(want[3, 1, 2, 1], rel=1e-5, abs=1e-6)


def test_latents_of_another_scale_or_vae_are_refused_naming_the_dataset(latents, tmp_path):
    tmp, vae, variables, config = latents
    source = open_source(str(tmp / "lat"))
    other = ml_collections.ConfigDict(config.to_dict())
    other.latent.scale = 0.25
    with pytest.raises(InputError, match=r"lat/meta.json: encoded with scale=0.5"):
        check_dataset(other, source)
    changed = jax.tree.map(lambda a: a + 1, variables)
    safetensors.numpy.save_file(export_weights(changed, vae), str(tmp_path / "vae2.safetensors"))
    other.latent.scale = SCALE
    other.latent.vae = str(tmp_path / "vae2.safetensors")
    with pytest.raises(InputError, match=r"lat/meta.json: encoded with VAE vae.safetensors"):
        check_dataset(other, source)
    pixels = ml_collections.ConfigDict(config.to_dict())
    pixels.latent.vae = ""
    with pytest.raises(InputError, match="a latent dataset, but latent.vae is empty"):
        check_dataset(pixels, source)


def test_a_latent_run_samples_images_through_the_vae_decoder(latents, tmp_path):
    from jaxgen.train import train_and_evaluate

    _, vae, variables, config = latents
    train_and_evaluate(config, str(tmp_path / "run"), module=UserNet())
    run = load_run(tmp_path / "run", module=UserNet())
    assert run.parts.image_shape == (4, 4, 2)
    key = jax.random.key_data(jax.random.key(5))
    images = np.concatenate(list(sample_images(run.parts, run.params, key, num=6, batch_size=4,
                                               solver="euler", steps=2)))
    labels = {"label": jnp.arange(6) % 4}
    z, _ = sampling.sample(run.parts.model_fn, run.params, run.parts.process, key, (6, 4, 4, 2),
                           prediction=run.parts.prediction, solver="euler", steps=2,
                           cond=labels)
    decode = jax.jit(lambda v, z: vae.apply(v, z, method="decode"))
    want = np.asarray(sampling.to_uint8(decode(variables, z / SCALE + SHIFT)))
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8
    diff = np.abs(images.astype(int) - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def _tiny_dit_config(config):
    c = ml_collections.ConfigDict(config.to_dict())
    c.model.name = "DiT-S/2"
    c.model.kwargs = ml_collections.ConfigDict(dict(
        hidden=32, depth=1, num_heads=2, num_classes=4, class_dropout=0.1, learn_sigma=True))
    return c


@pytest.mark.slow
def test_released_weights_sample_without_a_workdir_and_wrong_ones_exit_2(latents, tmp_path):
    from jaxgen import cli, sample
    from jaxgen.train import load_released
    from jaxgen.train.state import make_model

    *_, config = latents
    config = _tiny_dit_config(config)
    module = make_model(config)
    variables = jax.jit(module.init)(jax.random.key(2), jnp.zeros((1, 4, 4, 2)), jnp.zeros(1),
                                     {"label": jnp.zeros(1, jnp.int32)})
    path = tmp_path / "dit.safetensors"
    safetensors.numpy.save_file(export_weights(variables, module, "dit"), str(path))
    run = load_released(config, path)
    for got, want in zip(jax.tree.leaves(run.params), jax.tree.leaves(variables["params"]),
                         strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    images = np.concatenate(list(sample_images(run.parts, run.params, jax.random.key_data(
        jax.random.key(0)), num=3, batch_size=3, solver="euler", steps=1)))
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8
    with pytest.raises(SystemExit) as e:  # DiT-S/2 weights for DiT-XL/2
        cli.run(sample.main, ["--weights", str(path), "--model", "DiT-XL/2", "--vae",
                              config.latent.vae, "--out", str(tmp_path / "s.npz")])
    assert e.value.code == 2 and not (tmp_path / "s.npz").exists()


def test_reverse_time_gives_the_network_sits_time_and_negates_its_velocity():
    from jaxgen.configs import imagenet256_sit_xl2
    from jaxgen.parallel import make_mesh
    from jaxgen.train import make_run_parts

    assert imagenet256_sit_xl2.get_config().diffusion.reverse_time
    config = tiny_config("unused", **{"diffusion.reverse_time": True})
    parts = make_run_parts(config, make_mesh(), (8, 8, 1), 1, module=UserNet())
    x, t = jnp.ones((2, 8, 8, 1)) * 0.3, jnp.array([0.2, 0.9])
    cond = {"label": jnp.array([0, 1])}
    variables = jax.jit(parts.module.init)(jax.random.key(0), x, t, cond)
    raw = parts.module.apply(variables, x, 1 - t, cond)
    np.testing.assert_allclose(parts.apply(variables["params"], x, t, cond), -raw, rtol=1e-6)
