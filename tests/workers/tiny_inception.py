"""A cheap stand-in for the Inception network with the same outputs, for sharding tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class TinyInception(nn.Module):
    """pool3/spatial/logits of the right kinds from a 2-layer net (not the FID network)."""

    with_logits: bool = True
    source: str = "tiny"

    @nn.compact
    def __call__(self, x):
        pooled = nn.avg_pool(x, (23, 23), (23, 23))  # 299 -> 13
        h = nn.Dense(6)(pooled.reshape(x.shape[0], -1))
        return {"pool3": h, "spatial": pooled[:, ::4, ::4, 0].reshape(x.shape[0], -1),
                "logits": nn.Dense(5)(jnp.tanh(h))}


def tiny_inception():
    """(module, variables) with fixed random weights."""
    module = TinyInception()
    variables = module.init(jax.random.key(0), jnp.zeros((1, 299, 299, 3)))
    return module, variables
