"""python -m jaxgen.encode: ADM cropping, stored moments of each image and its mirror (of
[-1, 1] or EDM2's [0, 1] images; float32 or float16), resumption after an interruption,
refusal to overwrite, the CLI's exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
from PIL import Image
from train_fixtures import tiny_images

from jaxgen import encode
from jaxgen.data import ArraySource, open_source
from jaxgen.data.images import adm_center_crop
from jaxgen.data.sources.latents import LatentSource, weights_identity
from jaxgen.errors import InputError
from jaxgen.models import AutoencoderKL, create_model, export_weights


def dit_center_crop_arr(pil_image, image_size):
    """facebookresearch/DiT train.py's center_crop_arr (from ADM), verbatim."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                                 resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


@pytest.mark.parametrize("shape", [(70, 50, 3), (33, 90, 3), (40, 40, 1)])
def test_adm_center_crop_is_dits_center_crop_arr(shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    pil = Image.fromarray(image[..., 0] if shape[2] == 1 else image)
    want = np.asarray(dit_center_crop_arr(pil, 16)).reshape(16, 16, shape[2])
    np.testing.assert_array_equal(adm_center_crop(image, 16), want)


TINY = dict(channels=(8, 8), layers_per_block=1, latent_channels=2, in_channels=1, num_groups=4)


@pytest.fixture(scope="module")
def tiny_vae():
    vae = AutoencoderKL(**TINY)
    variables = jax.jit(vae.init)(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))
    return vae, jax.tree.map(np.asarray, variables)


def _inputs(**changes) -> dict:
    vae_id = {"name": "tiny.safetensors", "size": 1, "sha256": "0" * 64}
    return {**dict(source="tiny", resolution=8, vae=vae_id, vae_model="vae-small", scale=1.0,
                   shift=0.0, unit_range=False, dtype="float32"), **changes}


