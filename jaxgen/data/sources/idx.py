"""IDX files (the MNIST format), optionally gzipped, with their sibling labels file."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from jaxgen.data.sources.arrays import ArraySource
from jaxgen.errors import InputError


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


def open_idx(path: Path, name: str, resolution: int | None, method: str) -> ArraySource:
    """An ``*-images-idx3-ubyte[.gz]`` file, labelled by its ``*-labels-idx1-ubyte[.gz]``."""
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
