"""Latent diffusion (Rombach et al. 2022): the model trains on scaled VAE latents, samples decode.

``config.latent`` (see :mod:`jaxgen.configs.base`) turns it on: ``vae`` the
autoencoder's weight file, ``vae_model`` its :func:`jaxgen.models.create_model`
name (``vae_kwargs`` overriding fields, for a small one), ``scale`` and
``shift`` (numbers, or one per latent channel as EDM2 uses), ``unit_range``
(the VAE's images are in [0, 1], not [-1, 1]). The training data is a latent
dataset of ``python -m jaxgen.encode`` (posterior moments); each step draws a
fresh latent from the posterior and scales it, as DiT does
(``vae.encode(x).latent_dist.sample().mul_(0.18215)``):

    z = scale * (mean + exp(logvar / 2) * eps - shift),   eps ~ N(0, I),

and a sample ``z`` becomes an image through ``decode(z / scale + shift)``.

EDM2 (NVlabs/edm2 ``training/encoders.py``, ``StabilityVAEEncoder``) normalises
per channel, ``z = x * s + b`` with ``s = final_std / raw_std`` and
``b = final_mean - raw_mean * s``; with ``final_mean = 0`` that is the form
above with ``scale = final_std / raw_std`` and ``shift = raw_mean``, and its
``decode`` ``(z - b) / s`` is ``z / scale + shift``. It also feeds the VAE
``x / 255`` and reads its output as [0, 1] (``unit_range``); images are then
mapped to model space [-1, 1] before jaxgen's one uint8 rule (EDM2 truncates,
``clamp(0, 1) * 255``, so its uint8 are at most one level lower).

A loss that needs the images too (REPA's encoder, :func:`wants_images`) trains
on a dataset of ``jaxgen.encode --keep-images``: its batches carry the uint8
images with the moments, and the step's ``x0`` is a :class:`LatentImages`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxgen.data.pipeline import to_model_space
from jaxgen.data.sources.latents import META, LatentSource, weights_identity
from jaxgen.errors import InputError
from jaxgen.models import AutoencoderKL, create_model, load_weights, micro_batched, sample_latent
from jaxgen.parallel import replicated


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` trains on latents (``latent.vae`` set; absent from older configs)."""
    return bool(config.get("latent") and config.latent.vae)


def wants_images(config: ml_collections.ConfigDict) -> bool:
    """Whether a latent run's batches must carry the images of their latents: REPA's
    encoder runs on them (``train.repa`` with a weight lambda > 0)."""
    from jaxgen.train import repa  # it imports this module

    return enabled(config) and repa.aligns(config)


