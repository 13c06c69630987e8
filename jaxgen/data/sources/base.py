"""What every image source shares: the :class:`ImageSource` interface, input checks, stacking.

Decoding and resizing of many images run in one shared thread pool
(:func:`thread_map`); Pillow releases the GIL there.
"""

from __future__ import annotations

import abc
import concurrent.futures
import os
import threading
from collections.abc import Callable, Sequence

import numpy as np

from jaxgen.data.images import center_crop_resize
from jaxgen.errors import InputError

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def thread_map(fn: Callable, items: Sequence) -> list:
    """``[fn(x) for x in items]`` in the shared thread pool (Pillow releases the GIL)."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    return list(_thread_pool().map(fn, items))


def _thread_pool() -> concurrent.futures.ThreadPoolExecutor:
    """One shared pool for file probing and decoding (Pillow releases the GIL there)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=min(16, (os.cpu_count() or 1) + 2), thread_name_prefix="jaxgen-decode"
            )
        return _pool


class ImageSource(abc.ABC):
    """Random access to a fixed, ordered set of uint8 NHWC images.

    Attributes:
      name: human-readable description (a path, or a dataset with where it
        was read from).
    """

    name: str

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of images."""

    @abc.abstractmethod
    def read_with_labels(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Images ``indices`` and their int32 labels (``None`` without labels), one fetch."""

    @property
    @abc.abstractmethod
    def labels(self) -> np.ndarray | None:
        """int32 ``[len(self)]`` labels, or ``None`` when the dataset has none."""

    @property
    @abc.abstractmethod
    def image_shape(self) -> tuple[int, int, int] | None:
        """``(H, W, C)`` of every image, or ``None`` when only known once read."""

    @property
    def has_labels(self) -> bool:
        """Whether the images have labels (without reading them)."""
        return self.labels is not None

    def read_flipped(
        self, indices: np.ndarray, flips: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Like :meth:`read_with_labels`, the examples where ``flips`` mirrored left-right.

        A source that stores both views of each example (latents encoded from
        the image and from its mirror) returns the stored one instead.
        """
        images, labels = self.read_with_labels(indices)
        if flips.any():
            if not images.flags.owndata or not images.flags.writeable:
                images = images.copy()  # never write into a source's own memory
            images[flips] = images[flips][:, :, ::-1]
        return images, labels

    def read(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """uint8 ``[len(indices), H, W, C]`` with ``C`` in {1, 3}, in the order of ``indices``."""
        return self.read_with_labels(np.asarray(indices, dtype=np.int64))[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, n={len(self)}, shape={self.image_shape})"


def stack_images(
    images: list[np.ndarray],
    resolution: int | None,
    method: str,
    name: str,
    empty_shape: tuple[int, int, int],
) -> np.ndarray:
    """Stack decoded ``[H, W, C]`` images, center-cropping/resizing them when asked."""
    if resolution is not None:
        images = thread_map(lambda im: center_crop_resize(im, resolution, method), images)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise InputError(
            f"{name}: images have different sizes {sorted(shapes)[:3]}; give a resolution "
            "(data.resolution in a training config) to center-crop and resize them to NxN."
        )
    if not images:
        return np.zeros((0, *empty_shape), np.uint8)
    return np.stack(images)


def check_images(images: np.ndarray, name: str) -> np.ndarray:
    """Check an image array and return it as ``[N, H, W, C]`` (a view, never a copy).

    Args:
      images: uint8 ``[N, H, W, C]`` with ``C`` in {1, 3}, or ``[N, H, W]``.
      name: the file or argument to name in messages.

    Raises:
      InputError: on a non-uint8 dtype (NaN named), a wrong rank or channel
        count, or no images.
    """
    if images.dtype != np.uint8:
        if np.issubdtype(images.dtype, np.floating) and np.isnan(images).any():
            raise InputError(
                f"{name}: array contains NaN (dtype {images.dtype}); jaxgen reads uint8 images in "
                "[0, 255]; regenerate the samples or drop the NaN images first."
            )
        raise InputError(
            f"{name}: array has dtype {images.dtype}, expected uint8 in [0, 255]; convert model "
            "outputs in [-1, 1] with np.clip(np.floor((x + 1) * 127.5 + 0.5), 0, 255)"
            ".astype(np.uint8)."
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise InputError(
            f"{name}: array has shape {images.shape}, expected [N, H, W, C] (NHWC) or [N, H, W]."
        )
    c = images.shape[3]
    if c not in (1, 3):
        hint = (
            "looks channels-first; transpose with x.transpose(0, 2, 3, 1)"
            if images.shape[1] in (1, 3)
            else "drop alpha with x[..., :3]"
            if c == 4
            else "give 1 (gray) or 3 (RGB) channels"
        )
        raise InputError(f"{name}: array has shape {images.shape} with {c} channels; {hint}.")
    if len(images) == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise InputError(f"{name}: array has shape {images.shape}, which holds no images.")
    return images

