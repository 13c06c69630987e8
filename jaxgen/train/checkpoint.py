"""Checkpoints with orbax: train state + data-iterator state + progress, atomic, keep last K.

Orbax writes each checkpoint to a temporary folder and renames it when
complete, so a crash mid-save leaves nothing a restore would pick up. A
checkpoint that is complete but unreadable (disk corruption, a truncated
copy) is reported, set aside as ``<step>.corrupt-<n>`` and the previous one
is used. ``directory`` may be in a bucket (``gs://...``), where orbax marks a complete
checkpoint with a commit file instead of a rename.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxgen.errors import InputError


class Checkpointer:
    """Saves and restores ``(state, extra)`` pairs under ``DIR/checkpoints``.

    ``extra`` is a JSON-safe dict (the data iterator's state, the training
    clock). Saves are synchronous: when :meth:`save` returns the checkpoint
    is complete on disk, which is what a preemption handler needs.

    Args:
      directory: checkpoint folder, local or ``gs://...``.
      keep: how many of the latest checkpoints to keep.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3) -> None:
        if keep < 1:
            raise InputError(f"checkpoint.keep={keep} must be >= 1.")
        directory = epath.Path(directory)
        # Orbax wants an absolute path; gs://... is one (absolute() would make it local).
        self.directory = directory if directory.is_absolute() else directory.absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, extra: dict) -> None:
        """Write the checkpoint of ``step`` (all processes call this together)."""
        if step in self._manager.all_steps():
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  extra=ocp.args.JsonSave(extra))
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()

    def restore_latest(self, target: Any) -> tuple[Any, dict, int] | None:
        """``(state, extra, step)`` of the newest readable checkpoint, or ``None`` if none.

        Args:
          target: the abstract state (``jax.ShapeDtypeStruct`` leaves with
            shardings) the arrays are restored into.
        """
        for step in reversed(self.steps()):
            args = ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                      extra=ocp.args.JsonRestore())
            try:
                restored = self._manager.restore(step, args=args)
            except Exception as e:  # orbax raises many types for unreadable files
                self._set_aside(step, e)
                continue
            return restored["state"], dict(restored["extra"]), step
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        print(
            f"warning: checkpoint {self.directory / str(step)} is unreadable "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "falling back to the previous one.",
            file=sys.stderr,
        )
        # Every process must see the same folders before any renames; only process 0 renames.
        from jax.experimental import multihost_utils

        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxgen corrupt checkpoint {step} seen")
        if jax.process_index() == 0:
            n = 0
            while (aside := self.directory / f"{step}.corrupt-{n}").exists():
                n += 1
            (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxgen corrupt checkpoint {step} set aside")
        self._manager.reload()

    def close(self) -> None:
        """Finish pending work and release the manager."""
        self._manager.close()
