"""Training: train state, optimizer, EMA, sharded train step, checkpoints, evaluation, loop.

    python -m jaxgen.train --config configs/fashion_mnist.py --workdir runs/fm

:func:`train_and_evaluate` is the loop the command runs; the pieces are
usable on their own (``make_setup`` -> ``init_state`` -> ``make_train_step``).
"""

from jaxgen.train.checkpoint import Checkpointer
from jaxgen.train.evaluation import (
    class_labels,
    fid_of_samples,
    image_grid,
    reference_stats,
    sample_images,
    save_png,
)
from jaxgen.train.loop import (
    TrainingDiverged,
    TrainingInterrupted,
    build,
    describe,
    train_and_evaluate,
)
from jaxgen.train.run import Run, load_run
from jaxgen.train.state import (
    PROCESSES,
    LossFn,
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
from jaxgen.train.writers import MetricWriter, TensorBoardWriter, read_events, read_scalars

__all__ = [
    "PROCESSES",
    "Checkpointer",
    "LossFn",
    "MetricWriter",
    "Run",
    "Setup",
    "TensorBoardWriter",
    "TrainState",
    "TrainingDiverged",
    "TrainingInterrupted",
    "abstract_state",
    "build",
    "class_labels",
    "describe",
    "ema_decay",
    "ema_name",
    "fid_of_samples",
    "image_grid",
    "init_state",
    "load_run",
    "make_optimizer",
    "make_schedule",
    "make_setup",
    "make_train_step",
    "read_events",
    "read_scalars",
    "reference_stats",
    "sample_images",
    "save_png",
    "state_shardings",
    "train_and_evaluate",
]
