"""Train a model: ``python -m jaxgen.train --config configs/NAME.py --workdir DIR``.

Override any config field with ``--config.key=value`` (e.g.
``--config.train.minutes=10``); ``--dry-run`` prints what would run and
exits. A run in an existing workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from jaxgen import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and samples.")
_DRY_RUN = flags.DEFINE_bool("dry-run", False, "Print what would run, then exit.")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    flags.FLAGS(sys.argv if argv is None else ["jaxgen.train", *argv])
    if _CONFIG.value is None or _WORKDIR.value is None:
        from jaxgen.errors import InputError

        raise InputError("give --config configs/NAME.py and --workdir DIR.")
    from jaxgen.train import TrainingDiverged, describe, train_and_evaluate

    if _DRY_RUN.value:
        print(_CONFIG.value)
        print(describe(_CONFIG.value, _WORKDIR.value))
        return 0
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
