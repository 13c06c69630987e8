"""Images held in an array: in memory, ``.npz`` (ADM layout) and memory-mapped ``.npy`` files."""

from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path

import numpy as np
from etils import epath

from jaxgen.data.sources.base import ImageSource, check_images, stack_images
from jaxgen.errors import InputError
from jaxgen.files import is_local


class ArraySource(ImageSource):
    """Images held in an array (in memory or memory-mapped): npz, npy and IDX files."""

    def __init__(
        self,
        images: np.ndarray,
        name: str,
        labels: np.ndarray | None = None,
        resolution: int | None = None,
        resize_method: str = "lanczos",
    ):
        """Wraps ``images`` after checking them (see :func:`check_images`).

        Args:
          images: uint8 ``[N, H, W, C]`` or ``[N, H, W]``.
          name: what to call the source in messages.
          labels: optional int ``[N]``.
          resolution: when set, images are center-cropped/resized to it on read.
          resize_method: a key of :data:`jaxgen.data.images.RESIZE_METHODS`.
        """
        self.name = name
        self._images = check_images(images, name)
        self._labels = None if labels is None else _check_labels(labels, len(self._images), name)
        self._resolution = resolution
        self._method = resize_method

    def __len__(self) -> int:
        return len(self._images)

    @property
    def labels(self) -> np.ndarray | None:
        return self._labels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        _, h, w, c = self._images.shape
        r = self._resolution
        return (h, w, c) if r is None else (r, r, c)

    def read_with_labels(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        indices = np.asarray(indices, dtype=np.int64)
        images = np.asarray(self._images[indices])
        if self._resolution is not None and images.shape[1:3] != (self._resolution,) * 2:
            images = stack_images(
                list(images), self._resolution, self._method, self.name, self.image_shape
            )
        return images, None if self._labels is None else self._labels[indices]


def _check_labels(labels: np.ndarray, n: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(
            f"{name}: labels have shape {labels.shape} and dtype {labels.dtype}, expected "
            f"integers of shape ({n},)."
        )
    return labels.astype(np.int32)


def open_npz(path: Path | epath.Path, resolution: int | None, method: str) -> ArraySource:
    """An ``.npz`` of images in ``arr_0`` (uint8 NHWC) and optional labels in ``arr_1``."""
    try:
        with path.open("rb") as raw, np.load(raw, allow_pickle=False) as z:
            keys = z.files
            if "arr_0" not in keys:
                if {"mu", "sigma"} <= set(keys):
                    raise InputError(
                        f"{path}: a statistics file (mu, sigma), not images; give it where "
                        "reference statistics are expected."
                    )
                raise InputError(
                    f"{path}: holds arrays {keys} but no arr_0; save images as "
                    "np.savez(path, images) (ADM layout: arr_0 uint8 NHWC)."
                )
            images = z["arr_0"]
            labels = z["arr_1"] if "arr_1" in keys else None
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise InputError(
            f"{path}: not a readable .npz ({type(e).__name__}: {e}); the file is corrupt or "
            "truncated, write it again."
        ) from e
    return ArraySource(images, str(path), labels, resolution, method)


def open_npy(path: Path | epath.Path, resolution: int | None, method: str) -> ArraySource:
    """An ``.npy`` of uint8 NHWC or NHW images, memory-mapped when local."""
    try:
        if is_local(path):
            images = np.load(path, mmap_mode="r", allow_pickle=False)
        else:  # a bucket has no memory map
            images = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(
            f"{path}: not a readable .npy ({type(e).__name__}: {e}); the file is corrupt or "
            "truncated, write it again."
        ) from e
    return ArraySource(images, str(path), None, resolution, method)
