"""Image sources: random access to uint8 NHWC images from folders, arrays, IDX and TFDS.

:func:`open_source` turns a spec string into an :class:`ImageSource`:

- a folder of ``png/jpg/jpeg/webp/bmp`` files, searched recursively (hidden
  files and folders skipped, symlinks followed) in sorted order of their
  relative paths; files are decoded lazily, on :meth:`ImageSource.read`;
- an ``.npz`` in the ADM layout (``arr_0`` uint8 NHWC, optional ``arr_1``
  int labels) or an ``.npy`` of uint8 NHWC or NHW (grayscale), the latter
  memory-mapped;
- an IDX file (``*-idx3-ubyte`` or ``*-idx3-ubyte.gz``, the MNIST format),
  with labels from the sibling ``*-labels-idx1-ubyte[.gz]`` when present;
- ``tfds:NAME[:SPLIT]`` (``NAME`` may carry ``/config`` and ``:x.y.z``),
  read through ``tfds`` random-access data sources (array_record), images
  decoded by jaxgen like files;
- ``gs://...`` (through :mod:`jaxgen.files`): an ``.npz`` or ``.npy`` as above,
  read whole into memory;
- ``fashion_mnist[:SPLIT]`` and ``tfds:fashion_mnist[:SPLIT]``: Debian's
  ``dataset-fashion-mnist`` copy at :data:`FASHION_MNIST_DIR` when present,
  TFDS otherwise; the source's ``name`` says which.

The split defaults to ``train``. How colour modes and bit depths of image
files become uint8 arrays is the rule in :mod:`jaxgen.data.images`; decoding
and resizing run in a shared thread pool. Every bad
input raises :class:`jaxgen.errors.InputError` naming the file or spec and
the fix.
"""

from __future__ import annotations

import abc
import concurrent.futures
import gzip
import io
import os
import re
import struct
import threading
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from etils import epath
from PIL import Image

from jaxgen.data.images import (
    GRAY_MODES,
    IMAGE_EXTENSIONS,
    center_crop_resize,
    check_resize_method,
    pil_to_array,
)
from jaxgen.data.prefetch import Prefetcher
from jaxgen.errors import InputError
from jaxgen.files import as_path, is_local

