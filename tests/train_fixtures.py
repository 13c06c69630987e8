"""Small training set-ups the train tests share: 8x8 images, a 45k-parameter U-Net recipe,
a user-defined module, and tree comparisons. Imported by the test modules (tests/ is on
sys.path under pytest)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxgen.configs import fashion_mnist as default_config
from jaxgen.parallel import make_mesh
from jaxgen.train import make_run_parts


def tiny_images(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Small structured 8x8 grayscale images (bars whose position is the label) + labels."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 4
    images = rng.integers(0, 40, (n, 8, 8, 1), dtype=np.uint8)
    for i, y in enumerate(labels):
        images[i, 2 * y : 2 * y + 2] = 220
    return images, labels


def set_fields(c: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """``c`` with dotted ``{"optim.lr": 0.1}`` fields set (as ``--config.optim.lr=0.1`` does)."""
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def tiny_config(source: str, **overrides) -> ml_collections.ConfigDict:
    """The default recipe shrunk to a 45k-parameter U-Net on 8x8 images, no FID."""
    c = default_config.get_config()
    c.data.source = source
    c.data.batch_size = 8
    c.model.kwargs = ml_collections.ConfigDict(dict(
        ch=8, ch_mult=(1, 2), num_res_blocks=1, attention_levels=(), head_channels=8,
        num_groups=4, dropout=0.1, num_classes=4, class_dropout=0.1,
    ))
    c.optim.warmup_steps = 2
    c.train.num_steps = 4
    c.train.ema_decays = (0.9, 0.99)
    c.train.log_every = 1
    c.checkpoint.every_steps = 2
    c.eval.every_steps = 0
    c.eval.at_minutes = ()
    c.eval.batch_size = 16
    c.eval.steps = 2
    c.eval.fid_samples = 0
    return set_fields(c, overrides)


def setup_of(config, mesh=None):
    """The run parts of ``config`` for 8x8x1 images (on an ``fsdp`` mesh when ``mesh`` is given)."""
    mesh = make_mesh() if mesh is None else make_mesh(fsdp=config.train.fsdp)
    return make_run_parts(config, mesh, (8, 8, 1), config.train.num_steps)


def batch_of(parts=None, n: int = 8, start: int = 0) -> dict:
    """A train batch of ``tiny_images`` ``start .. start + n`` with their labels."""
    images, labels = tiny_images(start + n)
    return {"image": jnp.asarray(images[start:]), "label": jnp.asarray(labels[start:], jnp.int32)}


def leaves(tree) -> list[np.ndarray]:
    return [np.array(x) for x in jax.tree.leaves(tree)]  # copies: the step donates its input


def assert_same(a, b) -> None:
    """Same tree structure and bit-identical leaves."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def assert_uint8_matches(got, x) -> None:
    """``got`` (uint8 images a compiled sampler wrote) equals ``to_uint8(x)`` (the same
    computed eagerly) but where float32 rounding crosses a level boundary: at most one
    level, in under 1 % of the pixels."""
    from jaxgen.sampling import to_uint8

    want = np.asarray(to_uint8(x))
    assert np.abs(np.asarray(got).astype(int) - want).max() <= 1
    assert np.mean(np.asarray(got) == want) > 0.99


class UserNet(nn.Module):
    """A user's model: not a jaxgen preset, the same call signature, its own classes; dense
    initialisation (no zero-initialised layer) and no dropout."""

    num_classes: int = 4

    @nn.compact
    def __call__(self, x, t, cond=None, train: bool = False):
        h = nn.Conv(8, (3, 3))(x) + nn.Dense(8)(t[:, None])[:, None, None, :]
        if cond is not None:
            h = h + nn.Embed(self.num_classes + 1, 8)(cond["label"])[:, None, None, :]
        return nn.Conv(x.shape[-1], (3, 3))(nn.silu(h))
