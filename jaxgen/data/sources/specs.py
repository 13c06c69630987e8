"""Spec strings to image sources: :func:`open_source`.

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
- a latent dataset folder written by ``python -m jaxgen.encode`` (its
  ``meta.json`` says so): VAE posterior moments, not images
  (:class:`jaxgen.data.sources.latents.LatentSource`; ``resolution`` must be
  the one it was encoded at);
- ``fashion_mnist[:SPLIT]`` and ``tfds:fashion_mnist[:SPLIT]``: Debian's
  ``dataset-fashion-mnist`` copy at
  :data:`jaxgen.data.sources.fashion_mnist.FASHION_MNIST_DIR` when present,
  TFDS otherwise; the source's ``name`` says which.

The split defaults to ``train``. How colour modes and bit depths of image
files become uint8 arrays is the rule in :mod:`jaxgen.data.images`; decoding
and resizing run in a shared thread pool. Every bad
input raises :class:`jaxgen.errors.InputError` naming the file or spec and
the fix.
"""

from __future__ import annotations

import re
from pathlib import Path

from jaxgen.data.images import check_resize_method
from jaxgen.data.sources.arrays import ArraySource, open_npy, open_npz
from jaxgen.data.sources.base import ImageSource
from jaxgen.data.sources.fashion_mnist import open_fashion_mnist
from jaxgen.data.sources.folders import FolderSource
from jaxgen.data.sources.idx import open_idx
from jaxgen.data.sources.latents import LatentSource, is_latent_dataset
from jaxgen.data.sources.tfds import open_tfds
from jaxgen.errors import InputError
from jaxgen.files import as_path, is_local

_IDX_IMAGES = re.compile(r"idx3-ubyte(\.gz)?$")
_TFDS_SPEC = re.compile(r"^tfds:(?P<name>[\w./-]+(?::\d+\.\d+\.\d+)?)(?::(?P<split>.+))?$")
_FASHION_SPEC = re.compile(r"^fashion_mnist(?::(?P<split>.+))?$")


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
    return (open_npz if suffix == ".npz" else open_npy)(path, resolution, method)


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
        if name == "fashion_mnist":
            return open_fashion_mnist(
                split, tfds_data_dir, tfds_download, resolution, resize_method
            )
        return open_tfds(name, split, tfds_data_dir, tfds_download, resolution, resize_method)
    if spec.startswith("tfds:"):
        raise InputError(f"{spec}: expected tfds:NAME[:SPLIT], e.g. tfds:cifar10:test.")
    if not is_local(spec):
        return _open_in_bucket(spec, resolution, resize_method)
    path = Path(spec).expanduser()
    if (m := _FASHION_SPEC.match(spec)) and not path.exists():
        split = m["split"] or "train"
        return open_fashion_mnist(split, tfds_data_dir, tfds_download, resolution, resize_method)
    if not path.exists():
        raise InputError(
            f"{spec}: no such file or folder; give an image folder, .npz, .npy or IDX path, "
            "or tfds:NAME[:SPLIT] for a TFDS dataset."
        )
    if path.is_dir() and is_latent_dataset(path):
        return LatentSource(path, resolution)
    if path.is_dir():
        return FolderSource(
            path,
            labels_from_folders=labels_from_folders,
            skip_corrupt=skip_corrupt,
            resolution=resolution,
            resize_method=resize_method,
        )
    if path.suffix.lower() == ".npz":
        return open_npz(path, resolution, resize_method)
    if path.suffix.lower() == ".npy":
        return open_npy(path, resolution, resize_method)
    if _IDX_IMAGES.search(path.name):
        return open_idx(path, str(path), resolution, resize_method)
    raise InputError(
        f"{spec}: unknown file type; give an image folder, .npz (arr_0), .npy, "
        "*-idx3-ubyte[.gz] or tfds:NAME[:SPLIT]."
    )
