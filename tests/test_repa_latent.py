"""REPA on latents (issue 18): ``jaxgen.encode --keep-images`` stores the images the VAE
saw, the iterator serves them with the moments (mirrored with the mirror view), the REPA
loss feeds them to the encoder while the model denoises the latents, and a dataset
without them is refused; without the flag the dataset is byte for byte as before."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
from test_encode import TINY, _Interrupting
from train_fixtures import tiny_config

from jaxgen import encode
from jaxgen.data import TrainIterator, global_positions, open_source
from jaxgen.data.images import adm_center_crop
from jaxgen.data.sources.latents import LatentSource, weights_identity
from jaxgen.errors import InputError
from jaxgen.models import AutoencoderKL, export_weights
from jaxgen.parallel import make_mesh
from jaxgen.train import build, init_state, make_train_step, repa
from jaxgen.train.latent import LatentImages, make_to_x0, wants_images

N, SEED = 16, 0
FEATURES = np.random.default_rng(5).normal(size=(16, 6)).astype(np.float32)
"""The stand-in encoder: each 4 x 4 pixel patch (2 x 2 grid of an 8 x 8 image) times this."""
Z = np.float32([1.0, -2.0, 0.5, 3.0, 0.0, 1.0])
"""The projector's output for every token once its last layer is set to (0, Z)."""