# Debian's `dataset-fashion-mnist` package; a module variable so tests can point elsewhere.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_IMAGES = re.compile(r"idx3-ubyte(\.gz)?$")
_TFDS_SPEC = re.compile(r"^tfds:(?P<name>[\w./-]+(?::\d+\.\d+\.\d+)?)(?::(?P<split>.+))?$")
_FASHION_SPEC = re.compile(r"^fashion_mnist(?::(?P<split>.+))?$")

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _map(fn: Callable, items: Sequence) -> list:
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

    def read(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """uint8 ``[len(indices), H, W, C]`` with ``C`` in {1, 3}, in the order of ``indices``."""
        return self.read_with_labels(np.asarray(indices, dtype=np.int64))[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, n={len(self)}, shape={self.image_shape})"


def _stack(
    images: list[np.ndarray],
    resolution: int | None,
    method: str,
    name: str,
    empty_shape: tuple[int, int, int],
) -> np.ndarray:
    """Stack decoded ``[H, W, C]`` images, center-cropping/resizing them when asked."""
    if resolution is not None:
        images = _map(lambda im: center_crop_resize(im, resolution, method), images)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise InputError(
            f"{name}: images have different sizes {sorted(shapes)[:3]}; give a resolution "
            "(data.resolution in a training config) to center-crop and resize them to NxN."
        )
    if not images:
        return np.zeros((0, *empty_shape), np.uint8)
    return np.stack(images)


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
            images = _stack(
                list(images), self._resolution, self._method, self.name, self.image_shape
            )
        return images, None if self._labels is None else self._labels[indices]


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


def _check_labels(labels: np.ndarray, n: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(
            f"{name}: labels have shape {labels.shape} and dtype {labels.dtype}, expected "
            f"integers of shape ({n},)."
        )
    return labels.astype(np.int32)


def _probe(path: Path, full: bool) -> tuple[tuple[int, int], str] | str:
    """``((W, H), mode)`` of an image file, or the reason it is unreadable."""
    try:
        with Image.open(path) as im:
            if full:
                im.load()
            return im.size, im.mode
    except Exception as e:  # Pillow raises many types for bad files; any means a bad file.
        return f"{type(e).__name__}: {e}"


def _decode(
    file: Path | bytes, channels: int, resolution: int | None, method: str, name: str, fix: str
) -> np.ndarray:
    """Decode an image file (path or encoded bytes) by the mode rule, then crop/resize it."""
    try:
        with Image.open(io.BytesIO(file) if isinstance(file, bytes) else file) as im:
            image = pil_to_array(im, channels)
    except Exception as e:  # as in _probe
        raise InputError(f"{name}: cannot decode image ({type(e).__name__}: {e}); {fix}.") from e
    return image if resolution is None else center_crop_resize(image, resolution, method)


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
        probes = list(_thread_pool().map(lambda p: _probe(p, skip_corrupt), files))
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
        decode = lambda p: _decode(p, self._channels, self._resolution, self._method, p, fix)
        images = _stack(_map(decode, paths), None, self._method, self.name, self._shape)
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


class TfdsSource(ImageSource):
    """A TFDS split read through its random-access (array_record) data source."""

    def __init__(
        self,
        builder,
        split: str,
        name: str,
        resolution: int | None = None,
        resize_method: str = "lanczos",
    ):
        """Opens ``split`` of a prepared ``tfds`` builder.

        Args:
          builder: a prepared ``tfds.core.DatasetBuilder`` in array_record format.
          split: TFDS split string, slicing allowed (``train[:10%]``).
          name: what to call the source in messages.
          resolution: center-crop/resize every image to this square size;
            required when the images differ in size.
          resize_method: a key of :data:`jaxgen.data.images.RESIZE_METHODS`.
        """
        import tensorflow_datasets as tfds

        self.name = name
        self._builder = builder
        self._split = split
        self._resolution = resolution
        self._method = resize_method
        features = builder.info.features
        image_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
        if not image_keys:
            raise InputError(f"{name}: the dataset has no image feature ({list(features)}).")
        self._image_key = "image" if "image" in image_keys else image_keys[0]
        label = features["label"] if "label" in features else None
        self._label_key = "label" if isinstance(label, tfds.features.ClassLabel) else None
        h, w, c = features[self._image_key].shape
        self._channels = 3 if c in (None, 3, 4) else 1  # alpha dropped, as for files
        self._shape = (
            (resolution, resolution, self._channels)
            if resolution is not None
            else (h, w, self._channels)
            if h is not None and w is not None
            else None
        )
        try:
            num_examples = builder.info.splits[split].num_examples
        except (ValueError, KeyError) as e:
            raise InputError(f"{name}: {e}; pick one of {list(builder.info.splits)}.") from e
        if num_examples == 0:
            raise InputError(f"{name}: the split is empty; pick another split or slice.")
        # Images come back encoded and are decoded in the thread pool by the same mode
        # rule as files (TFDS itself would decode them one by one in this thread).
        self._ds = builder.as_data_source(
            split=split, decoders={self._image_key: tfds.decode.SkipDecoding()}
        )
        self._labels: np.ndarray | None = None
        self._labels_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ds)

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        return self._shape

    @property
    def has_labels(self) -> bool:
        return self._label_key is not None

    @property
    def labels(self) -> np.ndarray | None:
        """Labels of the whole split, read once on first use (a pass over the records)."""
        if self._label_key is None:
            return None
        with self._labels_lock:
            if self._labels is None:
                records = _get_items(self._ds, range(len(self._ds)))
                self._labels = np.array([r[self._label_key] for r in records], dtype=np.int32)
        return self._labels

    def read_with_labels(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        indices = [int(i) for i in indices]
        records = _get_items(self._ds, indices)
        fix = "the prepared data is corrupt; prepare the dataset again"
        decode = lambda ir: _decode(
            ir[1][self._image_key],
            self._channels,
            self._resolution,
            self._method,
            f"{self.name} example {ir[0]}",
            fix,
        )
        decoded = _map(decode, list(zip(indices, records, strict=True)))
        empty = self._shape or (0, 0, self._channels)
        images = _stack(decoded, None, self._method, self.name, empty)
        if self._label_key is None:
            return images, None
        return images, np.array([r[self._label_key] for r in records], dtype=np.int32)


def _get_items(ds, indices: Sequence[int]) -> list:
    getitems = getattr(ds, "__getitems__", None)
    return list(getitems(list(indices))) if getitems else [ds[i] for i in indices]


def _read_idx(path: Path) -> np.ndarray:
    """An IDX (MNIST format) file of unsigned bytes, optionally gzipped."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{path}: corrupt or truncated file ({e}); download it again.") from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise InputError(
            f"{path}: not an IDX file of unsigned bytes (bad magic number); expected the MNIST "
            "format (e.g. train-images-idx3-ubyte.gz)."
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError(f"{path}: truncated IDX header; download the file again.")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise InputError(
            f"{path}: IDX file has {len(raw)} bytes but its header {dims} needs {expected} "
            "(truncated or corrupt); download it again."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _open_idx(path: Path, name: str, resolution: int | None, method: str) -> ArraySource:
    images = _read_idx(path)
    if images.ndim != 3:
        raise InputError(
            f"{path}: IDX array has shape {images.shape}; an images file holds [N, H, W]."
        )
    labels = None
    for suffix in ("", ".gz"):
        stem = path.name.removesuffix(".gz").replace("images-idx3", "labels-idx1")
        candidate = path.with_name(stem + suffix)
        if candidate != path and candidate.exists():
            labels = _read_idx(candidate)
            if labels.shape != (len(images),):
                raise InputError(
                    f"{candidate}: {labels.shape} labels for {len(images)} images in {path}; "
                    "the two files must come from the same split."
                )
            break
    return ArraySource(images, name, labels, resolution, method)


def _open_npz(path: Path | epath.Path, resolution: int | None, method: str) -> ArraySource:
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


def _open_npy(path: Path | epath.Path, resolution: int | None, method: str) -> ArraySource:
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


def _open_fashion_mnist_debian(split: str, resolution: int | None, method: str) -> ArraySource:
    if split not in _IDX_SPLIT_PREFIX:
        raise InputError(
            f"fashion_mnist:{split}: the Debian copy has splits {list(_IDX_SPLIT_PREFIX)}; use "
            "tfds slicing through a TFDS data dir for anything else."
        )
    path = FASHION_MNIST_DIR / f"{_IDX_SPLIT_PREFIX[split]}-images-idx3-ubyte.gz"
    if not path.exists():
        raise InputError(f"{path}: missing; reinstall Debian's dataset-fashion-mnist package.")
    name = f"fashion_mnist:{split} (Debian copy at {FASHION_MNIST_DIR})"
    return _open_idx(path, name, resolution, method)


def _open_tfds(
    name: str,
    split: str,
    data_dir: str | None,
    download: bool,
    resolution: int | None,
    method: str,
) -> TfdsSource:
    spec = f"tfds:{name}:{split}"
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise InputError(
            f"{spec}: tensorflow-datasets is not installed; pip install 'jaxgen[tfds]'."
        ) from e
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise InputError(
            f"{spec}: no TFDS dataset called {name!r} (see tfds.list_builders()); for local "
            "files give a folder, .npz, .npy or IDX path instead."
        ) from e
    where = builder.data_dir
    if not builder.is_prepared():
        if not download:
            raise InputError(
                f"{spec}: not prepared in {where}; allow downloading, or prepare it with "
                f"`tfds build {name} --file_format=array_record`, or set TFDS_DATA_DIR."
            )
        try:
            builder.download_and_prepare(file_format="array_record")
        except Exception as e:  # network, disk and builder failures alike end here
            raise InputError(
                f"{spec}: could not download and prepare into {where} ({type(e).__name__}: "
                f"{e}); without network, prepare it elsewhere and copy the data dir, or use "
                "local files."
            ) from e
    file_format = str(builder.info.file_format)
    if "array_record" not in file_format.lower():
        raise InputError(
            f"{spec}: prepared in {where} as {file_format}, which has no random access; "
            f"re-prepare with `tfds build {name} --file_format=array_record` (another data_dir "
            "or after deleting this copy)."
        )
    return TfdsSource(builder, split, f"{spec} (TFDS at {where})", resolution, method)


def _open_in_bucket(spec: str, resolution: int | None, method: str) -> ArraySource:
    path = as_path(spec)
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".npy"):
        raise InputError(
            f"{spec}: in a bucket, only .npz and .npy files are read; copy image folders and "
            "IDX files to a local disk, or pack the images as an .npz (arr_0)."
        )
    if not path.is_file():
        raise InputError(f"{spec}: no such file.")
    return (_open_npz if suffix == ".npz" else _open_npy)(path, resolution, method)


def open_source(
    spec: str,
    *,
    labels_from_folders: bool = False,
    skip_corrupt: bool = False,
    resolution: int | None = None,
    resize_method: str = "lanczos",
    tfds_data_dir: str | None = None,
    tfds_download: bool = True,
) -> ImageSource:
    """Open the images named by ``spec`` (see the module docstring for the forms).

    Args:
      spec: a folder, ``.npz``, ``.npy`` or IDX path, ``gs://...`` ``.npz`` or ``.npy``,
        ``tfds:NAME[:SPLIT]`` or ``fashion_mnist[:SPLIT]``.
      labels_from_folders: for folders, label images by top-level subfolder.
      skip_corrupt: for folders, decode every file up front and skip bad ones
        with a warning instead of failing.
      resolution: center-crop and resize every image to ``resolution`` x
        ``resolution`` on read (needed for folders or datasets whose images
        differ in size).
      resize_method: named resampling filter, one of ``nearest``, ``box``,
        ``bilinear``, ``hamming``, ``bicubic``, ``lanczos``.
      tfds_data_dir: TFDS data dir (default: ``TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``).
      tfds_download: let TFDS download and prepare a missing dataset.

    Returns:
      An :class:`ImageSource`.

    Raises:
      InputError: on a missing path, unknown format or dataset, empty or
        corrupt data; the message names the file or spec and the fix.
    """
    check_resize_method(resize_method)
    if resolution is not None and resolution < 1:
        raise InputError(f"resolution={resolution} must be a positive image size.")
    if m := _TFDS_SPEC.match(spec):
        name, split = m["name"], m["split"] or "train"
        if name == "fashion_mnist" and FASHION_MNIST_DIR.is_dir():
            return _open_fashion_mnist_debian(split, resolution, resize_method)
        return _open_tfds(name, split, tfds_data_dir, tfds_download, resolution, resize_method)
    if spec.startswith("tfds:"):
        raise InputError(f"{spec}: expected tfds:NAME[:SPLIT], e.g. tfds:cifar10:test.")
    if not is_local(spec):
        return _open_in_bucket(spec, resolution, resize_method)
    path = Path(spec).expanduser()
    if (m := _FASHION_SPEC.match(spec)) and not path.exists():
        split = m["split"] or "train"
        if FASHION_MNIST_DIR.is_dir():
            return _open_fashion_mnist_debian(split, resolution, resize_method)
        return _open_tfds(
            "fashion_mnist", split, tfds_data_dir, tfds_download, resolution, resize_method
        )
    if not path.exists():
        raise InputError(
            f"{spec}: no such file or folder; give an image folder, .npz, .npy or IDX path, "
            "or tfds:NAME[:SPLIT] for a TFDS dataset."
        )
    if path.is_dir():
        return FolderSource(
            path,
            labels_from_folders=labels_from_folders,
            skip_corrupt=skip_corrupt,
            resolution=resolution,
            resize_method=resize_method,
        )
    if path.suffix.lower() == ".npz":
        return _open_npz(path, resolution, resize_method)
    if path.suffix.lower() == ".npy":
        return _open_npy(path, resolution, resize_method)
    if _IDX_IMAGES.search(path.name):
        return _open_idx(path, str(path), resolution, resize_method)
    raise InputError(
        f"{spec}: unknown file type; give an image folder, .npz (arr_0), .npy, "
        "*-idx3-ubyte[.gz] or tfds:NAME[:SPLIT]."
    )


class FirstN(ImageSource):
    """The first ``n`` images of another source (``--num-real`` / ``--num-fake``)."""

    def __init__(self, source: ImageSource, n: int) -> None:
        if not 1 <= n <= len(source):
            raise InputError(
                f"{source.name}: asked for the first {n} images but it holds {len(source)}; "
                f"give a count between 1 and {len(source)}."
            )
        self.source, self.n = source, n
        self.name = f"{source.name} (first {n})"

    def __len__(self) -> int:
        return self.n

    @property
    def labels(self) -> np.ndarray | None:
        labels = self.source.labels
        return None if labels is None else labels[: self.n]

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        return self.source.image_shape

    def read_with_labels(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.n):
            raise IndexError(f"index out of range for {self.name}")
        return self.source.read_with_labels(indices)


def eval_part(n: int, process_index: int = 0, process_count: int = 1) -> range:
    """The contiguous range of ``range(n)`` that process ``process_index`` evaluates.

    Parts differ in size by at most one and together cover every index once.
    """
    if not 0 <= process_index < process_count:
        raise InputError(
            f"process_index={process_index} must lie in [0, process_count={process_count})."
        )
    return range(n * process_index // process_count, n * (process_index + 1) // process_count)


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
