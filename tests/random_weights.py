"""The deterministic fill rule of the parity fixtures' random weights.

A fixture script (``tests/fixtures/make_*_reference.py``) fills a reference
model's state dict with this rule and stores only the tensor names, shapes,
inputs and outputs; a test rebuilds the identical state dict with NumPy, so
no large random weights are committed.

Rule: tensors in sorted name order, each drawn from one
``numpy.random.default_rng(seed)`` as float32 standard normals ``n``, then

- tensors of 2 or more dimensions (``[out, in, ...]``): ``n / sqrt(prod(shape[1:]))``,
  so activations keep unit scale through the network;
- 1-D tensors named ``*.weight`` (normalisation scales): ``1 + 0.1 n``;
- other 1-D tensors (biases): ``0.1 n``.

``tied`` maps a name onto another whose (already drawn) value it copies, for
models that store one tensor several times.
"""

from __future__ import annotations

import numpy as np


def random_state_dict(
    shapes: dict[str, tuple[int, ...]], seed: int, tied: dict[str, str] | None = None
) -> dict[str, np.ndarray]:
    """``{name: float32 array}`` for ``{name: shape}`` by the rule in the module docstring."""
    rng = np.random.default_rng(seed)
    tied = tied or {}
    out: dict[str, np.ndarray] = {}
    for name in sorted(shapes):
        if name in tied:
            continue
        shape = tuple(int(s) for s in shapes[name])
        n = rng.standard_normal(shape, dtype=np.float32)
        if len(shape) >= 2:
            n = n / np.float32(np.sqrt(np.prod(shape[1:])))
        elif name.endswith(".weight"):
            n = np.float32(1) + np.float32(0.1) * n
        else:
            n = np.float32(0.1) * n
        out[name] = n
    for name, source in tied.items():
        out[name] = out[source].copy()
    return out
