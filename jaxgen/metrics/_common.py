"""Input checks and the default mesh shared by the feature-set metrics (KID, PRDC, FID-inf)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from jaxgen.errors import InputError
from jaxgen.parallel import make_mesh


def as_features(x: np.ndarray, name: str, dtype: type = np.float32) -> np.ndarray:
    """``x`` as a finite ``[N, D]`` ``dtype`` array, or an :class:`InputError` naming ``name``."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"{name} must be a non-empty [N, D] feature array; got shape {x.shape}.")
    x = x.astype(dtype, copy=False)
    if not np.all(np.isfinite(x)):
        raise InputError(f"{name} contains NaN or inf.")
    return x


def as_feature_pair(f_real: np.ndarray, f_fake: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both feature sets, checked, with the same dimension D."""
    f_real, f_fake = as_features(f_real, "f_real"), as_features(f_fake, "f_fake")
    if f_real.shape[1] != f_fake.shape[1]:
        raise InputError(
            f"f_real and f_fake have different feature dimensions ({f_real.shape[1]} vs "
            f"{f_fake.shape[1]}); extract both with the same network and layer."
        )
    return f_real, f_fake


def local_mesh(mesh: Mesh | None) -> Mesh:
    """``mesh``, or a mesh over this process's devices (features are host-local arrays)."""
    return make_mesh(jax.local_devices()) if mesh is None else mesh
