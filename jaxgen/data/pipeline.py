"""Training batches: deterministic global shuffling, per-process shards, resumable.

The stream of examples is a pure function of ``(seed, len(source))``:
epoch ``e`` visits the source in the order ``permutation_e`` drawn from
``numpy.random.default_rng([seed, e])`` and flips (when asked) the images
where ``default_rng([seed, e, 1]).random(N) < 0.5``. Global batch ``s`` is
positions ``[s * B, (s + 1) * B)`` of the concatenated epochs (a batch may
straddle two epochs; nothing is dropped or repeated), and process ``p`` of
``P`` reads rows ``[p * B / P, (p + 1) * B / P)`` of it, and only those.

So a global batch is the same whatever the number of processes, and the
iterator's whole state is the step count: :meth:`TrainIterator.get_state`
returns a small dict of ints to save in the checkpoint, and an iterator
built with that state yields exactly the batches an uninterrupted run would
have seen next (also after changing the number of hosts).

Batches are uint8 NHWC, as stored; :func:`to_model_space` maps them to
[-1, 1] on device. A latent dataset (:class:`jaxgen.data.sources.LatentSource`)
gives float32 posterior moments instead, its stored mirror view where flipped;
with ``with_images`` (a dataset of ``jaxgen.encode --keep-images``) ``image`` is
``{"moments": ..., "pixels": ...}``, the uint8 images the VAE saw, mirrored where
the moments are the mirror view's (REPA's encoder sees them).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxgen.data.images import pad_images
from jaxgen.data.prefetch import Prefetcher
from jaxgen.data.sources import ImageSource
from jaxgen.errors import InputError
from jaxgen.parallel import batch_sharding


def to_model_space(images: jax.Array) -> jax.Array:
    """uint8 images to float32 in [-1, 1]: ``x / 127.5 - 1``."""
    return images.astype(jnp.float32) / 127.5 - 1.0


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, n: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Visiting order and flip flags of one epoch."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    flips = np.random.default_rng([seed, epoch, 1]).random(n) < 0.5
    return order, flips


def global_positions(seed: int, n: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and flip flags at ``positions`` of the example stream.

    Args:
      seed: shuffling seed.
      n: number of examples in the source.
      positions: int64 positions in the concatenation of all epochs.

    Returns:
      ``(indices, flips)``, both shaped like ``positions``.
    """
    epochs, within = np.divmod(positions, n)
    indices = np.empty_like(positions)
    flips = np.empty(positions.shape, dtype=bool)
    for e in np.unique(epochs):
        order, flip = _epoch_order(seed, n, int(e))
        at = epochs == e
        indices[at] = order[within[at]]
        flips[at] = flip[within[at]]
    return indices, flips


@dataclasses.dataclass(frozen=True)
class _BatchMaker:
    """Everything a batch depends on; the prefetch thread holds this, not the iterator."""

    source: ImageSource
    batch_size: int
    seed: int
    process_index: int
    process_count: int
    flip: bool
    pad_to: int | None
    with_labels: bool
    mesh: Mesh | None
    with_images: bool = False

    def batch(self, step: int) -> dict:
        """This process's part of global batch ``step``."""
        rows = self.batch_size // self.process_count
        start = step * self.batch_size + self.process_index * rows
        positions = np.arange(start, start + rows, dtype=np.int64)
        indices, flips = global_positions(self.seed, len(self.source), positions)
        images, labels = self.source.read_flipped(indices, flips & self.flip)
        out = {"image": pad_images(images, self.pad_to)}
        if self.with_images:  # the latents' images, mirrored as the moments' views are
            pixels = self.source.read_images(indices, flips & self.flip)
            out["image"] = {"moments": out["image"], "pixels": pixels}
        if self.with_labels:
            out["label"] = labels.astype(np.int32)
        if self.mesh is not None:
            sharding, n = batch_sharding(self.mesh), self.process_count
            out = jax.tree.map(
                lambda v: jax.make_array_from_process_local_data(
                    sharding, v, (len(v) * n, *v.shape[1:])), out)
        return out


