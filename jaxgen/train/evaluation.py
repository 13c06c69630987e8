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
from jaxgen.data import ArraySource, FirstN, center_crop_resize, iterate_eval, open_source
from jaxgen.errors import InputError
from jaxgen.files import open_atomic
from jaxgen.metrics import GaussianStats, frechet_distance, save_stats
from jaxgen.metrics.evaluate import FeatureNeeds, Side, featurize
from jaxgen.metrics.features import FeatureExtractor
from jaxgen.parallel import to_host
from jaxgen.train.state import Setup


def make_sampler(
    setup: Setup,
    batch_size: int,
    *,
    solver: str,
    steps: int,
    cfg_scale: float = 1.0,
    solver_options: dict | None = None,
):
    """A ``sampler(params, key, first_index, labels) -> uint8 [B, H, W, C]``.

    The parameters reach :func:`jaxgen.sampling.sample` as its ``params``
    argument, not as constants of the program, so one compilation serves
    every evaluation of a run and every EMA. Sample ``i`` depends only on
    ``(key, i)``, as in :func:`jaxgen.sampling.sample`.

    Args:
      setup: the run's model and process.
      batch_size: samples per call.
      solver, steps: :func:`jaxgen.sampling.sample`'s solver and step count.
      cfg_scale: classifier-free guidance weight (1: none); needs a
        class-conditional model trained with label dropout.
      solver_options: solver-specific keywords.
    """
    if cfg_scale != 1.0 and not setup.num_classes:
        raise InputError(f"cfg_scale={cfg_scale} needs a class-conditional model (num_classes>0).")
    shape = (batch_size, *setup.image_shape)
    guidance = None
    if cfg_scale != 1.0:
        guidance = sampling.Guidance(cfg_scale, uncond=setup.null_cond)
    # One function object for the run: the compiled program is cached on its identity.
    model_fn = lambda params, x_t, t, c: setup.apply(params, x_t, t, c)

    def sampler(params, key, first_index, labels):
        x, _ = sampling.sample(
            model_fn,
            setup.process,
            key,
            shape,
            prediction=setup.prediction,
            solver=solver,
            steps=steps,
            cond={"label": labels} if setup.num_classes else None,
            guidance=guidance,
            mesh=setup.mesh,
            solver_options=solver_options,
            first_index=first_index,
            params=params,
        )
        return sampling.to_uint8(x)

    return sampler


def generate(
    sampler, params, key: jax.Array, num: int, batch_size: int, num_classes: int
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yield ``(images, labels)`` host batches of ``num`` samples; labels cycle ``i % classes``.

    Every process receives every sample (they are small and FID splits them
    again by process).
    """
    for start in range(0, num, batch_size):
        idx = np.arange(start, start + batch_size)
        labels = (idx % num_classes).astype(np.int32) if num_classes else None
        images = sampler(params, key, start, None if labels is None else jnp.asarray(labels))
        images = to_host(images)[: min(batch_size, num - start)]
        yield images, None if labels is None else labels[: len(images)]


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


def match_geometry(images: np.ndarray, resolution: int | None, pad_to: int | None) -> np.ndarray:
    """Resize/pad reference images as the training pipeline does, so FID compares like with like."""
    if resolution is not None and images.shape[1:3] != (resolution, resolution):
        images = np.stack([center_crop_resize(im, resolution, "lanczos") for im in images])
    if pad_to is not None:
        h, w = images.shape[1:3]
        top, left = (pad_to - h) // 2, (pad_to - w) // 2
        images = np.pad(images, ((0, 0), (top, pad_to - h - top), (left, pad_to - w - left),
                                 (0, 0)))
    return images


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
    source = open_source(spec)
    n = len(source) if num is None else min(num, len(source))
    print(f"computing FID reference statistics of {n} images of {source.name} -> {path}",
          file=sys.stderr)
    images = np.concatenate(list(iterate_eval(_first(source, n), 1000)))
    images = match_geometry(images, resolution, pad_to)
    stats = featurize(Side(spec, source=ArraySource(images, spec)), FeatureNeeds(), extractor,
                      progress=jax.process_index() == 0)["pool3_stats"]
    if jax.process_index() == 0:
        save_stats(path, stats)
    return stats


def _first(source, n: int):
    return source if n == len(source) else FirstN(source, n)


def fid_of_samples(
    images: np.ndarray, reference: GaussianStats, extractor: FeatureExtractor
) -> float:
    """FID of uint8 ``images`` (the same on every process) against ``reference``."""
    stats = featurize(Side("samples", source=ArraySource(images, "samples")), FeatureNeeds(),
                      extractor, progress=False)["pool3_stats"]
    return frechet_distance(reference, stats)