def _images() -> tuple[np.ndarray, np.ndarray]:
    """20 x 14 gray images (cropped and resized to 8 x 8 by the encoder) and labels."""
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (N, 20, 14, 1), dtype=np.uint8), np.arange(N) % 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The npz of :func:`_images`, its latents encoded with (``img``) and without (``bare``)
    ``--keep-images`` by a tiny random VAE, the VAE and its file."""
    tmp = tmp_path_factory.mktemp("repa_latent")
    images, labels = _images()
    np.savez(tmp / "src.npz", arr_0=images, arr_1=labels)
    vae = AutoencoderKL(**TINY)
    variables = jax.tree.map(np.asarray, jax.jit(vae.init)(jax.random.key(0),
                                                           np.zeros((1, 8, 8, 1), np.float32)))
    weights = tmp / "vae.safetensors"
    safetensors.numpy.save_file(export_weights(variables, vae), str(weights))
    inputs = dict(source=str(tmp / "src.npz"), resolution=8, vae=weights_identity(weights),
                  vae_model="vae-small", scale=0.5, shift=0.1, unit_range=False,
                  dtype="float32")
    for name, keep in (("img", True), ("bare", False)):
        encode.encode_dataset(_source(tmp), tmp / name, vae, variables, inputs=inputs,
                              batch_size=8, progress=False, keep_images=keep)
    return tmp, vae, variables, weights, inputs


def _source(tmp):
    return open_source(str(tmp / "src.npz"), resolution=8, resize_method="adm")


def test_keep_images_stores_the_images_the_vae_encoded_and_nothing_else_changes(data):
    tmp, vae, variables, _, inputs = data
    images, _ = _images()
    cropped = np.stack([adm_center_crop(im, 8) for im in images])  # DiT's center_crop_arr
    kept = LatentSource(tmp / "img")
    assert kept.has_images and not LatentSource(tmp / "bare").has_images
    idx, flips = np.arange(N), np.arange(N) % 3 == 0
    np.testing.assert_array_equal(kept.read_images(idx), cropped)
    np.testing.assert_array_equal(np.load(tmp / "img" / "images.npy"), cropped)
    got = kept.read_images(idx[::-1], flips)  # any order; the mirror where flipped
    want = cropped[::-1].copy()
    want[flips] = want[flips][:, :, ::-1]
    np.testing.assert_array_equal(got, want)
    # the moments are the VAE's of exactly those images, and of their mirrors
    enc = jax.jit(lambda v, x: jnp.concatenate(vae.apply(v, x, method="encode"), -1))
    for view in (0, 1):
        x = cropped[:, :, ::-1] if view else cropped
        np.testing.assert_allclose(kept.read_flipped(idx, np.full(N, bool(view)))[0],
                                   enc(variables, x.astype(np.float32) / 127.5 - 1),
                                   rtol=1e-5, atol=1e-5)
    meta = json.loads((tmp / "img" / "meta.json").read_text())
    assert meta["images"] is True and meta["image_shape"] == [8, 8, 1]
    # without the flag: no images, the other files byte for byte, meta.json as before
    files = lambda d: sorted(p.name for p in (tmp / d).iterdir())
    assert files("bare") == ["labels.npy", "meta.json", "moments.npy", "progress.json"]
    assert files("img") == sorted([*files("bare"), "images.npy"])
    for name in ("labels.npy", "moments.npy", "progress.json"):
        assert (tmp / "bare" / name).read_bytes() == (tmp / "img" / name).read_bytes(), name
    del meta["images"], meta["image_shape"]  # the keys the flag adds, at the end
    assert (tmp / "bare" / "meta.json").read_text() == json.dumps(meta, indent=1) + "\n"
    # a rerun with the other setting is refused, nothing touched
    for folder, keep, made in (("bare", True, "without"), ("img", False, "with")):
        with pytest.raises(InputError, match=rf"{folder}/meta.json: made {made} --keep-images"):
            encode.encode_dataset(_source(tmp), tmp / folder, vae, variables, inputs=inputs,
                                  progress=False, keep_images=keep)
    assert encode.parse_args(["s", "o", "--vae", "v", "--resolution", "8",
                              "--keep-images"]).keep_images


def test_an_interrupted_encoding_with_images_resumes_to_the_same_files(data, tmp_path):
    tmp, vae, variables, _, inputs = data
    images = _source(tmp).read(np.arange(N))
    source = _Interrupting(images, "cropped", np.arange(N) % 4)
    source.stop = 8
    with pytest.raises(KeyboardInterrupt):
        encode.encode_dataset(source, tmp_path / "b", vae, variables, inputs=inputs,
                              batch_size=8, progress=False, keep_images=True)
    assert json.loads((tmp_path / "b" / "progress.json").read_text()) == {"done": 8}
    assert not np.load(tmp_path / "b" / "images.npy")[8:].any()  # only rows written so far
    source.stop = 10**9
    encode.encode_dataset(source, tmp_path / "b", vae, variables, inputs=inputs, batch_size=8,
                          progress=False, keep_images=True)
    for name in ("images.npy", "moments.npy"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp / "img" / name).read_bytes(), name


def test_the_iterator_serves_each_latents_images_in_order_sharded_and_resumed(data):
    tmp, *_ = data
    cropped = _source(tmp).read(np.arange(N))
    kept = open_source(str(tmp / "img"), resolution=8)
    moments = np.load(tmp / "img" / "moments.npy")
    it = TrainIterator(kept, 8, seed=3, flip=True, with_labels=True, with_images=True,
                       prefetch=0)
    plain = TrainIterator(kept, 8, seed=3, flip=True, with_labels=True, prefetch=0)
    batches = [next(it) for _ in range(3)]  # two epochs of 16
    for s, batch in enumerate(batches):
        idx, flips = global_positions(3, N, np.arange(8 * s, 8 * s + 8))
        want = cropped[idx]
        want[flips] = want[flips][:, :, ::-1]
        np.testing.assert_array_equal(batch["image"]["pixels"], want)
        np.testing.assert_array_equal(batch["image"]["moments"], moments[idx, flips.astype(int)])
        np.testing.assert_array_equal(batch["image"]["moments"], plain.batch(s)["image"])
        np.testing.assert_array_equal(batch["label"], plain.batch(s)["label"])
    assert 0 < global_positions(3, N, np.arange(24))[1].sum() < 24  # both views served
    again = TrainIterator(kept, 8, seed=3, flip=True, with_images=True, prefetch=0,
                          state={**it.get_state(), "step": 2})
    np.testing.assert_array_equal(next(again)["image"]["pixels"], batches[2]["image"]["pixels"])
    second = TrainIterator(kept, 8, seed=3, flip=True, with_images=True, process_index=1,
                           process_count=2, prefetch=0).batch(1)["image"]
    for key in ("pixels", "moments"):  # process 1 of 2 reads the second half, only that
        np.testing.assert_array_equal(second[key], batches[1]["image"][key][4:])
    mesh = make_mesh()
    glob = TrainIterator(kept, 8, seed=3, flip=True, with_images=True, mesh=mesh,
                         prefetch=1).batch(0)["image"]
    assert glob["pixels"].sharding.mesh.size == mesh.size
    np.testing.assert_array_equal(np.asarray(glob["pixels"]), batches[0]["image"]["pixels"])
    with pytest.raises(InputError, match=r"bare: with_images=True.*--keep-images"):
        TrainIterator(open_source(str(tmp / "bare")), 8, seed=3, with_images=True)


def _stand_in_tokens(name, module, variables, x0):
    """``repa.encoder_tokens``'s stand-in: back to pixels as it does, 4 x 4 patches times
    ``variables["w"]`` ([B, 2, 2, 6]); records the shape it was given."""
    _SEEN.append(x0.shape)
    b = x0.shape[0]
    pixels = (x0.astype(jnp.float32) + 1.0) * 127.5
    patches = pixels.reshape(b, 2, 4, 2, 4).transpose(0, 1, 3, 2, 4).reshape(b, 2, 2, 16)
    return patches @ variables["w"]


_SEEN: list = []


@pytest.fixture
def stand_in_encoder(monkeypatch):
    """REPA's encoder replaced by :func:`_stand_in_tokens` (no weights to load)."""
    _SEEN.clear()
    monkeypatch.setattr(repa, "encoder_module", lambda name: (None, FEATURES.shape[1]))
    monkeypatch.setattr(repa, "load_encoder", lambda config: {"w": jnp.asarray(FEATURES)})
    monkeypatch.setattr(repa, "encoder_tokens", _stand_in_tokens)
    return _SEEN


