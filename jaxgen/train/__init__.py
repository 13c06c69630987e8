"""Training: train state, optimizer, EMA, sharded train step, checkpoints, the loop, and
its monitoring (sample grids, FID).

    python -m jaxgen.train --config jaxgen/configs/fashion_mnist.py --workdir runs/fm

:func:`train_and_evaluate` is the loop the command runs; the pieces are
usable on their own (``make_run_parts`` -> ``init_state`` -> ``make_train_step``).
"""

from jaxgen.train.checkpoint import Checkpointer
from jaxgen.train.loop import (
    TrainingDiverged,
    TrainingInterrupted,
    build,
    describe,
    train_and_evaluate,
)
from jaxgen.train.monitoring import (
    class_labels,
    fid_of_samples,
    image_grid,
    reference_stats,
    sample_images,
    save_png,
)
from jaxgen.train.run import Run, load_released, load_run, recipe_config
from jaxgen.train.state import (
    PROCESSES,
    LossFn,
    RunParts,
    TrainState,
    abstract_state,
    ema_decay,
    ema_name,
    init_state,
    make_optimizer,
    make_run_parts,
    make_schedule,
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
    "RunParts",
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
    "load_released",
    "load_run",
    "make_optimizer",
    "make_run_parts",
    "make_schedule",
    "make_train_step",
    "read_events",
    "read_scalars",
    "recipe_config",
    "reference_stats",
    "sample_images",
    "save_png",
    "state_shardings",
    "train_and_evaluate",
]
