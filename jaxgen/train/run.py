"""Open a finished (or running) training run: its config, model and weights."""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import flax.linen as nn
import ml_collections
from etils import epath

from jaxgen.errors import InputError
from jaxgen.train.checkpoint import Checkpointer
from jaxgen.train.loop import build
from jaxgen.train.state import RunParts, abstract_state, ema_name


class Run(NamedTuple):
    """A run restored from its workdir.

    Attributes:
      parts: model, process, mesh and config (:class:`RunParts`).
      params: the chosen weights, sharded as training left them.
      step: the checkpoint's step.
      weights: which weights ``params`` are: an EMA key (``repr`` of its decay) or ``params``.
    """

    parts: RunParts
    params: Any
    step: int
    weights: str


def load_run(
    workdir: str | os.PathLike,
    ema: str | float | None = None,
    *,
    module: nn.Module | None = None,
) -> Run:
    """The latest checkpoint of a ``python -m jaxgen.train`` workdir (local or ``gs://``).

    Sample from it with ``run.parts.model_fn(run.params, x_t, t, cond)`` or
    :func:`jaxgen.train.sample_images`.

    Args:
      workdir: the run's folder, holding ``config.json`` and ``checkpoints/``.
      ema: EMA decay to take (default the run's first, ``train.ema_decays[0]``),
        or ``"params"`` for the raw training weights.
      module: the Flax module the run was trained with, when it was given to
        :func:`jaxgen.train.train_and_evaluate` as ``module=`` (default: ``config.model``).

    Raises:
      InputError: no ``config.json``, no checkpoint, or an EMA the run does not keep.
    """
    workdir = epath.Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise InputError(f"{config_path}: not found; give a jaxgen.train run folder.")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    parts, _ = build(config, module=module)
    checkpoints = Checkpointer(workdir / "checkpoints", writable=False)  # a reader writes nothing
    try:
        restored = checkpoints.restore_latest(abstract_state(parts))
    finally:
        checkpoints.close()
    if restored is None:
        raise InputError(f"{workdir / 'checkpoints'}: no checkpoint to restore.")
    state, _, step = restored
    if ema is None:
        ema = config.train.ema_decays[0]
    if ema == "params":
        return Run(parts, state.params, int(step), "params")
    try:
        key = ema_name(float(ema))
    except ValueError:
        key = str(ema)
    if key not in state.ema:
        raise InputError(
            f"ema={ema!r}: the run keeps EMAs with decays {sorted(state.ema)}, or use 'params'."
        )
    return Run(parts, state.ema[key], int(step), key)