def _config(tmp, weights, folder="img", lam=0.5):
    """SiT-like tiny DiT-S/2 on the 4 x 4 x 2 latents with REPA after block 1."""
    c = tiny_config(str(tmp / folder), **{
        "latent.vae": str(weights), "latent.vae_model": "vae-small", "latent.scale": 0.5,
        "latent.shift": 0.1, "data.resolution": 8, "data.flip": True, "train.num_steps": 2,
        "optim.warmup_steps": 0, "seed": SEED, "train.ema_decays": (0.9,)})
    c.latent.vae_kwargs = ml_collections.ConfigDict(TINY)
    c.model.name = "DiT-S/2"
    c.model.kwargs = ml_collections.ConfigDict(dict(hidden=32, depth=1, num_heads=2,
                                                    num_classes=4, learn_sigma=False))
    c.diffusion.process, c.diffusion.prediction = "flow", "velocity"
    c.diffusion.time_sampler = "uniform"
    c.train.repa.encoder, c.train.repa.depth, c.train.repa.projector_dim = "inception", 1, 16
    c.train.repa["lambda"] = lam
    return c


def _alignment(images: np.ndarray) -> float:
    """REPA's loss in float64 for projected tokens all equal to ``Z`` and the stand-in
    encoder's tokens of the uint8 ``images``: ``-mean_{n,t} cos(Z, y_nt)``."""
    b = len(images)
    x = images.astype(np.float64).reshape(b, 2, 4, 2, 4).transpose(0, 1, 3, 2, 4)
    y = x.reshape(b, 4, 16) @ FEATURES.astype(np.float64)
    z = Z.astype(np.float64)
    return float(-np.mean(y @ z / (np.linalg.norm(y, axis=-1) * np.linalg.norm(z))))


def _zeroed_projector(state):
    """``state`` with the projector's last layer set to (0, Z): every projected token is Z
    whatever the model does, so the alignment loss depends on the encoder's tokens alone."""
    fc3 = state.params["repa_projector"]["fc3"]
    fc3 = {"kernel": jax.device_put(jnp.zeros_like(fc3["kernel"]), fc3["kernel"].sharding),
           "bias": jax.device_put(jnp.asarray(Z), fc3["bias"].sharding)}
    params = {**state.params, "repa_projector": {**state.params["repa_projector"], "fc3": fc3}}
    return state.replace(params=params)


