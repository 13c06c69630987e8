"""Shared behaviour of the ``python -m jaxgen.X`` entry points."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from jaxgen.errors import InputError
from jaxgen.files import describe_os_error


def cpu_device_per_core() -> None:
    """Give JAX one CPU device per core this process may use (at most 16).

    XLA runs a CPU convolution on one core per device, so splitting each
    batch over one device per core is what keeps every core busy: the FID
    Inception went from 11.1 to 15.2 images/s on the 2-core CPU (batch 10
    per device). Does nothing when the device count is already chosen
    (``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``, or
    ``JAX_NUM_CPU_DEVICES``) or JAX has started; a GPU or TPU, when present,
    stays the default backend. The devices' collectives are made patient
    (:func:`patient_cpu_collectives`).
    """
    import jax

    patient_cpu_collectives()
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    if os.environ.get("JAX_NUM_CPU_DEVICES"):
        return
    try:
        jax.config.update("jax_num_cpu_devices", min(16, len(os.sched_getaffinity(0))))
    except RuntimeError:  # the backends are up already (e.g. called from a running program)
        pass


CPU_COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"
CPU_COLLECTIVE_TIMEOUT_S = 3600


def patient_cpu_collectives() -> None:
    """Let XLA's CPU collectives wait an hour, not a minute, for a late device thread.

    With several CPU devices, every all-reduce is a rendezvous of one thread per
    device, and XLA aborts the whole process (``Termination timeout for `all
    reduce ...` of 40 seconds exceeded``, exit 134) when one thread arrives about
    a minute late. On a busy machine that happens to healthy runs: a training
    run on the 2-core CPU at load average 10-15 was killed so, twice, with its
    checkpoints intact but its progress since the last one lost. This adds
    ``--xla_cpu_collective_call_terminate_timeout_seconds=3600`` to ``XLA_FLAGS``
    (read when JAX starts its CPU backend) unless the flag is set already; a true
    deadlock still ends, after an hour. It does not affect GPU or TPU backends.
    Only jaxlib 0.10.x, where the flag was checked, gets it: XLA aborts at
    start-up on a flag it does not know, so other versions keep XLA's default
    until they are checked.
    """
    from importlib.metadata import version

    major, minor = (int(v) for v in version("jaxlib").split(".")[:2])
    flags = os.environ.get("XLA_FLAGS", "")
    if (major, minor) == (0, 10) and CPU_COLLECTIVE_TIMEOUT_FLAG not in flags:
        os.environ["XLA_FLAGS"] = (
            f"{flags} {CPU_COLLECTIVE_TIMEOUT_FLAG}={CPU_COLLECTIVE_TIMEOUT_S}".strip())


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Refuse a zero or negative integer flag (a flag left out, ``None``, is fine).

    Args:
      args: the parsed flags.
      names: attribute names of the flags to check (``"batch_size"`` for ``--batch-size``).

    Raises:
      InputError: naming the flag and its value.
    """
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{flag} {value}: must be a positive integer.")


def run(
    main: Callable[[list[str] | None], int | None],
    argv: list[str] | None = None,
    *,
    split_cpu: bool = False,
) -> None:
    """Run ``main``; bad input and failed file operations become one line on stderr and
    exit code 2 (an ``OSError`` names its file, and a full disk the space left on it).

    XLA's persistent compilation cache is kept under the jaxgen cache folder,
    so a second run of a command skips the compilation (~10 s for Inception).
    ``split_cpu`` calls :func:`cpu_device_per_core` first (for commands whose
    work splits over any number of devices, such as feature extraction).
    """
    import jax

    from jaxgen.cache import cache_dir

    if split_cpu:
        cpu_device_per_core()
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    try:
        code = main(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
