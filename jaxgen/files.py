"""Files that jaxgen writes, on a local disk or in a bucket (``gs://BUCKET/...``), via epath.

Every file jaxgen writes goes through :func:`open_atomic` (statistics, converted
weights, JSON results, checkpoint metadata, samples) or :class:`GrowingFile` (logs).
Every path of a run (workdir, checkpoints, logs, samples, ``jaxgen.sample`` outputs) is an
:class:`etils.epath.Path`, as orbax's are: a local path behaves as a ``pathlib`` one, and
``gs://`` (or ``s3://``) reaches the bucket through ``tf.io.gfile`` if TensorFlow is
installed, else through fsspec's ``gcsfs`` (one of the two must be). ``pathlib.Path``
must never see a run folder: it reads ``gs://b/x`` as the local folder ``gs:/b/x``.

An object store is not a disk in two ways that matter here:

- It has no rename (a "rename" is a copy then a delete), but an object becomes visible
  only once its upload is complete, and replaces the previous one whole. So
  :func:`open_atomic` renames a temporary file over the target on disk, and uploads the
  target in one piece to a bucket; a reader sees the old content or the new one, never a
  part, either way.
- It has no append. :class:`GrowingFile` appends to a local file, and in a bucket keeps
  the content in memory and uploads all of it on every append.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from etils import epath


def is_local(path: epath.PathLike) -> bool:
    """Whether ``path`` is on a file system (local or mounted) rather than an object store."""
    return "://" not in os.fspath(path)


@contextlib.contextmanager
def open_atomic(path: epath.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: complete after the ``with`` block, or untouched.

    On disk the bytes go to a temporary file beside ``path``, renamed over it when the
    block ends and removed if it raises. For a bucket they go to a local temporary file,
    uploaded to ``path`` when the block ends: the object appears (or replaces the old one)
    only once the upload completes, whereas a rename there would copy the data again.
    The parent folder is created if missing.
    """
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_local(path):
        folder = os.fspath(path.parent)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
            os.replace(tmp, os.fspath(path))
        except BaseException:
            os.unlink(tmp)
            raise
    else:
        with tempfile.TemporaryFile() as f:
            yield f
            f.seek(0)
            with path.open("wb") as out:
                shutil.copyfileobj(f, out)


class GrowingFile:
    """A file that grows by whole records (``metrics.jsonl``, TensorBoard events).

    On disk each :meth:`append` is appended and flushed. In a bucket, which cannot append,
    the whole content is kept in memory and uploaded again by each :meth:`append` (an
    upload replaces the object whole, so readers see every record up to some append,
    never a partial one). That costs time quadratic in the number of records, as
    TensorFlow's own event writer on GCS does; a run's logs are kilobytes to a few
    megabytes. An existing file is continued, as when a run resumes.

    Args:
      path: the file (its folder is created if missing).
    """

    def __init__(self, path: epath.PathLike) -> None:
        self.path = epath.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if is_local(self.path):
            self._file, self._content = self.path.open("ab"), None
        else:
            self._file = None
            self._content = bytearray(self.path.read_bytes() if self.path.exists() else b"")

    def append(self, data: bytes) -> None:
        """Add ``data`` at the end; it is on disk or in the bucket when this returns."""
        if self._file is not None:
            self._file.write(data)
            self._file.flush()
        else:
            self._content += data
            self.path.write_bytes(bytes(self._content))

    def close(self) -> None:
        """Close the local file (a bucket's object is complete after each append)."""
        if self._file is not None:
            self._file.close()
