"""A latent dataset: VAE posterior moments of images and of their mirror images, on disk.

``python -m jaxgen.encode`` writes the folder; :class:`LatentSource` reads it
with random access (memory-mapped), so :class:`jaxgen.data.TrainIterator`
serves it in the same deterministic, sharded, resumable order as images.

The folder holds:

- ``meta.json``: :data:`FORMAT`, the inputs it was made from (source spec,
  image resolution, the VAE file's name, size and SHA-256, the VAE model name,
  the latent ``scale`` and ``shift`` a diffusion model trains with, whether the
  VAE saw images in [0, 1] (``unit_range``), the moments' ``dtype``), ``count``,
  ``latent_shape`` ``[h, w, c]`` and whether there are labels;
- ``moments.npy``: ``dtype`` (float32, or float16 at half the size; absent in
  older datasets: float32) ``[count, 2, h, w, 2c]``; ``[:, 0]`` is the image,
  ``[:, 1]`` its horizontal mirror; the last axis is ``mean`` then ``logvar``
  of the diagonal Gaussian posterior (DiT draws a fresh latent from it at
  every step);
- ``labels.npy``: int32 ``[count]`` (when the images have labels);
- ``images.npy`` (only with ``python -m jaxgen.encode --keep-images``; then
  ``meta.json`` has ``"images": true`` and ``"image_shape": [H, W, C]``): uint8
  ``[count, H, W, C]``, each image exactly as the VAE was given it (center-cropped
  and resized to ``resolution``, before gray is repeated to the VAE's channels).
  Only the image is stored: the VAE's mirror view ``[:, 1]`` was encoded from its
  exact left-right mirror ``[:, :, ::-1]``, which :meth:`LatentSource.read_images`
  returns for a flipped example. REPA's encoder sees these images
  (:mod:`jaxgen.train.repa`) while the model trains on the latents;
- ``progress.json``: ``{"done": k}``, the rows written so far (moments and
  images), replaced atomically after each batch; the dataset is finished when
  ``k == count``.

A dataset written without ``--keep-images`` has exactly the files and bytes it
had before images could be kept.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from jaxgen.data.sources.base import ImageSource
from jaxgen.errors import InputError
from jaxgen.files import sha256

FORMAT = "jaxgen-latents-1"
META, MOMENTS, LABELS, PROGRESS = "meta.json", "moments.npy", "labels.npy", "progress.json"
IMAGES = "images.npy"
DTYPES = ("float32", "float16")
"""Storage types of ``moments.npy``; reads are float32 either way."""


def is_latent_dataset(path: Path) -> bool:
    """Whether the folder ``path`` is a latent dataset (has a ``meta.json`` of :data:`FORMAT`)."""
    meta = path / META
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_meta(folder: Path) -> dict:
    """The ``meta.json`` of a latent dataset.

    Raises:
      InputError: missing, unreadable or of another format.
    """
    path = folder / META
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable latent dataset description ({e}).") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{path}: not a jaxgen latent dataset ({FORMAT}); write one with "
                         "python -m jaxgen.encode.")
    return meta


def rows_done(folder: Path) -> int:
    """Rows of ``moments.npy`` written so far (``progress.json``; 0 when absent)."""
    path = folder / PROGRESS
    if not path.is_file():
        return 0
    try:
        return int(json.loads(path.read_text())["done"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: unreadable progress record ({e}); delete it to encode "
                         "again from the start.") from e


def weights_identity(path: str | Path) -> dict:
    """``{"name", "size", "sha256"}`` of a weight file, or of every file in a weight folder.

    A folder (a diffusers model) is identified by the SHA-256 of its files'
    relative names and SHA-256s, in sorted order; its size is their total.

    Raises:
      InputError: when ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such VAE weight file or folder.")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digests = [(p.relative_to(path).as_posix() if path.is_dir() else "", sha256(p))
               for p in files]
    digest = digests[0][1] if not path.is_dir() else hashlib.sha256(
        "".join(f"{name}\0{h}\n" for name, h in digests).encode()).hexdigest()
    return {"name": path.name, "size": sum(p.stat().st_size for p in files), "sha256": digest}



