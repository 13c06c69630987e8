"""Encode images to a latent dataset: VAE posterior moments of each image and of its mirror.

    python -m jaxgen.encode tfds:imagenet2012:train latents/in256 \\
        --vae sd-vae-ft-ema/ --vae-model vae-sd --resolution 256

EDM2's latents are of images in [0, 1] with a per-channel normalisation:
``--unit-range --scale S1,S2,S3,S4 --shift M1,M2,M3,M4`` (one number per latent
channel; the command with the official values is in ``jaxgen/configs/_edm2.py``).

Images are prepared as ADM and DiT prepare them (``center_crop_arr``: halve
with a BOX filter while the short side is at least twice the resolution,
BICUBIC-resize the short side to it, crop the centre), encoded with their
horizontal mirrors in batches split over this host's devices, and the
posterior ``mean`` and ``logvar`` stored in the folder OUT (layout in
:mod:`jaxgen.data.sources.latents`; ``--dtype float16`` halves its size,
rounding the moments to float16), with the labels. Train on OUT with
``config.latent`` set (:mod:`jaxgen.train.latent`). Gray images are repeated
to three channels for a colour VAE.

``--keep-images`` also stores each uint8 image the VAE was given (cropped and
resized; gray kept as one channel; the mirror view's image is its exact mirror,
made on read), as REPA (:mod:`jaxgen.train.repa`, sihyun-yu/REPA) needs: its
frozen encoder sees the images while the model trains on the latents. At
256 x 256 that is 192 KiB an image, 3x SD-VAE's float32 moments of both views.
Without the flag the folder is exactly as before.

OUT grows batch by batch with a progress record replaced atomically after
each; an interrupted run continues where it stopped when the same command is
run again. OUT is never overwritten: an OUT made from other inputs (another
source, resolution, VAE file or model, scale, shift, pixel range or dtype) is
refused (also one made with ``--keep-images`` when the rerun has not, or the
converse), a finished one left as it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from jaxgen import cli
from jaxgen.data.sources.latents import (
    FORMAT,
    IMAGES,
    LABELS,
    META,
    MOMENTS,
    PROGRESS,
    LatentSource,
    read_meta,
    rows_done,
    weights_identity,
)
from jaxgen.errors import InputError
from jaxgen.files import check_outputs, check_writable, open_atomic

INPUT_KEYS = ("source", "resolution", "vae", "vae_model", "scale", "shift", "unit_range",
              "dtype")
"""The fields of ``meta.json`` that say what a dataset was made from (a rerun must match)."""
ADDED_KEYS = {"unit_range": False, "dtype": "float32"}
"""Input keys that datasets written before them lack, with the value they then had."""


def numbers(text: str) -> float | list[float]:
    """A ``--scale``/``--shift`` value: one number, or comma-separated ones per latent channel."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a number or comma-separated numbers, one per latent channel"
        ) from None
    return values[0] if len(values) == 1 else values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(prog="python -m jaxgen.encode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="the images: any jaxgen.data.open_source spec")
    p.add_argument("out", type=Path, help="the latent dataset folder to write")
    p.add_argument("--vae", required=True, help="the VAE's weight file or diffusers folder")
    p.add_argument("--vae-model", default="vae-sd", help="a jaxgen.models vae-* name")
    p.add_argument("--resolution", type=int, required=True, help="image side after cropping")
    p.add_argument("--scale", type=numbers, default=None,
                   help="latent scale the diffusion model trains with (default: the VAE's); "
                        "a number or one per latent channel, comma-separated")
    p.add_argument("--shift", type=numbers, default=0.0,
                   help="z = scale * (x - shift); a number or one per latent channel")
    p.add_argument("--unit-range", action="store_true",
                   help="feed the VAE images in [0, 1] (EDM2), not [-1, 1] (LDM, DiT)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="storage of the moments (float16: half the size; read as float32)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (x2 with mirrors)")
    p.add_argument("--keep-images", action="store_true",
                   help="also store the uint8 images the VAE saw (for REPA's encoder)")
    p.add_argument("--labels-from-folders", action="store_true",
                   help="for an image folder: label images by top-level subfolder")
    return p.parse_args(argv)


def prepare_images(images: np.ndarray, in_channels: int, name: str,
                   unit_range: bool = False) -> np.ndarray:
    """uint8 NHWC images to float32 [-1, 1], or [0, 1] (``x / 255``, as EDM2's
    ``StabilityVAEEncoder.encode_pixels``) when ``unit_range``, with ``in_channels``
    channels (gray repeated)."""
    c = images.shape[-1]
    if c != in_channels:
        if c != 1:
            raise InputError(f"{name}: {c}-channel images for a VAE of {in_channels} channels.")
        images = np.repeat(images, in_channels, axis=-1)
    x = images.astype(np.float32)
    return x / 255 if unit_range else x / 127.5 - 1.0


def _check_existing(out: Path, inputs: dict, keep_images: bool = False) -> int | None:
    """Rows already written in ``out`` for the same ``inputs`` and ``keep_images``
    (``None``: a new dataset)."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise InputError(f"{out}: is a file; give a folder for the latent dataset.")
    if not (out / META).exists():
        if any(out.iterdir()):
            raise InputError(f"{out}: a folder with other files in it; give a new or empty "
                             "folder.")
        return None
    meta = {**ADDED_KEYS, **read_meta(out)}
    for key in INPUT_KEYS:
        if meta.get(key) != inputs[key]:
            raise InputError(f"{out / META}: made with {key}={meta.get(key)!r}, not "
                             f"{inputs[key]!r}; write to another folder (nothing is "
                             "overwritten).")
    if bool(meta.get("images", False)) != keep_images:
        made, now = ("with", "without") if meta.get("images") else ("without", "with")
        raise InputError(f"{out / META}: made {made} --keep-images, now asked {now}; write to "
                         "another folder (nothing is overwritten).")
    return rows_done(out)


def encode_dataset(
    source,
    out: str | Path,
    vae,
    variables,
    *,
    inputs: dict,
    batch_size: int = 64,
    progress: bool = True,
    keep_images: bool = False,
) -> LatentSource:
    """Write (or finish) the latent dataset ``out`` of ``source``'s images.

    Args:
      source: an :class:`jaxgen.data.ImageSource` of images of one size, a multiple
        of the VAE's factor (open it with ``resize_method="adm"``).
      out: the folder to write.
      vae: an :class:`jaxgen.models.AutoencoderKL`.
      variables: its weights.
      inputs: what the dataset is made from, recorded in ``meta.json``: the
        :data:`INPUT_KEYS` (``vae`` is a :func:`weights_identity`; ``unit_range``
        feeds the VAE images in [0, 1]; ``dtype`` ``"float32"`` or ``"float16"`` is
        the moments' storage).
      batch_size: images per batch (each is encoded with its mirror).
      progress: show a progress bar.
      keep_images: also store the uint8 images as read from ``source`` (``images.npy``,
        ``meta.json``'s ``images`` and ``image_shape``); without it the folder is exactly
        as it was before this option.

    Returns:
      The finished dataset, opened.

    Raises:
      InputError: an ``out`` made from other inputs, or not a dataset folder;
        images of a size or channel count the VAE cannot take.
    """
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from jaxgen.models import micro_batched
    from jaxgen.parallel import batch_sharding, make_mesh, pad_batch, replicated, to_host

    out = Path(out)
    done = _check_existing(out, inputs, keep_images)
    h, w, c = source.image_shape
    f, lc = vae.factor, vae.latent_channels
    if h % f or w % f:
        raise InputError(f"{source.name}: {h}x{w} images; the VAE needs sides divisible by {f}.")
    if c not in (1, vae.in_channels):
        raise InputError(f"{source.name}: {c}-channel images for a VAE of {vae.in_channels}.")
    n, shape = len(source), (h // f, w // f, lc)
    if done is None:
        check_writable(out, "OUT", folder=True)
        out.mkdir(parents=True, exist_ok=True)
        labels = source.labels
        meta = dict(format=FORMAT, **inputs, count=n, latent_shape=list(shape),
                    labels=labels is not None)
        np.lib.format.open_memmap(out / MOMENTS, "w+", np.dtype(inputs["dtype"]),
                                  (n, 2, *shape[:2], 2 * lc))
        if keep_images:  # keys added only here: without them meta.json is as before
            meta.update(images=True, image_shape=[h, w, c])
            np.lib.format.open_memmap(out / IMAGES, "w+", np.uint8, (n, h, w, c))
        if labels is not None:
            np.save(out / LABELS, np.asarray(labels, np.int32))
        _write_json(out / PROGRESS, {"done": 0})
        _write_json(out / META, meta)  # last: a folder with a meta.json is complete to resume
        done = 0
    if done < n:
        mesh = make_mesh(jax.local_devices())
        params = jax.device_put(variables, replicated(mesh))
        encode = jax.jit(  # the stored layout: mean, then logvar, on the last axis
            lambda p, x: micro_batched(
                lambda u: jnp.concatenate(vae.apply(p, u, method="encode"), axis=-1), x,
                pixels=x.shape[1] * x.shape[2], shards=mesh.size),
            out_shardings=batch_sharding(mesh))
        moments = np.load(out / MOMENTS, mmap_mode="r+")
        kept = np.load(out / IMAGES, mmap_mode="r+") if keep_images else None
        bar = tqdm(total=n, initial=done, unit="img", disable=not progress, file=sys.stderr)
        for start in range(done, n, batch_size):
            stop = min(start + batch_size, n)
            images = source.read(np.arange(start, stop))
            x = prepare_images(images, vae.in_channels, source.name, inputs["unit_range"])
            x, rows = pad_batch(np.concatenate([x, x[:, :, ::-1]]), mesh.size)
            y = to_host(encode(params, jax.device_put(x, batch_sharding(mesh))))[:rows]
            k = stop - start
            moments[start:stop] = np.stack([y[:k], y[k:]], axis=1)  # rounded to the dtype
            moments.flush()
            if kept is not None:  # the very uint8 images the VAE was fed
                kept[start:stop] = images
                kept.flush()
            _write_json(out / PROGRESS, {"done": stop})
            bar.update(k)
        bar.close()
        del moments, kept
    return LatentSource(out)


def _write_json(path: Path, value: dict) -> None:
    with open_atomic(path) as f:
        f.write((json.dumps(value, indent=1) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)
    cli.check_positive(args, "resolution", "batch_size")
    from jaxgen.data import open_source
    from jaxgen.models import AutoencoderKL, create_model, load_weights

    vae = create_model(args.vae_model)
    if not isinstance(vae, AutoencoderKL):
        raise InputError(f"--vae-model {args.vae_model}: not an autoencoder; use a vae-* name.")
    if args.resolution % vae.factor:
        raise InputError(f"--resolution {args.resolution}: must be a multiple of the VAE's "
                         f"factor {vae.factor}.")
    from jaxgen.train.latent import channel_values

    for flag in ("scale", "shift"):  # recorded as given; one number or one per channel
        if getattr(args, flag) is not None:
            channel_values(getattr(args, flag), vae.latent_channels, f"--{flag}")
    inputs = dict(source=args.source, resolution=args.resolution,
                  vae=weights_identity(args.vae), vae_model=args.vae_model,
                  scale=vae.scaling_factor if args.scale is None else args.scale,
                  shift=args.shift, unit_range=args.unit_range, dtype=args.dtype)
    done = _check_existing(args.out, inputs, args.keep_images)
    if done is not None and done == read_meta(args.out)["count"]:
        print(f"{args.out}: already finished, left as it is.")
        return 0
    if Path(args.source).exists():
        check_outputs({"OUT": args.out}, read_folders={"SOURCE": args.source})
    source = open_source(args.source, resolution=args.resolution, resize_method="adm",
                         labels_from_folders=args.labels_from_folders)
    variables = load_weights(args.vae, vae)
    dataset = encode_dataset(source, args.out, vae, variables, inputs=inputs,
                             batch_size=args.batch_size, keep_images=args.keep_images)
    print(f"wrote {args.out} ({len(dataset)} images, latents {dataset.image_shape})")
    return 0


if __name__ == "__main__":
    cli.run(main, split_cpu=True)
