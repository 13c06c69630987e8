"""Random state dicts for the encoder parity tests, from NumPy alone.

``tests/fixtures/make_encoder_reference.py`` fills the reference networks'
state dicts with :func:`random_tensors` and stores only names, shapes,
inputs and outputs; the tests rebuild the same tensors here and convert them
through jaxgen's readers.
"""

from __future__ import annotations

import numpy as np


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Every tensor drawn from ``default_rng(seed)`` in sorted name order.

    Matrices (names ending in ``weight``, 2+ dims) get std ``1/sqrt(fan_in)``;
    LayerNorm weights ``1 + N(0, 0.1)``; everything else ``N(0, 0.1)``.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        x = rng.standard_normal(shape)
        if len(shape) >= 2 and name.endswith("weight"):
            x = x / np.sqrt(np.prod(shape[1:]))
        else:
            x = 0.1 * x + (1.0 if "norm" in name and name.endswith("weight") else 0.0)
        out[name] = x.astype(np.float32)
    return out