def _want_repa(tmp, seed: int) -> tuple[float, float]:
    """:func:`_alignment` of global batch 0's images read from the source directly (the
    mirrors where the stream flips), and of the same images unflipped."""
    idx, flips = global_positions(seed, N, np.arange(8))
    assert 0 < flips.sum() < 8
    images = _source(tmp).read(idx)
    mirrored = images.copy()
    mirrored[flips] = mirrored[flips][:, :, ::-1]
    return _alignment(mirrored), _alignment(images)


def test_the_repa_loss_on_latents_sees_the_batchs_images(data, stand_in_encoder):
    """The step's ``to_x0`` and the run's REPA loss (forward only: one cheap program): the
    model denoises the latents, the encoder sees the batch's images."""
    tmp, _, _, weights, _ = data
    config = _config(tmp, weights)
    assert wants_images(config)
    parts, source = build(config)
    state = _zeroed_projector(init_state(parts, config.seed))
    batch = TrainIterator(source, 8, seed=config.seed, flip=True, with_labels=True,
                          with_images=True, prefetch=0).batch(0)
    x0 = make_to_x0(config, 2)(batch["image"], jax.random.key(1))
    assert isinstance(x0, LatentImages) and x0.latents.shape == (8, 4, 4, 2)
    _, metrics = jax.jit(lambda p, x0, cond: parts.loss_fn(
        parts.model_fn, p, x0, cond, jax.random.key(2), frozen=parts.frozen))(
            state.params, x0, {"label": batch["label"]})
    assert stand_in_encoder == [(8, 8, 8, 1)]  # the images, not the 4 x 4 x 2 latents
    want, unflipped = _want_repa(tmp, config.seed)
    assert float(metrics["repa"]) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert abs(unflipped - want) > 1e-3  # the mirrors matter: the batch's own images


@pytest.mark.slow
def test_a_repa_train_step_and_the_loop_on_latents_feed_the_encoder_the_images(
        data, stand_in_encoder, tmp_path):
    """One jitted train step pins metrics["repa"]; ``train_and_evaluate`` serves the images
    (``with_images``) and logs REPA's loss."""
    from jaxgen.train import train_and_evaluate

    tmp, _, _, weights, _ = data
    config = _config(tmp, weights)
    parts, source = build(config)
    state = _zeroed_projector(init_state(parts, config.seed))
    data_it = TrainIterator(source, 8, seed=config.seed, flip=True, with_labels=True,
                            with_images=True, mesh=parts.mesh, prefetch=0)
    _, metrics = make_train_step(parts)(state, data_it.batch(0))
    assert stand_in_encoder == [(8, 8, 8, 1)]
    assert float(metrics["repa"]) == pytest.approx(_want_repa(tmp, config.seed)[0], rel=1e-5,
                                                   abs=1e-6)
    assert float(metrics["finite"]) == 1
    stand_in_encoder.clear()
    train_and_evaluate(copy.deepcopy(config), str(tmp_path / "run"))
    assert stand_in_encoder and set(stand_in_encoder) == {(8, 8, 8, 1)}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    repas = [r["repa"] for r in records if "repa" in r]
    assert len(repas) == 2 and all(-1 <= v <= 1 for v in repas)


def test_latent_repa_without_images_is_refused_naming_the_folder_and_the_fix(
        data, stand_in_encoder):
    tmp, _, _, weights, _ = data
    with pytest.raises(InputError) as e:
        build(_config(tmp, weights, folder="bare"))
    msg = str(e.value)
    assert msg.startswith(f"{tmp / 'bare'}: train.repa's encoder sees the images")
    assert "python -m jaxgen.encode --keep-images" in msg and "\n" not in msg
    zero = _config(tmp, weights, folder="bare", lam=0.0)  # lambda 0: no encoder, no images
    assert not wants_images(zero)
    build(zero)
    # a step given the moments alone (no with_images) refuses at trace time
    parts, source = build(_config(tmp, weights))
    batch = TrainIterator(source, 8, seed=0, with_labels=True, mesh=parts.mesh,
                          prefetch=0).batch(0)
    with pytest.raises(InputError, match="batch holds no images.*with_images=True"):
        make_train_step(parts)(init_state(parts, 0), batch)
