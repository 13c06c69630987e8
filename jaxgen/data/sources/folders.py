"""A folder of image files, searched recursively, probed on opening and decoded lazily.

Files with the extensions of :data:`jaxgen.data.images.IMAGE_EXTENSIONS`
are found below the folder (hidden files and folders skipped, symlinks
followed) in sorted order of their relative paths. Opening reads only their
headers (or decodes each once with ``skip_corrupt``); images are decoded by
:func:`jaxgen.data.images.decode_image` on :meth:`FolderSource.read`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from jaxgen.data.images import GRAY_MODES, IMAGE_EXTENSIONS, decode_image
from jaxgen.data.sources.base import ImageSource, stack_images, thread_map
from jaxgen.errors import InputError


def _probe(path: Path, full: bool) -> tuple[tuple[int, int], str] | str:
    """``((W, H), mode)`` of an image file, or the reason it is unreadable."""
    try:
        with Image.open(path) as im:
            if full:
                im.load()
            return im.size, im.mode
    except Exception as e:  # Pillow raises many types for bad files; any means a bad file.
        return f"{type(e).__name__}: {e}"


class FolderSource(ImageSource):
    """A folder of image files, decoded lazily in a thread pool."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        labels_from_folders: bool = False,
        skip_corrupt: bool = False,
        resolution: int | None = None,
        resize_method: str = "lanczos",
    ):
        """Lists and probes the folder's images (headers only, unless ``skip_corrupt``).

        Args:
          root: the folder.
          labels_from_folders: label each image by its top-level subfolder,
            classes numbered in sorted order of their names.
          skip_corrupt: decode every file once now and skip (with a warning)
            those that fail; otherwise only headers are read now, a bad header
            raises, and a file that fails later raises on read.
          resolution: center-crop/resize every image to this square size;
            required when the images differ in size.
          resize_method: a key of :data:`jaxgen.data.images.RESIZE_METHODS`.
        """
        self.root = Path(root)
        self.name = str(root)
        self._resolution = resolution
        self._method = resize_method
        files = _list_images(self.root)
        if not files:
            raise InputError(
                f"{root}: no image files ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) found in "
                "this folder or below; check the path."
            )
        probes = thread_map(lambda p: _probe(p, skip_corrupt), files)
        bad = [(p, r) for p, r in zip(files, probes, strict=True) if isinstance(r, str)]
        if bad and not skip_corrupt:
            listed = "; ".join(f"{p} ({r})" for p, r in bad[:3])
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise InputError(
                f"{root}: {len(bad)} unreadable image file(s): {listed}{more}; remove them or "
                "pass skip_corrupt=True to open_source to skip them."
            )
        if bad:
            warnings.warn(
                f"{root}: skipping {len(bad)} unreadable image file(s): "
                + "; ".join(f"{p} ({r})" for p, r in bad),
                stacklevel=3,
            )
        good = [(p, r) for p, r in zip(files, probes, strict=True) if not isinstance(r, str)]
        if not good:
            raise InputError(f"{root}: every image file is unreadable; check the folder.")
        self.files = [p for p, _ in good]
        self._channels = 1 if all(mode in GRAY_MODES for _, (_, mode) in good) else 3
        sizes = {size for _, (size, _) in good}
        if len(sizes) > 1 and resolution is None:
            (p0, (s0, _)) = good[0]
            p1, (s1, _) = next((p, r) for p, r in good if r[0] != s0)
            raise InputError(
                f"{root}: images differ in size ({p0.name} is {s0[0]}x{s0[1]}, {p1.name} is "
                f"{s1[0]}x{s1[1]}); resize them to one size, or pass resolution=N to "
                "open_source (data.resolution in a training config) to center-crop and resize "
                "them to NxN."
            )
        w, h = next(iter(sizes))
        r = resolution
        self._shape = (h, w, self._channels) if r is None else (r, r, self._channels)
        self.class_names: list[str] | None = None
        self._labels = None
        if labels_from_folders:
            tops = [p.relative_to(self.root).parts for p in self.files]
            loose = [p for p, parts in zip(self.files, tops, strict=True) if len(parts) == 1]
            if loose:
                raise InputError(
                    f"{root}: labels_from_folders needs every image in a class subfolder, but "
                    f"{loose[0].name} lies directly in the folder; move it into one."
                )
            self.class_names = sorted({parts[0] for parts in tops})
            index = {c: i for i, c in enumerate(self.class_names)}
            self._labels = np.array([index[parts[0]] for parts in tops], dtype=np.int32)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def labels(self) -> np.ndarray | None:
        return self._labels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._shape

    def read_with_labels(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        indices = np.asarray(indices, dtype=np.int64)
        paths = [self.files[i] for i in indices]
        fix = (
            "remove it, or open the folder with skip_corrupt=True, which decodes every file up "
            "front and skips bad ones"
        )
        decode = lambda p: decode_image(p, self._channels, self._resolution, self._method, p, fix)
        images = stack_images(thread_map(decode, paths), None, self._method, self.name, self._shape)
        return images, None if self._labels is None else self._labels[indices]


def _list_images(root: Path) -> list[Path]:
    found = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [
            Path(folder, n)
            for n in names
            if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
        ]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())
