"""Train a model: ``python -m jaxgen.train --config jaxgen/configs/NAME.py --workdir DIR``.

The recipes are ``jaxgen/configs/*.py`` (installed with the package, importable
as ``jaxgen.configs.NAME``); any file with ``get_config()`` works. Override any
config field with ``--config.key=value`` (e.g. ``--config.train.minutes=10``);
``--dry-run`` prints what would run and exits. A run in an existing workdir
resumes from its latest checkpoint.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from jaxgen import cli
from jaxgen.errors import InputError
from jaxgen.files import check_writable

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Python file with get_config(), e.g. a recipe jaxgen/configs/NAME.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and samples.")
_DRY_RUN = flags.DEFINE_bool("dry-run", False, "Print what would run, then exit.")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow-config-change", False,
    "Continue the run in --workdir with a configuration that differs from its config.json.")


def parse_flags(argv: list[str]) -> None:
    """Parse ``argv`` (program name first); a mistake in a flag, a config override or the
    config file becomes one :class:`InputError` line, before anything is created."""
    try:
        flags.FLAGS(argv)
        if _CONFIG.value is not None:  # a config file that failed to load raises on use
            _CONFIG.value.keys  # noqa: B018
    except flags.UnrecognizedFlagError as e:
        raise InputError(
            f"--{e.flagname}: no such flag; the flags are --config, --workdir, --dry-run, "
            "--allow-config-change and --config.FIELD=VALUE."
        ) from None
    except flags.Error as e:  # a value of the wrong type, a config file that fails to load
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise InputError(" ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines)) from None
    except OSError as e:  # the config file is missing or unreadable
        raise InputError(f"--config: {str(e).splitlines()[-1].strip()}") from None
    except (AttributeError, KeyError) as e:  # an override names a field the config lacks
        field = str(e).strip("\"'")
        for arg in argv:
            path = arg.removeprefix("--config.").split("=", 1)[0]
            if arg.startswith("--config.") and field in path.split("."):
                raise InputError(
                    f"--config.{path}: the config has no field {field!r}; --dry-run prints "
                    "the config's fields."
                ) from None
        raise


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parse_flags(sys.argv if argv is None else ["jaxgen.train", *argv])
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise InputError("give --config jaxgen/configs/NAME.py and --workdir DIR.")
    if not _DRY_RUN.value:  # a folder that cannot hold the run: one line, nothing created
        check_writable(_WORKDIR.value, "--workdir", folder=True)
    from jaxgen.train import TrainingDiverged, TrainingInterrupted, describe, train_and_evaluate

    if _DRY_RUN.value:
        print(_CONFIG.value)
        print(describe(_CONFIG.value, _WORKDIR.value))
        return 0
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                           allow_config_change=_ALLOW_CHANGE.value)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:  # saved; not a success, so `train && sample` stops here
        print(f"stopped: {e}", file=sys.stderr)
        return 128 + e.signum
    return 0


if __name__ == "__main__":
    cli.run(main, split_cpu=True)
