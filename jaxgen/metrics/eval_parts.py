"""An evaluation set split over JAX processes: each one's part, its batches, the rows gathered.

Process ``i`` of ``count`` reads the contiguous :func:`eval_part` of the
images (parts differ in size by at most one), :func:`iterate_eval` reads it
in batches, never padded or dropped, and :func:`gather_rows` puts the
per-image feature rows of every process back together in image order.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np

from jaxgen.data import ImageSource, Prefetcher
from jaxgen.errors import InputError


def eval_part(n: int, process_index: int = 0, process_count: int = 1) -> range:
    """The contiguous range of ``range(n)`` that process ``process_index`` evaluates.

    Parts differ in size by at most one and together cover every index once.
    """
    if not 0 <= process_index < process_count:
        raise InputError(
            f"process_index={process_index} must lie in [0, process_count={process_count})."
        )
    return range(n * process_index // process_count, n * (process_index + 1) // process_count)


def largest_part(n: int, process_count: int) -> int:
    """Images in the largest process part: every process runs as many batches as the
    process holding it (the others run idle steps), so each jitted step is collective."""
    return max(len(eval_part(n, i, process_count)) for i in range(process_count))


def iterate_eval(
    source: ImageSource,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
    with_labels: bool = False,
) -> Iterator[np.ndarray] | Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Every image of this process's part of ``source`` exactly once, in order.

    Batches hold ``batch_size`` images, the last one fewer (never padded,
    never dropped). The part is :func:`eval_part`; with several processes
    the parts, and so possibly the number of batches, differ by one image.
    A background thread reads up to ``prefetch`` batches ahead.

    Args:
      source: the images.
      batch_size: images per batch.
      process_index: this process (``jax.process_index()``).
      process_count: number of processes (``jax.process_count()``).
      prefetch: batches read ahead by the background thread; 0 reads inline.
      with_labels: yield ``(images, labels)`` instead of images.

    Yields:
      uint8 ``[b, H, W, C]`` batches (or ``(images, labels)`` pairs).
    """
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size} must be >= 1.")
    part = eval_part(len(source), process_index, process_count)
    starts = range(part.start, part.stop, batch_size)

    def batches() -> Iterator:
        for s in starts:
            images, labels = source.read_with_labels(np.arange(s, min(s + batch_size, part.stop)))
            yield (images, labels) if with_labels else images

    return Prefetcher(batches, prefetch) if prefetch > 0 else batches()


def gather_rows(x: np.ndarray, n_total: int) -> np.ndarray:
    """Concatenate every process's contiguous part of a feature array, in process order."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    width = largest_part(n_total, jax.process_count())
    padded = np.zeros((width, *x.shape[1:]), x.dtype)
    padded[: len(x)] = x
    everything = np.asarray(multihost_utils.process_allgather(padded))
    parts = [
        everything[i, : len(eval_part(n_total, i, jax.process_count()))]
        for i in range(jax.process_count())
    ]
    return np.concatenate(parts)