class LatentSource(ImageSource):
    """A finished latent dataset, memory-mapped.

    Unlike an image source, reads return float32 posterior moments
    ``[n, h, w, 2c]`` (``mean`` then ``logvar`` on the last axis; float16 storage
    is widened exactly), and
    :attr:`image_shape` is the shape ``(h, w, c)`` of one latent, the model's
    input. :meth:`read_flipped` returns the moments stored for the mirror image;
    :meth:`read_images` the uint8 images the VAE saw, when the dataset keeps them
    (:attr:`has_images`).

    Attributes:
      folder: the dataset folder.
      meta: its ``meta.json``.
    """

    def __init__(self, folder: str | Path, resolution: int | None = None):
        """Opens ``folder``.

        Args:
          folder: a dataset written by ``python -m jaxgen.encode``.
          resolution: when given, the image resolution the dataset must have been
            encoded at (``data.resolution`` of a training config).

        Raises:
          InputError: an unfinished or damaged dataset, or another resolution.
        """
        self.folder = Path(folder)
        self.name = str(self.folder)
        self.meta = read_meta(self.folder)
        count, done = int(self.meta["count"]), rows_done(self.folder)
        if done != count:
            raise InputError(
                f"{self.folder}: encoding stopped after {done} of {count} images; run the "
                "same python -m jaxgen.encode command again to finish it."
            )
        if resolution is not None and resolution != self.meta["resolution"]:
            raise InputError(
                f"{self.folder / META}: encoded at resolution {self.meta['resolution']}, but "
                f"data.resolution={resolution}; set it to {self.meta['resolution']} or encode "
                "again."
            )
        try:
            self._moments = np.load(self.folder / MOMENTS, mmap_mode="r", allow_pickle=False)
            self._labels = (np.load(self.folder / LABELS, allow_pickle=False).astype(np.int32)
                            if self.meta["labels"] else None)
        except (OSError, ValueError) as e:
            raise InputError(f"{self.folder}: unreadable latent arrays ({e}); encode "
                             "again.") from e
        h, w, c = self.meta["latent_shape"]
        if self._moments.shape != (count, 2, h, w, 2 * c):
            raise InputError(f"{self.folder / MOMENTS}: shape {self._moments.shape}, but "
                             f"{META} says {(count, 2, h, w, 2 * c)}; encode again.")
        dtype = self.meta.get("dtype", "float32")
        if dtype not in DTYPES or self._moments.dtype != np.dtype(dtype):
            raise InputError(f"{self.folder / MOMENTS}: dtype {self._moments.dtype}, but "
                             f"{META} says {dtype!r} (one of {DTYPES}); encode again.")
        self._images = None
        if self.has_images:
            try:
                self._images = np.load(self.folder / IMAGES, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise InputError(f"{self.folder / IMAGES}: unreadable ({e}); encode again.") from e
            want = (count, *self.meta["image_shape"])
            if self._images.shape != want or self._images.dtype != np.uint8:
                raise InputError(f"{self.folder / IMAGES}: {self._images.dtype} "
                                 f"{self._images.shape}, but {META} says uint8 {want}; encode "
                                 "again.")

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def labels(self) -> np.ndarray | None:
        return self._labels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(h, w, c)`` of a latent (reads hold ``2c`` channels: mean and logvar)."""
        return tuple(self.meta["latent_shape"])

    @property
    def has_images(self) -> bool:
        """Whether the dataset keeps the encoded images (``jaxgen.encode --keep-images``)."""
        return bool(self.meta.get("images", False))

    def read_images(self, indices: np.ndarray, flips: np.ndarray | None = None) -> np.ndarray:
        """uint8 ``[n, H, W, C]``: the images ``indices`` as the VAE saw them, mirrored
        left-right where ``flips`` (the image of the stored mirror view's moments).

        Raises:
          InputError: the dataset keeps no images.
        """
        if self._images is None:
            raise InputError(f"{self.folder}: a latent dataset without its images; encode "
                             "it again with python -m jaxgen.encode --keep-images.")
        images = np.asarray(self._images[np.asarray(indices, dtype=np.int64)])  # a copy
        if flips is not None and np.any(flips):
            flips = np.asarray(flips, dtype=bool)
            images[flips] = images[flips][:, :, ::-1]
        return images

    def read_with_labels(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return self.read_flipped(indices, np.zeros(len(indices), bool))

    def read_flipped(
        self, indices: np.ndarray, flips: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Moments ``[n, h, w, 2c]`` of images ``indices``, of their mirrors where ``flips``."""
        indices = np.asarray(indices, dtype=np.int64)
        moments = np.asarray(self._moments[indices, np.asarray(flips, dtype=np.int64)],
                             np.float32)
        return moments, None if self._labels is None else self._labels[indices]
