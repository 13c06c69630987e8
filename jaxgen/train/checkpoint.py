"""Checkpoints with orbax: train state + data-iterator state + progress, atomic, checksummed,
keep last K.

Orbax writes each checkpoint to a temporary folder and renames it when
complete, so a crash mid-save leaves nothing a restore would pick up. Once a
checkpoint is complete, process 0 records the SHA-256 of each of its files in
``<step>/jaxgen_checksums.json``; a restore verifies them first, so flipped or
truncated bytes are caught before they reach the weights. A checkpoint that
fails its checksums or cannot be read is reported in one line and the previous
one is used; a trainer (``writable=True``) also sets it aside as
``<step>.corrupt-<n>``, a reader never renames or writes anything. A checkpoint
that reads correctly but does not fit the model is not corruption: that is an
:class:`InputError` and nothing is set aside. ``directory`` may be in a bucket
(``gs://...``), where orbax marks a complete checkpoint with a commit file
instead of a rename.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxgen.errors import InputError
from jaxgen.files import open_atomic, sha256

CHECKSUMS = "jaxgen_checksums.json"


def _digests(folder: epath.Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (but the checksum file), by relative path."""
    def files(d: epath.Path):  # epath has no recursive glob on buckets
        for p in sorted(d.iterdir()):
            yield from files(p) if p.is_dir() else (p,)

    out = {}
    for path in files(folder):
        rel = os.fspath(path)[len(os.fspath(folder)) + 1 :]
        if rel == CHECKSUMS:
            continue
        out[rel] = sha256(path)
    return out


class _Corrupt(Exception):
    """A checkpoint whose bytes are not the ones that were saved."""


@contextlib.contextmanager
def _quiet():
    """Orbax and absl log a failed read at length; jaxgen says it in one line instead."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax", "jax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _disk_error(error: BaseException | None) -> OSError | None:
    """``error`` as an ``OSError`` when it is a failed write: an ``OSError`` itself, or
    TensorStore's ``RESOURCE_EXHAUSTED ... [os_error_code='28']`` (a ``ValueError``), which
    is how orbax reports a full disk while it writes arrays."""
    if isinstance(error, OSError):
        return error
    code = re.search(r"os_error_code='(\d+)'", str(error)) if error is not None else None
    if code:
        n = int(code.group(1))
        return OSError(n, os.strerror(n))
    return None


class _DropPropagatedWriteErrors(logging.Filter):
    """Orbax's writer threads log a failed write (a full disk) with its whole traceback,
    then :meth:`Checkpointer.wait` raises the same error in the training thread, where it
    becomes one line; the logged copies are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not ("orbax" in record.pathname and _disk_error(error) is not None)


logging.getLogger("absl").addFilter(_DropPropagatedWriteErrors())


