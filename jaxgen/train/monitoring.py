"""Sampling from a train state, image grids, and FID against cached reference statistics."""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from PIL import Image

from jaxgen import sampling
from jaxgen.data import ArraySource, FirstN, open_source, pad_images
from jaxgen.diffusion.distillation import progressive_times
from jaxgen.errors import InputError
from jaxgen.files import open_atomic
from jaxgen.metrics import GaussianStats, frechet_distance, save_stats
from jaxgen.metrics.eval_parts import iterate_eval
from jaxgen.metrics.evaluate import EvalInput, FeatureRequest, featurize
from jaxgen.metrics.features import FeatureExtractor
from jaxgen.train.consistency import cd_levels, cd_view, generator_steps
from jaxgen.train.state import RunParts


def class_labels(indices: np.ndarray, num_classes: int) -> np.ndarray:
    """The label of sample ``i`` of a run: ``i % num_classes`` (classes stay balanced)."""
    return (np.asarray(indices) % num_classes).astype(np.int32)


def sample_images(
    parts: RunParts,
    params,
    key: jax.Array,
    *,
    num: int,
    batch_size: int,
    solver: str,
    steps: int,
    cfg_scale: float = 1.0,
    solver_options: dict | None = None,
    guidance_options: dict | None = None,
    cache_interval: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield ``num`` uint8 samples of a run's model in batches, through
    :func:`jaxgen.sampling.generate` (the one generation loop).

    ``params`` stay an argument of the compiled program (the run's one
    ``parts.model_fn``), so every evaluation and every EMA reuses one
    compilation. Sample ``i`` depends only on ``(key, i)``; a class-conditional
    model draws it with label :func:`class_labels` ``(i)``. A latent run's
    samples are decoded through its VAE (:attr:`RunParts.latent`), on the mesh.

    Args:
      parts: the run's model and process.
      params: the weights to sample with (an EMA or the raw parameters).
      key: the run's sampling key.
      num: number of samples.
      batch_size: samples per device call.
      solver, steps: :func:`jaxgen.sampling.sample`'s solver and step count; a
        consistency model (:attr:`RunParts.is_consistency`) ignores ``solver`` and takes
        ``steps`` evaluations of :func:`jaxgen.sampling.consistency_sample`; a
        progressive-distillation student (``diffusion.loss = "pd"``) ignores it too and
        samples with deterministic DDIM on the times it was distilled for
        (:func:`jaxgen.diffusion.distillation.progressive_times`), as Salimans & Ho (2022);
        a DMD2 generator (:attr:`RunParts.is_dmd2_generator`) ignores it and takes its
        ``distill.generator_steps`` steps on :func:`jaxgen.sampling.generator_times`,
        sampled by :func:`jaxgen.sampling.consistency_sample` with forward re-noising
        (one step: ``G(z) = x0(sigma(t_max) z, t_max)`` with ``z`` the noise it draws for
        sample ``i``).
      cfg_scale: classifier-free guidance weight (1: none); needs a
        class-conditional model trained with label dropout.
      solver_options: solver-specific keywords.
      guidance_options: more :class:`jaxgen.sampling.Guidance` fields (``method``,
        ``interval``, ``rescale``, ``channels``, ``apg_*``, ``pag_scale``). The
        unconditional pass runs when ``cfg_scale != 1`` or ``method`` is not ``"cfg"``
        (CFG++ at ``lambda = 1`` still re-noises with the unconditional ``eps``);
        ``pag_scale`` alone is perturbed-attention guidance without it.
      cache_interval: feature caching, as for :func:`jaxgen.sampling.sample` (``None``: off).
    """
    if not np.isfinite(cfg_scale):
        raise InputError(f"cfg_scale={cfg_scale} must be a finite number (1: no guidance).")
    options = dict(guidance_options or {})
    method = options.get("method", "cfg")
    unconditional = cfg_scale != 1.0 or method != "cfg"
    if unconditional and not parts.num_classes:
        raise InputError(
            f"cfg_scale={cfg_scale} (method {method!r}) needs a class-conditional model; "
            "this one has no classes."
        )
    guidance = None
    if unconditional or options.get("pag_scale", 0.0):
        uncond = parts.null_cond if unconditional else None
        guidance = sampling.Guidance(cfg_scale, uncond=uncond, **options)
    model_fn, process = parts.model_fn, parts.process
    how = dict(prediction=parts.prediction, solver=solver, steps=steps, guidance=guidance,
               solver_options=solver_options, cache_interval=cache_interval)
    if parts.is_consistency or parts.is_dmd2_generator:
        # Algorithm 1 of Song et al. (2023): NFE = steps, no solver; a DMD2 generator
        # the same on its own times, re-noised by the forward process.
        what = "a consistency model" if parts.is_consistency else "a DMD2 generator"
        if guidance is not None or cache_interval is not None:
            raise InputError(f"cfg_scale={cfg_scale}, guidance {options}, cache_interval="
                             f"{cache_interval}: {what} samples without guidance or feature "
                             "caching; use cfg_scale 1, no options, no cache.")
        trained = generator_steps(parts.config)
        if parts.is_dmd2_generator and steps != trained:
            raise InputError(f"steps={steps}: this DMD2 run is a {trained}-step generator "
                             f"(distill.generator_steps={trained}); sample it with steps "
                             f"{trained} (jaxgen.sample --steps {trained}).")
        scm = parts.config.diffusion.get("loss") == "scm"
        if cd_view(parts.config):  # the model seen as a consistency function on EDM
            model_fn, process = parts.consistency_fn, cd_levels(parts.config, parts.process)
        ts = (sampling.consistency_times(process, steps, scm_sigma_data=(
                  parts.config.diffusion.sigma_data if scm else None))
              if parts.is_consistency else sampling.generator_times(process, steps))
        how = dict(sampler=sampling.consistency_sample, ts=ts,
                   prediction="x0" if cd_view(parts.config) else parts.prediction,
                   clean_output=parts.is_dmd2_generator)
    elif parts.config.diffusion.get("loss") == "pd":
        how.update(solver="ddim", solver_options=None,
                   grid=progressive_times(parts.process, steps))
    labels = None
    if parts.num_classes:
        labels = lambda idx: {"label": jnp.asarray(class_labels(idx, parts.num_classes))}
    latent = parts.latent
    decode = {} if latent is None else dict(decode=latent.decode, decode_params=latent.variables)
    return sampling.generate(
        model_fn, params, process, key, parts.image_shape,
        num=num, batch_size=batch_size, cond=labels, mesh=parts.mesh, **how, **decode,
    )


def image_grid(images: np.ndarray, cols: int = 8, pad: int = 2) -> np.ndarray:
    """Tile uint8 NHWC ``images`` into one ``[rows*(H+pad)+pad, cols*(W+pad)+pad, C]`` image."""
    n, h, w, c = images.shape
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h,
             pad + k * (w + pad) : pad + k * (w + pad) + w] = im
    return grid


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Write a uint8 ``[H, W, 1 or 3]`` image as PNG, locally or to ``gs://...``, atomically."""
    with open_atomic(path) as f:
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(f, format="png")


def reference_stats(
    spec: str,
    workdir: str | os.PathLike,
    extractor: FeatureExtractor,
    *,
    num: int | None = None,
    resolution: int | None = None,
    pad_to: int | None = None,
) -> GaussianStats:
    """Inception statistics of the reference images, computed once and cached in ``workdir``.

    Args:
      spec: the reference images (any :func:`jaxgen.data.open_source` spec).
      workdir: where ``fid_ref_<hash>.npz`` is kept (local or ``gs://...``).
      extractor: the Inception feature extractor.
      num: use only the first ``num`` images (default all).
      resolution, pad_to: the training pipeline's geometry, applied to the references.
    """
    key = f"{spec}|{num}|{resolution}|{pad_to}|{extractor.module.source}"
    path = epath.Path(workdir) / f"fid_ref_{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
    if path.exists():
        return GaussianStats.load(path)
    source = open_source(spec, resolution=resolution)  # resized as the training data is
    n = len(source) if num is None else min(num, len(source))
    print(f"computing FID reference statistics of {n} images of {source.name} -> {path}",
          file=sys.stderr)
    images = np.concatenate(list(iterate_eval(_first(source, n), 1000)))
    images = pad_images(images, pad_to)
    stats = featurize(EvalInput(spec, source=ArraySource(images, spec)), FeatureRequest(),
                      extractor, progress=jax.process_index() == 0)["pool3_stats"]
    if jax.process_index() == 0:
        save_stats(path, stats)
    return stats


def _first(source, n: int):
    return source if n == len(source) else FirstN(source, n)


def fid_of_samples(
    images: np.ndarray, reference: GaussianStats, extractor: FeatureExtractor
) -> float:
    """FID of uint8 ``images`` (the same on every process) against ``reference``."""
    stats = featurize(EvalInput("samples", source=ArraySource(images, "samples")), FeatureRequest(),
                      extractor, progress=False)["pool3_stats"]
    return frechet_distance(reference, stats)
