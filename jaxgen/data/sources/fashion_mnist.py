"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` copy when present, TFDS otherwise."""

from __future__ import annotations

from pathlib import Path

from jaxgen.data.sources.arrays import ArraySource
from jaxgen.data.sources.idx import open_idx
from jaxgen.data.sources.tfds import TfdsSource, open_tfds
from jaxgen.errors import InputError

# Debian's `dataset-fashion-mnist` package; a module variable so tests can point elsewhere.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def open_fashion_mnist(
    split: str,
    data_dir: str | None,
    download: bool,
    resolution: int | None,
    method: str,
) -> ArraySource | TfdsSource:
    """``split`` of Fashion-MNIST: the Debian copy at :data:`FASHION_MNIST_DIR` if it
    exists, else TFDS's ``fashion_mnist`` (``data_dir`` and ``download`` as :func:`open_tfds`)."""
    if FASHION_MNIST_DIR.is_dir():
        return _open_debian(split, resolution, method)
    return open_tfds("fashion_mnist", split, data_dir, download, resolution, method)


def _open_debian(split: str, resolution: int | None, method: str) -> ArraySource:
    if split not in _IDX_SPLIT_PREFIX:
        raise InputError(
            f"fashion_mnist:{split}: the Debian copy has splits {list(_IDX_SPLIT_PREFIX)}; use "
            "tfds slicing through a TFDS data dir for anything else."
        )
    path = FASHION_MNIST_DIR / f"{_IDX_SPLIT_PREFIX[split]}-images-idx3-ubyte.gz"
    if not path.exists():
        raise InputError(f"{path}: missing; reinstall Debian's dataset-fashion-mnist package.")
    name = f"fashion_mnist:{split} (Debian copy at {FASHION_MNIST_DIR})"
    return open_idx(path, name, resolution, method)