class Checkpointer:
    """Saves and restores ``(state, extra)`` pairs under ``DIR/checkpoints``.

    ``extra`` is a JSON-safe dict (the data iterator's state, the training
    clock). Saves are asynchronous: :meth:`save` returns once the arrays are
    copied off the devices, and the files are written in the background while
    training goes on; :meth:`wait` (and :meth:`close`) return when every
    checkpoint is complete on disk and checksummed, which is what a preemption
    handler needs. Nothing is created before the first save.

    Args:
      directory: checkpoint folder, local or ``gs://...``.
      keep: how many of the latest checkpoints to keep.
      writable: a trainer's checkpointer (saves, and sets corrupt checkpoints
        aside); ``False`` for readers such as ``jaxgen.sample``.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3, *,
                 writable: bool = True) -> None:
        if keep < 1:
            raise InputError(f"checkpoint.keep={keep} must be >= 1.")
        directory = epath.Path(directory)
        # Orbax wants an absolute path; gs://... is one (absolute() would make it local).
        self.directory = directory if directory.is_absolute() else directory.absolute()
        self.writable = writable
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=False, enable_async_checkpointing=True,
            read_only=not writable,
            # A trainer (which holds the workdir's lock) removes the temporary folders of
            # saves that never completed (a kill, a full disk); they hold no checkpoint.
            cleanup_tmp_directories=writable,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._unsummed: list[int] = []

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, extra: dict) -> None:
        """Start writing the checkpoint of ``step`` (all processes call this together)."""
        if not self.writable:
            raise InputError(f"{self.directory}: opened read-only; nothing can be saved.")
        if step in self._manager.all_steps():
            return
        self.wait()
        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  extra=ocp.args.JsonSave(extra))
        self._unsummed.append(step)
        with self._write_errors(None):  # may report an earlier save's failure: no step named
            self._manager.save(step, args=args, force=True)

    def wait(self) -> None:
        """Return when every checkpoint started is complete on disk, with its checksums.

        Raises:
          OSError: a checkpoint could not be written (a full disk); it names the
            checkpoint's folder. The checkpoints completed before it are intact.
        """
        pending, self._unsummed = self._unsummed, []
        with self._write_errors(pending[-1] if pending else None):
            self._manager.wait_until_finished()
            if jax.process_index() == 0:
                for step in pending:
                    folder = self.directory / str(step)
                    if folder.exists():  # not already dropped by keep=K
                        digests = json.dumps(_digests(folder), indent=0).encode()
                        with open_atomic(folder / CHECKSUMS) as f:
                            f.write(digests)

    def verify(self, step: int) -> None:
        """Check ``step``'s files against their recorded checksums (none recorded: accepted).

        Raises:
          _Corrupt: a file is missing, added or changed.
        """
        folder = self.directory / str(step)
        recorded = folder / CHECKSUMS
        if not recorded.exists():
            return
        try:
            want = json.loads(recorded.read_text())
        except ValueError as e:
            raise _Corrupt(f"{CHECKSUMS} unreadable ({e})") from None
        got = _digests(folder)
        bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        if bad:
            raise _Corrupt(f"{len(bad)} file(s) differ from their checksums, e.g. {bad[0]}")

    def restore_latest(self, target: Any) -> tuple[Any, dict, int] | None:
        """``(state, extra, step)`` of the newest intact checkpoint, or ``None`` if none.

        Args:
          target: the abstract state (``jax.ShapeDtypeStruct`` leaves with
            shardings) the arrays are restored into.

        Raises:
          InputError: an intact checkpoint does not fit ``target`` (another model).
        """
        self.wait()
        for step in reversed(self.steps()):
            try:
                self.verify(step)
                verified = (self.directory / str(step) / CHECKSUMS).exists()
                with _quiet():
                    restored = self._restore(step, target)
            except _Corrupt as e:
                self._skip(step, str(e))
                continue
            except Exception as e:  # orbax raises many types for unreadable files
                if verified:  # the bytes are the saved ones: the model differs
                    raise InputError(
                        f"{self.directory / str(step)} is intact but does not fit this model "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); use the "
                        "configuration (and module) it was trained with, or a new --workdir."
                    ) from None
                self._skip(step, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            return restored["state"], dict(restored["extra"]), step
        return None

    def _restore(self, step: int, target: Any) -> dict:
        """Orbax's restore of ``step`` into ``target``, also for an older layout of the state.

        A checkpoint saved before a field of a dataclass ``target`` existed
        (:attr:`jaxgen.train.TrainState.constants`, ``.phema`` and ``.target``,
        ``None`` when unused) lacks it, and orbax refuses a target with a key the
        checkpoint lacks, even an empty one: such a checkpoint is restored
        without the target's ``None`` fields it lacks, which stay ``None``.
        """
        args = lambda item: ocp.args.Composite(state=ocp.args.StandardRestore(item),
                                               extra=ocp.args.JsonRestore())
        try:
            return self._manager.restore(step, args=args(target))
        except ValueError:  # a tree that differs from the saved one
            fields = ({f.name: getattr(target, f.name) for f in dataclasses.fields(target)}
                      if dataclasses.is_dataclass(target) else {})
            saved = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
            unused = [name for name, value in fields.items()
                      if value is None and name not in saved.tree]
            if not unused:
                raise
        item = {name: value for name, value in fields.items() if name not in unused}
        restored = self._manager.restore(step, args=args(item))  # raises if it still differs
        state = type(target)(**restored["state"], **dict.fromkeys(unused))
        return {"state": state, "extra": restored["extra"]}

    def _skip(self, step: int, why: str) -> None:
        aside = " and set aside" if self.writable else ""
        print(f"warning: checkpoint {self.directory / str(step)} is corrupt ({why}); skipped"
              f"{aside}, falling back to the previous one.", file=sys.stderr)
        if not self.writable:
            return
        # Every process must see the same folders before any renames; only process 0 renames.
        from jax.experimental import multihost_utils

        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxgen corrupt checkpoint {step} seen")
        if jax.process_index() == 0:
            n = 0
            while (aside_path := self.directory / f"{step}.corrupt-{n}").exists():
                n += 1
            (self.directory / str(step)).rename(aside_path)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxgen corrupt checkpoint {step} set aside")
        self._manager.reload()

    @contextlib.contextmanager
    def _write_errors(self, step: int | None):
        """A failed write becomes an ``OSError`` naming the checkpoint's folder (orbax's
        carry no path), after the manager's background writers are stopped (left
        running, they print thousands of lines as the interpreter exits)."""
        try:
            yield
        except Exception as e:
            error = _disk_error(e)
            if error is None:
                raise
            self._unsummed = []
            with contextlib.suppress(Exception), _quiet():
                self._manager.close()
            folder = self.directory / str(step) if step is not None else self.directory
            where = error.filename if error.filename is not None else os.fspath(folder)
            raise OSError(error.errno, error.strerror or str(error), where) from e

    def close(self) -> None:
        """Finish pending work (checksums included) and release the manager."""
        self.wait()
        self._manager.close()