@pytest.mark.parametrize("unit_range", [False, True])
def test_moments_are_the_vaes_of_each_image_and_its_mirror(tmp_path, tiny_vae, unit_range):
    vae, variables = tiny_vae
    images, labels = tiny_images(10)
    source = ArraySource(images, "tiny", labels)
    data = encode.encode_dataset(source, tmp_path / "lat", vae, variables,
                                 inputs=_inputs(unit_range=unit_range), batch_size=4,
                                 progress=False)
    # DiT feeds the VAE x / 127.5 - 1; EDM2's StabilityVAEEncoder.encode_pixels x / 255
    x = images.astype(np.float32) / 255 if unit_range else images.astype(np.float32) / 127.5 - 1
    for view, xs in enumerate([x, x[:, :, ::-1]]):
        mean, logvar = jax.jit(lambda v, x: vae.apply(v, x, method="encode"))(variables, xs)
        got = data.read_flipped(np.arange(10), np.full(10, bool(view)))[0]
        np.testing.assert_allclose(got, np.concatenate([mean, logvar], -1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(data.labels, labels)
    assert data.image_shape == (4, 4, 2) and len(data) == 10
    meta = json.loads((tmp_path / "lat" / "meta.json").read_text())
    assert meta["count"] == 10 and meta["latent_shape"] == [4, 4, 2] and meta["labels"]
    # open_source recognises the folder
    assert isinstance(open_source(str(tmp_path / "lat")), LatentSource)


def test_float16_moments_are_the_float32_ones_rounded_at_half_the_size(tmp_path, tiny_vae):
    vae, variables = tiny_vae
    images, labels = tiny_images(10)
    source = ArraySource(images, "tiny", labels)
    wide, half = (encode.encode_dataset(source, tmp_path / d, vae, variables,
                                        inputs=_inputs(dtype=d), batch_size=4, progress=False)
                  for d in ("float32", "float16"))
    m32, m16 = (np.load(tmp_path / d / "moments.npy", mmap_mode="r")
                for d in ("float32", "float16"))
    assert m16.dtype == np.float16 and m16.shape == m32.shape == (10, 2, 4, 4, 4)
    data_bytes = lambda m: Path(m.filename).stat().st_size - m.offset  # past the header
    assert data_bytes(m16) * 2 == data_bytes(m32) == 10 * 2 * 4 * 4 * 4 * 4
    np.testing.assert_array_equal(m16, m32.astype(np.float16))  # one rounding of each value
    assert json.loads((tmp_path / "float16" / "meta.json").read_text())["dtype"] == "float16"
    idx, flips = np.arange(10), np.arange(10) % 2 == 1
    got = half.read_flipped(idx, flips)[0]
    assert got.dtype == np.float32  # read, and computed on, in float32: widened exactly
    np.testing.assert_array_equal(got, wide.read_flipped(idx, flips)[0].astype(np.float16))


def test_a_dataset_written_before_dtype_and_unit_range_reads_and_resumes(tmp_path, tiny_vae):
    vae, variables = tiny_vae
    images, labels = tiny_images(4)
    source = ArraySource(images, "tiny", labels)
    encode.encode_dataset(source, tmp_path / "lat", vae, variables, inputs=_inputs(),
                          progress=False)
    meta_path = tmp_path / "lat" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["dtype"], meta["unit_range"]  # as jaxgen wrote them before these keys
    meta_path.write_text(json.dumps(meta))
    again = encode.encode_dataset(source, tmp_path / "lat", vae, variables, inputs=_inputs(),
                                  progress=False)  # the same inputs: finished, accepted
    assert again.read_flipped(np.arange(4), np.zeros(4, bool))[0].dtype == np.float32
    with pytest.raises(InputError, match=r"made with unit_range=False, not True"):
        encode.encode_dataset(source, tmp_path / "lat", vae, variables,
                              inputs=_inputs(unit_range=True), progress=False)


class _Interrupting(ArraySource):
    """Raises KeyboardInterrupt when asked for images at index ``stop`` or later."""

    stop = 10**9

    def read_with_labels(self, indices):
        if np.max(indices) >= self.stop:
            raise KeyboardInterrupt
        return super().read_with_labels(indices)


def test_an_interrupted_encoding_resumes_to_the_same_dataset(tmp_path, tiny_vae):
    vae, variables = tiny_vae
    images, labels = tiny_images(10)
    whole = encode.encode_dataset(ArraySource(images, "tiny", labels), tmp_path / "a", vae,
                                  variables, inputs=_inputs(), batch_size=4, progress=False)
    source = _Interrupting(images, "tiny", labels)
    source.stop = 6
    with pytest.raises(KeyboardInterrupt):
        encode.encode_dataset(source, tmp_path / "b", vae, variables, inputs=_inputs(),
                              batch_size=4, progress=False)
    assert json.loads((tmp_path / "b" / "progress.json").read_text()) == {"done": 4}
    with pytest.raises(InputError, match="stopped after 4 of 10"):
        LatentSource(tmp_path / "b")
    source.stop = 10**9
    resumed = encode.encode_dataset(source, tmp_path / "b", vae, variables, inputs=_inputs(),
                                    batch_size=4, progress=False)
    idx = np.arange(10)
    for flips in (np.zeros(10, bool), np.ones(10, bool)):
        np.testing.assert_array_equal(resumed.read_flipped(idx, flips)[0],
                                      whole.read_flipped(idx, flips)[0])


def test_a_dataset_of_other_inputs_or_a_foreign_folder_is_never_overwritten(tmp_path, tiny_vae):
    vae, variables = tiny_vae
    images, labels = tiny_images(4)
    source = ArraySource(images, "tiny", labels)
    encode.encode_dataset(source, tmp_path / "lat", vae, variables, inputs=_inputs(),
                          progress=False)
    before = (tmp_path / "lat" / "moments.npy").read_bytes()
    with pytest.raises(InputError, match=r"meta.json: made with scale=1.0, not 0.5"):
        encode.encode_dataset(source, tmp_path / "lat", vae, variables,
                              inputs=_inputs(scale=0.5), progress=False)
    with pytest.raises(InputError, match=r"meta.json: made with dtype='float32', not 'float16'"):
        encode.encode_dataset(source, tmp_path / "lat", vae, variables,
                              inputs=_inputs(dtype="float16"), progress=False)
    assert (tmp_path / "lat" / "moments.npy").read_bytes() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match="other files in it"):
        encode.encode_dataset(source, tmp_path / "other", vae, variables, inputs=_inputs(),
                              progress=False)


@pytest.mark.slow
def test_cli_encodes_and_reruns_as_a_no_op_and_wrong_weights_exit_2(tmp_path, data_file,
                                                                     tiny_vae, capsys):
    vae = create_model("vae-small")
    variables = jax.jit(vae.init)(jax.random.key(1), np.zeros((1, 8, 8, 1), np.float32))
    weights = tmp_path / "vae.safetensors"
    safetensors.numpy.save_file(export_weights(variables, vae), str(weights))
    argv = [data_file, str(tmp_path / "lat"), "--vae", str(weights), "--vae-model", "vae-small",
            "--resolution", "8", "--batch-size", "16"]
    assert encode.main(argv) == 0
    meta = json.loads((tmp_path / "lat" / "meta.json").read_text())
    assert meta["vae"] == weights_identity(weights) and meta["scale"] == 1.0
    assert meta["count"] == 64 and meta["latent_shape"] == [2, 2, 4]
    assert encode.main(argv) == 0
    assert "already finished" in capsys.readouterr().out
    edm2_like = [data_file, str(tmp_path / "lat16"), *argv[2:], "--unit-range", "--dtype",
                 "float16", "--scale", "0.5,0.25,1,2", "--shift", "1,-2,0.5,0"]
    assert encode.main(edm2_like) == 0
    meta = json.loads((tmp_path / "lat16" / "meta.json").read_text())
    assert (meta["scale"], meta["shift"]) == ([0.5, 0.25, 1, 2], [1, -2, 0.5, 0])
    assert meta["unit_range"] and meta["dtype"] == "float16"
    assert np.load(tmp_path / "lat16" / "moments.npy").dtype == np.float16
    small, small_vars = tiny_vae
    wrong = tmp_path / "tiny.safetensors"
    safetensors.numpy.save_file(export_weights(small_vars, small), str(wrong))
    from jaxgen import cli

    with pytest.raises(SystemExit) as e:
        cli.run(encode.main, [data_file, str(tmp_path / "lat2"), "--vae", str(wrong),
                              "--vae-model", "vae-small", "--resolution", "8"])
    assert e.value.code == 2
    assert not (tmp_path / "lat2").exists()
    with pytest.raises(SystemExit) as e:  # 3 scales for a VAE of 4 latent channels
        cli.run(encode.main, [*edm2_like[:1], str(tmp_path / "lat3"), *edm2_like[2:-4],
                              "--scale", "0.5,0.25,1"])
    assert e.value.code == 2 and not (tmp_path / "lat3").exists()
    assert "--scale=[0.5, 0.25, 1.0]: 3 values for a VAE of 4 latent channels" in \
        capsys.readouterr().err