def make_vae(config: ml_collections.ConfigDict) -> AutoencoderKL:
    """The autoencoder module of ``config.latent`` (no weights)."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v
              for k, v in dict(config.latent.get("vae_kwargs", {})).items()}
    vae = create_model(config.latent.vae_model, **kwargs)
    if not isinstance(vae, AutoencoderKL):
        raise InputError(f"latent.vae_model={config.latent.vae_model!r} is not an autoencoder; "
                         "use vae-sd, vae-sdxl or vae-small.")
    return vae


def channel_values(value: Any, channels: int, name: str) -> np.ndarray:
    """A latent scale or shift as float32 ``[channels]`` (a number is repeated).

    Args:
      value: a number, or a sequence of one number per latent channel.
      channels: the VAE's latent channels.
      name: what errors call it (``"latent.scale"``, ``"--shift"``); a scale may not be 0.

    Raises:
      InputError: not numbers, another count than 1 or ``channels``, not finite, a zero scale.
    """
    fix = f"give one number or {channels} (one per latent channel)"
    try:
        a = np.asarray(value, np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r}: not numbers; {fix}.") from None
    if a.size not in (1, channels):
        raise InputError(f"{name}={value!r}: {a.size} values for a VAE of {channels} latent "
                         f"channels; {fix}.")
    is_scale = name.endswith("scale")
    if not np.all(np.isfinite(a)) or (is_scale and np.any(a == 0)):
        raise InputError(f"{name}={value!r}: {fix}, finite{' and none 0' if is_scale else ''}.")
    return np.repeat(a, channels) if a.size == 1 else a


def latent_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """``(h, w, c)`` of a latent of a ``data.resolution`` image under ``config``'s VAE."""
    vae, r = make_vae(config), config.data.resolution
    if r is None or r % vae.factor:
        raise InputError(f"data.resolution={r}: a latent run needs the image resolution, a "
                         f"multiple of the VAE's factor {vae.factor}.")
    return (r // vae.factor, r // vae.factor, vae.latent_channels)


def check_dataset(config: ml_collections.ConfigDict, source) -> None:
    """Refuse latents made with another VAE, model, scale, shift or pixel range than
    ``config.latent``.

    Raises:
      InputError: naming the dataset's ``meta.json`` and the first difference; also a
        latent dataset in a pixel run, images in a latent run, or a dataset without
        its images in a run that needs them (:func:`wants_images`).
    """
    is_latent = isinstance(source, LatentSource)
    if not enabled(config):
        if is_latent:
            raise InputError(f"{source.name}: a latent dataset, but latent.vae is empty; set "
                             "--config.latent.vae=FILE (the VAE it was encoded with).")
        return
    if not is_latent:
        raise InputError(f"{source.name}: images, but latent.vae is set; encode them first "
                         "(python -m jaxgen.encode) and train on the latent folder.")
    meta, where = source.meta, source.folder / META
    vae = make_vae(config)
    c = vae.latent_channels
    mine = {"vae_model": config.latent.vae_model,
            "scale": channel_values(config.latent.scale, c, "latent.scale").tolist(),
            "shift": channel_values(config.latent.shift, c, "latent.shift").tolist(),
            "unit_range": bool(config.latent.get("unit_range", False))}
    theirs = {"vae_model": meta["vae_model"],
              "scale": channel_values(meta["scale"], c, f"{where}: scale").tolist(),
              "shift": channel_values(meta["shift"], c, f"{where}: shift").tolist(),
              "unit_range": bool(meta.get("unit_range", False))}
    for key in mine:
        if mine[key] != theirs[key]:
            raise InputError(f"{where}: encoded with {key}={meta.get(key, False)!r}, but "
                             f"latent.{key}={config.latent.get(key, False)!r}; use the "
                             "dataset's value or encode again.")
    vae_id = weights_identity(config.latent.vae)
    if vae_id["sha256"] != meta["vae"]["sha256"]:
        raise InputError(f"{where}: encoded with VAE {meta['vae']['name']} (sha256 "
                         f"{meta['vae']['sha256'][:12]}), but latent.vae={config.latent.vae} "
                         f"has sha256 {vae_id['sha256'][:12]}; give that VAE or encode again.")
    if wants_images(config) and not source.has_images:
        raise InputError(f"{source.folder}: train.repa's encoder sees the images, but this latent "
                         "dataset holds only their latents; encode it again with python -m "
                         "jaxgen.encode --keep-images (or set train.repa.encoder='').")


@dataclasses.dataclass(frozen=True, eq=False)
class LatentSpace:
    """A run's autoencoder, its weights and the latent scaling.

    Attributes:
      vae: the autoencoder module.
      variables: its weights (replicated over the run's mesh once loaded).
      scale, shift: float32 ``[c]``.
      unit_range: the VAE's images are in [0, 1] (EDM2), not [-1, 1].
      shards: devices a batch of latents is split over (large images are decoded
        one per device at a time, :func:`jaxgen.models.micro_batched`).
    """

    vae: AutoencoderKL
    variables: Any
    scale: np.ndarray
    shift: np.ndarray
    unit_range: bool = False
    shards: int = 1

    @functools.cached_property
    def decode(self):
        """``decode(variables, z) -> images`` in [-1, 1] (NHWC float32) of model-space
        latents ``z``: ``y = vae.decode(z / scale + shift)``, or ``2 y - 1`` for a [0, 1]
        VAE (the uint8 rule clips as EDM2's ``clamp(0, 1)`` does); one function object, so
        the compiled decoder is reused (the weights stay a traced argument)."""
        scale, shift = jnp.asarray(self.scale), jnp.asarray(self.shift)

        def decode(variables, z):
            pixels = z.shape[1] * z.shape[2] * self.vae.factor**2
            y = micro_batched(lambda u: self.vae.apply(variables, u, method="decode"),
                              z / scale + shift, pixels=pixels, shards=self.shards)
            return 2 * y - 1 if self.unit_range else y

        return decode


def load_latent_space(config: ml_collections.ConfigDict, mesh: Mesh) -> LatentSpace:
    """The :class:`LatentSpace` of ``config.latent``, its weights replicated over ``mesh``."""
    vae = make_vae(config)
    scale, shift = (channel_values(config.latent[k], vae.latent_channels, f"latent.{k}")
                    for k in ("scale", "shift"))
    variables = jax.device_put(load_weights(config.latent.vae, vae), replicated(mesh))
    return LatentSpace(vae, variables, scale, shift, bool(config.latent.get("unit_range", False)),
                       mesh.size)


def sample_latents(moments: jax.Array, key: jax.Array, scale: np.ndarray,
                   shift: np.ndarray) -> jax.Array:
    """A fresh scaled latent per example: ``scale * (mean + exp(logvar/2) eps - shift)``.

    Args:
      moments: ``[B, h, w, 2c]``, ``mean`` then ``logvar`` on the last axis.
      key: PRNG key of the draw.
      scale, shift: ``[c]``.
    """
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return jnp.asarray(scale) * (sample_latent(key, mean, logvar) - jnp.asarray(shift))


class LatentImages(NamedTuple):
    """The ``x0`` of a latent run whose loss needs the images too (:func:`wants_images`).

    Attributes:
      latents: the model's ``x0``, the scaled posterior draw ``[B, h, w, c]``.
      images: uint8 ``[B, H, W, C]``, the images those latents were encoded from (the
        mirror where the latents are the mirror view's).
    """

    latents: jax.Array
    images: jax.Array


def make_to_x0(config: ml_collections.ConfigDict, channels: int):
    """The train step's ``to_x0(batch_data, key) -> x0``: uint8 images to [-1, 1], or for a
    latent run (``channels`` latent channels) :func:`sample_latents` of the moments; with
    the images in the batch (``{"moments", "pixels"}``) and a loss that needs them
    (:func:`wants_images`), a :class:`LatentImages`."""
    if not enabled(config):
        return lambda images, key: to_model_space(images)
    scale, shift = (channel_values(config.latent[k], channels, f"latent.{k}")
                    for k in ("scale", "shift"))
    draw = lambda moments, key: sample_latents(moments, key, scale, shift)
    keep = wants_images(config)

    def to_x0(data, key):
        if not isinstance(data, dict):  # moments alone (a loss needing images refuses them)
            return draw(data, key)
        z = draw(data["moments"], key)
        return LatentImages(z, data["pixels"]) if keep else z

    return to_x0
