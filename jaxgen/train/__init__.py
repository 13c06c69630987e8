"""Training: train state, optimizer, EMA, sharded train step, checkpoints, evaluation, loop.

    python -m jaxgen.train --config configs/fashion_mnist.py --workdir runs/fm

:func:`train_and_evaluate` is the loop the command runs; the pieces are
usable on their own (``make_setup`` -> ``init_state`` -> ``make_train_step``).
"""

from jaxgen.train.checkpoint import Checkpointer
from jaxgen.train.evaluation import (
    fid_of_samples,
    generate,
    image_grid,
    make_sampler,
    reference_stats,
    save_png,
)
from jaxgen.train.loop import TrainingDiverged, build, describe, train_and_evaluate
from jaxgen.train.run import Run, load_run
from jaxgen.train.state import (
    PROCESSES,
    Setup,
    TrainState,
    abstract_state,
    ema_decay,
    ema_name,
    init_state,
    make_optimizer,
    make_schedule,
    make_setup,
    make_train_step,
    state_shardings,
)
from jaxgen.train.writers import MetricWriter, TensorBoardWriter, read_events

__all__ = [
    "PROCESSES",
    "Checkpointer",
    "MetricWriter",
    "Run",
    "Setup",
    "TensorBoardWriter",
    "TrainState",
    "TrainingDiverged",
    "abstract_state",
    "build",
    "describe",
    "ema_decay",
    "ema_name",
    "fid_of_samples",
    "generate",
    "image_grid",
    "init_state",
    "load_run",
    "make_optimizer",
    "make_sampler",
    "make_schedule",
    "make_setup",
    "make_train_step",
    "read_events",
    "reference_stats",
    "save_png",
    "state_shardings",
    "train_and_evaluate",
]