class TrainIterator(Iterator):
    """Endless, resumable iterator over this process's share of global training batches.

    Each item is a dict with ``image`` (uint8 ``[B / P, H, W, C]``, or a
    global ``jax.Array`` of shape ``[B, H, W, C]`` sharded over ``mesh``
    when one is given) and, with ``with_labels``, ``label`` (int32). A latent
    dataset's ``image`` holds moments; with ``with_images`` it is
    ``{"moments": ..., "pixels": uint8 [B / P, H, W, C]}`` (each a global array
    over ``mesh`` when one is given).
    """

    def __init__(
        self,
        source: ImageSource,
        batch_size: int,
        *,
        seed: int,
        flip: bool = False,
        pad_to: int | None = None,
        with_labels: bool = False,
        with_images: bool = False,
        process_index: int | None = None,
        process_count: int | None = None,
        mesh: Mesh | None = None,
        prefetch: int = 2,
        state: dict[str, int] | None = None,
    ):
        """Checks the arguments; the prefetch thread starts at the first ``next``.

        Args:
          source: the training images, already at their final size: resizing
            happens in the source (``open_source(spec, resolution=...)``).
          batch_size: global batch size ``B``, summed over processes.
          seed: shuffling and flipping seed.
          flip: flip each image horizontally with probability 1/2.
          pad_to: zero-pad images symmetrically to this square size, e.g.
            28 -> 32 for (Fashion-)MNIST.
          with_labels: include ``label``; the source must have labels.
          with_images: for a latent dataset that keeps its images
            (:attr:`jaxgen.data.sources.LatentSource.has_images`), serve them with the
            moments (see above).
          process_index: this process (default ``jax.process_index()``).
          process_count: processes sharing the batch (default
            ``jax.process_count()``); must divide ``batch_size``.
          mesh: when given, batches are global ``jax.Array`` sharded over its
            devices; ``batch_size`` must be a multiple of its size.
          prefetch: batches prepared ahead in a background thread (0: inline).
          state: a :meth:`get_state` dict to resume from.
        """
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self._prefetch = prefetch
        self._batches: Iterator | None = None
        if batch_size < 1 or batch_size % self.process_count:
            raise InputError(
                f"batch_size={batch_size} must be a positive multiple of the number of "
                f"processes ({self.process_count})."
            )
        if not 0 <= self.process_index < self.process_count:
            raise InputError(
                f"process_index={self.process_index} must lie in [0, {self.process_count})."
            )
        if mesh is not None and batch_size % mesh.size:
            raise InputError(
                f"batch_size={batch_size} must be a multiple of the mesh's {mesh.size} devices."
            )
        if with_labels and not source.has_labels:
            raise InputError(
                f"{source.name}: with_labels=True but the source has no labels (for a folder, "
                "pass labels_from_folders=True)."
            )
        if with_images and not getattr(source, "has_images", False):
            raise InputError(
                f"{source.name}: with_images=True, but it is not a latent dataset with its "
                "images; encode it with python -m jaxgen.encode --keep-images."
            )
        shape = source.image_shape
        if pad_to is not None:
            if shape is None:
                raise InputError(
                    f"pad_to={pad_to}: the images of {source.name} differ in size; open the "
                    "source with a resolution (data.resolution) so that they share one."
                )
            if pad_to < max(shape[0], shape[1]):
                raise InputError(
                    f"pad_to={pad_to} is smaller than the {max(shape[:2])}-pixel images of "
                    f"{source.name}; use pad_to >= the image size, or a smaller resolution."
                )
        self._plan = _BatchMaker(
            source=source,
            batch_size=batch_size,
            seed=seed,
            process_index=self.process_index,
            process_count=self.process_count,
            flip=flip,
            pad_to=pad_to,
            with_labels=with_labels,
            mesh=mesh,
            with_images=with_images,
        )
        self._step = 0
        if state is not None:
            self.set_state(state)

    @property
    def local_batch_size(self) -> int:
        """Rows of each global batch this process reads: ``batch_size / process_count``."""
        return self.batch_size // self.process_count

    @property
    def step(self) -> int:
        """Number of batches consumed so far."""
        return self._step

    @property
    def epoch(self) -> float:
        """Epochs consumed so far (fractional), for logging."""
        return self._step * self.batch_size / len(self.source)

    def get_state(self) -> dict[str, int]:
        """The iterator's position, JSON-serialisable, for the training checkpoint."""
        return {
            "step": self._step,
            "seed": self.seed,
            "num_examples": len(self.source),
            "batch_size": self.batch_size,
        }

    def set_state(self, state: dict[str, int]) -> None:
        """Resume at ``state`` (from :meth:`get_state` of an iterator over the same data)."""
        mine = self.get_state()
        for key in ("seed", "num_examples", "batch_size"):
            if int(state[key]) != mine[key]:
                raise InputError(
                    f"The checkpoint's data state has {key}={int(state[key])} but this run has "
                    f"{key}={mine[key]} ({self.source.name}); resume with the same data, seed "
                    "and batch size, or start the data stream afresh."
                )
        self.close()
        self._step = int(state["step"])

    def close(self) -> None:
        """Stop the prefetch thread; the next ``next`` starts a new one at :attr:`step`."""
        if isinstance(self._batches, Prefetcher):
            self._batches.close()
        self._batches = None

    def __next__(self) -> dict:
        if self._batches is None:
            plan, start = self._plan, self._step
            make = lambda: (plan.batch(s) for s in range(start, 2**62))
            self._batches = Prefetcher(make, self._prefetch) if self._prefetch > 0 else make()
        try:
            batch = next(self._batches)
        except BaseException:
            self.close()  # a later `next` retries this step rather than ending the stream
            raise
        self._step += 1
        return batch

    def batch(self, step: int) -> dict:
        """This process's part of global batch ``step`` (a pure function of ``step``)."""
        return self._plan.batch(step)

    def __del__(self) -> None:
        self.close()
