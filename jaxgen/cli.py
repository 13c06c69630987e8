"""Shared behaviour of the ``python -m jaxgen.X`` entry points."""

from __future__ import annotations

import sys
from collections.abc import Callable

from jaxgen.errors import InputError


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run ``main``; bad input becomes one line on stderr and exit code 2.

    XLA's persistent compilation cache is kept under the jaxgen cache folder,
    so a second run of a command skips the compilation (~10 s for Inception).
    """
    import jax

    from jaxgen.cache import cache_dir

    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    try:
        code = main(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
