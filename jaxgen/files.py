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

Entry points check their outputs before any work: :func:`check_outputs` refuses an output
that is an input or another output (paths compared resolved, see :func:`same_path`), and
:func:`check_writable` a place where nothing can be written; :func:`as_path` turns a
missing bucket backend into one line. A written file keeps the mode of the file it
replaces; a new one gets the mode the user's umask gives.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from typing import BinaryIO

from etils import epath

from jaxgen.errors import InputError


def sha256(path: epath.PathLike) -> str:
    """Hex SHA-256 of the file at ``path`` (local or ``gs://``), read in 4 MiB chunks."""
    h = hashlib.sha256()
    with as_path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def is_local(path: epath.PathLike) -> bool:
    """Whether ``path`` is on a file system (local or mounted) rather than an object store."""
    return "://" not in os.fspath(path)


def as_path(spec: epath.PathLike) -> epath.Path:
    """``spec`` as an :class:`etils.epath.Path`; for a bucket, after checking it can be reached.

    Raises:
      InputError: for ``gs://`` (or another object store) when no backend for it is
        installed (neither TensorFlow nor fsspec's ``gcsfs``): one line naming the ``gcs``
        extra, instead of an ImportError from deep inside the first read or write.
    """
    path = epath.Path(spec)
    if not is_local(spec):
        try:
            path.exists()
        except ImportError as e:
            scheme = os.fspath(spec).split("://", 1)[0]
            fix = "; pip install 'jaxgen[gcs]'" if scheme == "gs" else ""
            raise InputError(
                f"{spec}: no backend for {scheme}:// is installed ({e}){fix}."
            ) from None
    return path


def _canonical(path: epath.PathLike) -> str:
    """One spelling per place: local paths resolved (symlinks, ``.``, ``..``), bucket keys
    normalised (``//``, ``.``, ``..``)."""
    path = os.fspath(path)
    if is_local(path):
        return os.path.realpath(os.path.expanduser(path))
    scheme, rest = path.split("://", 1)
    return f"{scheme}://{posixpath.normpath('/' + rest)[1:]}"


def same_path(a: epath.PathLike, b: epath.PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same file (through symlinks, ``./`` forms, hard links)."""
    if _canonical(a) == _canonical(b):
        return True
    if is_local(a) and is_local(b):
        try:
            return os.path.samefile(a, b)
        except OSError:  # one of them does not exist (yet): different places
            return False
    return False


def check_outputs(
    outputs: Mapping[str, epath.PathLike],
    inputs: Mapping[str, epath.PathLike] | None = None,
    read_folders: Mapping[str, epath.PathLike] | None = None,
) -> None:
    """Refuse outputs that would overwrite an input, land in a folder that is read, or
    share a path with each other; call it before any work.

    Args:
      outputs: files the command writes, by the flag that names them (``{"--json": p}``).
      inputs: files or folders it reads, by name (``{"REAL": p}``).
      read_folders: folders whose content it reads, by name; no output may lie inside one.

    Raises:
      InputError: naming both paths.
    """
    named = list(outputs.items())
    for i, (flag, out) in enumerate(named):
        for label, source in (inputs or {}).items():
            if same_path(out, source):
                raise InputError(
                    f"{flag} {out}: is the input {label} ({source}); write to another path."
                )
        for label, folder in (read_folders or {}).items():
            inner, outer = _canonical(out), _canonical(folder)
            if inner == outer or inner.startswith(outer.rstrip("/") + "/"):
                raise InputError(
                    f"{flag} {out}: lies in {label} {folder}, which is read; write elsewhere."
                )
        for other_flag, other in named[i + 1 :]:
            if same_path(out, other):
                raise InputError(
                    f"{flag} {out}: is also {other_flag} ({other}); give them different paths."
                )


def check_writable(path: epath.PathLike, flag: str, *, folder: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: a folder where a file is
    expected (or a file where a folder is), a parent that is a file, a place where no file
    can be created (permissions, a read-only disk), a bucket without its backend.

    Nothing is left behind: the test file created in the nearest existing folder is removed.
    A bucket's permissions are only known at the first write.

    Args:
      path: the file (or, with ``folder``, the folder) the command will write.
      flag: how the user named it (``--out``), for the message.
      folder: ``path`` is a folder that will hold the outputs.

    Raises:
      InputError: one line naming ``path`` and the cause.
    """
    where = as_path(path)
    if not is_local(path):
        if not folder and where.is_dir():
            raise InputError(f"{flag} {path}: is a folder; give a file path inside it.")
        return
    target = os.path.realpath(os.fspath(where))
    if os.path.isdir(target) and not folder:
        raise InputError(f"{flag} {path}: is a folder; give a file path inside it.")
    if os.path.exists(target) and folder and not os.path.isdir(target):
        raise InputError(f"{flag} {path}: is a file, not a folder.")
    parent = target if folder else os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"{flag} {path}: {parent} is a file, not a folder.")
    probe = os.path.join(parent, f".jaxgen-probe-{secrets.token_hex(8)}")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise InputError(
            f"{flag} {path}: cannot create files in {parent} ({e.strerror})."
        ) from None
    os.unlink(probe)


def describe_os_error(e: OSError) -> str:
    """One line for a failed file operation: the path, the cause and, when the disk is
    full, the space left on it."""
    where = e.filename if e.filename is not None else "a file"
    line = f"{where}: {e.strerror or e}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT) and e.filename is not None and is_local(where):
        folder = os.path.dirname(os.path.abspath(os.fspath(where)))
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        line += f" ({_size(shutil.disk_usage(folder).free)} free on the disk of {folder})"
    return line


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _create_beside(target: str) -> tuple[int, str]:
    """A new temporary file in ``target``'s folder, with the mode ``target`` has, else the
    one the user's umask gives a new file (``mkstemp``'s 0600 would stick to the result)."""
    folder, name = os.path.split(target)
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # minus the umask
            break
        except FileExistsError:
            continue
    try:
        os.fchmod(fd, stat.S_IMODE(os.stat(target).st_mode))
    except FileNotFoundError:
        pass
    return fd, tmp


@contextlib.contextmanager
def open_atomic(path: epath.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: complete after the ``with`` block, or untouched.

    On disk the bytes go to a temporary file beside ``path``, renamed over it when the
    block ends and removed if it raises. The result has the mode of the file it replaces,
    or for a new file the one the umask gives; a symlink stays a symlink, its target is
    replaced. For a bucket they go to a local temporary file,
    uploaded to ``path`` when the block ends: the object appears (or replaces the old one)
    only once the upload completes, whereas a rename there would copy the data again.
    The parent folder is created if missing. A failed write raises ``OSError`` naming
    ``path`` (a full disk says so only at a write, which names no file).
    """
    path = as_path(path)
    if is_local(path):
        target = os.path.realpath(os.fspath(path))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = _create_beside(target)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
            os.replace(tmp, target)
        except BaseException as e:
            os.unlink(tmp)
            if isinstance(e, OSError) and e.errno is not None and e.filename is None:
                raise OSError(e.errno, e.strerror, os.fspath(path)) from e
            raise
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
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
        self.path = as_path(path)
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
