"""A run's folder: its saved configuration is compared before anything is written, and a
lock keeps a second trainer out.

A rerun in a workdir continues that run. Fields that only say how long or how
often (``train.num_steps`` with a constant schedule, ``train.minutes``, logging,
checkpoint and evaluation cadence, multi-host addresses) may change; any other
difference (model, process, optimizer, data, seed, EMA decays) would restore
weights into another experiment, so it is refused with the differing fields
named, unless the user asks for it (``allow_change``).

The lock is ``WORKDIR/.lock`` (JSON: host, pid, time), created exclusively and
refreshed while the run trains. A lock whose process is dead (on this host, or
on any host of a multi-host run) or that has not been refreshed for
:data:`STALE_SECONDS` is taken over with one line on stderr.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
import time
from typing import Any

import jax
import numpy as np
from etils import epath

from jaxgen.errors import InputError
from jaxgen.files import is_local, open_atomic

# May change when a run continues: how long and how often, not what is trained.
RESUMABLE = ("train.num_steps", "train.minutes", "train.log_every", "checkpoint.every_steps",
             "checkpoint.keep", "eval.", "parallel.")
STALE_SECONDS = 600.0  # a live run refreshes its lock at least every minute


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


@functools.cache
def _base_defaults() -> dict[str, Any]:
    """Every field of the shared base recipe as ``config.json`` stores it, flattened."""
    from jaxgen.configs import base

    return _flatten(json.loads(base.get_config().to_json_best_effort()))


def config_differences(saved: dict, new: dict) -> list[str]:
    """``field: saved -> new`` for every field that differs and may not change on resume.

    ``train.num_steps`` may change unless the learning rate follows a cosine
    or the loss is iCT's (whose length it sets: the curriculum ``N(k)``). A field the
    saved configuration lacks, because the run started before jaxgen had it, counts as
    unchanged while the new value is the base recipe's default (``jaxgen/configs/base.py``),
    which keeps the old behaviour.
    """
    a, b = _flatten(saved), _flatten(new)
    defaults = _base_defaults()
    fixed = lambda k: not k.startswith(RESUMABLE) or (
        k == "train.num_steps" and (b.get("optim.schedule") == "cosine"
                                    or b.get("diffusion.loss") == "ict"))
    added = lambda k: k not in a and k in defaults and b.get(k) == defaults[k]
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
            for k in sorted(a.keys() | b.keys())
            if fixed(k) and a.get(k) != b.get(k) and not added(k)]


def check_config(workdir: epath.Path, config_json: str, allow_change: bool = False) -> bool:
    """Compare ``config_json`` with ``WORKDIR/config.json``; nothing is written.

    Returns:
      Whether ``config.json`` must be (re)written: the workdir is new, or only
      resumable fields (or, with ``allow_change``, any field) differ.

    Raises:
      InputError: the saved configuration differs in a field that may not
        change; the message names the fields and the two ways out.
    """
    path = workdir / "config.json"
    if not path.exists():
        return True
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable ({e}); restore it or use a new --workdir.") from None
    new = json.loads(config_json)
    if saved == new:
        return False
    diff = config_differences(saved, new)
    if diff and not allow_change:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise InputError(
            f"{workdir} holds a run with another configuration ({shown}); nothing was changed. "
            "Use a new --workdir, or pass --allow-config-change to continue this run with the "
            "new values."
        )
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class WorkdirLock:
    """Exclusive use of a workdir by one run (its process 0 holds the file).

    Args:
      workdir: the run's folder (local or ``gs://``; a bucket has no exclusive
        create, so there the check and the write are two steps).
    """

    def __init__(self, workdir: epath.Path) -> None:
        self.path = workdir / ".lock"
        self.held = False
        self._refreshed = 0.0

    def _mine(self) -> bytes:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        return (json.dumps(record) + "\n").encode()

    def _create(self) -> bool:
        if is_local(self.path):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._mine())
            return True
        if self.path.exists():
            return False
        with open_atomic(self.path) as f:
            f.write(self._mine())
        return True

    def _stale(self, holder: dict) -> str | None:
        """Why the lock ``holder`` is stale (every process of this run votes), or ``None``."""
        here = holder.get("host") == socket.gethostname()
        dead = here and not _alive(int(holder.get("pid", -1)))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            dead = bool(np.asarray(multihost_utils.process_allgather(np.asarray(dead))).any())
        if dead:
            return f"process {holder.get('pid')} on {holder.get('host')} is gone"
        try:
            age = time.time() - self.path.stat().mtime
        except (OSError, AttributeError):
            age = time.time() - float(holder.get("time", 0))
        if age > STALE_SECONDS:
            return f"not refreshed for {age / 60:.0f} minutes"
        return None

    def acquire(self) -> None:
        """Take the lock (process 0), or raise :class:`InputError` naming its holder.

        Every process of a multi-host run must call it (they vote on staleness).
        """
        main = jax.process_index() == 0
        taken = self._create() if main else True
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            taken = bool(np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(taken))))
        if not taken:
            try:
                holder = json.loads(self.path.read_text())
            except (OSError, ValueError):
                holder = {}
            why = self._stale(holder)
            if why is None:
                raise InputError(
                    f"{self.path.parent} is in use by process {holder.get('pid')} on "
                    f"{holder.get('host')} (lock {self.path}); wait for that run to end or stop "
                    "it, or use another --workdir."
                )
            if main:
                print(f"warning: taking over the stale lock {self.path} ({why}).",
                      file=sys.stderr)
                with open_atomic(self.path) as f:
                    f.write(self._mine())
        self.held = main
        self._refreshed = time.time()

    def refresh(self) -> None:
        """Show the run is alive (at most once a minute; cheap to call every log step)."""
        if self.held and time.time() - self._refreshed > 60:
            with open_atomic(self.path) as f:
                f.write(self._mine())
            self._refreshed = time.time()

    def release(self) -> None:
        """Remove the lock file (process 0)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
