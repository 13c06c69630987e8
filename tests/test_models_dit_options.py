"""DiT's memory and compile-time options: ``remat``, ``scan_blocks``, bf16 compute.

Each option must leave the function the model computes unchanged: outputs are
compared bit for bit with the plain model on the same (perturbed, so that
adaLN-Zero layers act) parameters, gradients bit for bit (``remat``) or to a
few float32 ulps (``scan_blocks``, through the documented converters between
per-block and stacked parameters).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.errors import InputError
from jaxgen.models import DiT, abstract_init, param_shardings
from jaxgen.models.dit import SCAN_AXIS, stack_blocks, unstack_blocks
from jaxgen.parallel import make_mesh

DEPTH = 2  # enough to tell stacked from per-block; compiling dominates the runtime


def tiny_dit(**kw) -> DiT:
    base = dict(patch=2, hidden=32, depth=DEPTH, num_heads=4, num_classes=10)
    return DiT(**{**base, **kw})


def inputs(batch=2):
    kx, kt = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (batch, 8, 8, 4))
    t = jax.random.uniform(kt, (batch,), maxval=1000.0)
    return x, t, {"label": jnp.arange(batch, dtype=jnp.int32) % 10}


@pytest.fixture(scope="module")
def plain_params():
    """Parameters of the plain tiny DiT plus noise, so zero-initialised layers act."""
    x, t, cond = inputs()
    params = nn.unbox(jax.jit(tiny_dit().init)(jax.random.key(0), x, t, cond))["params"]
    rng = np.random.default_rng(1)
    return jax.tree.map(
        lambda p: p + (0.1 * rng.standard_normal(p.shape)).astype(p.dtype), params
    )


def output_and_grads(model: DiT, params):
    """The model's output and the gradient of a scalar of it, from one jitted program."""
    x, t, cond = inputs()

    def f(p):
        out = model.apply({"params": p}, x, t, cond)
        return jnp.sum(jnp.sin(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return out, grads


@pytest.fixture(scope="module")
def plain_result(plain_params):
    return output_and_grads(tiny_dit(), plain_params)


def test_remat_keeps_parameters_outputs_and_gradients(plain_params, plain_result):
    x, t, cond = inputs()
    abstract = jax.eval_shape(tiny_dit(remat=True).init, jax.random.key(0), x, t, cond)
    assert jax.tree.structure(nn.unbox(abstract)["params"]) == jax.tree.structure(plain_params)
    out, grads = output_and_grads(tiny_dit(remat=True), plain_params)
    np.testing.assert_array_equal(out, plain_result[0])
    jax.tree.map(np.testing.assert_array_equal, grads, plain_result[1])


@pytest.mark.parametrize("remat", [False, True])
def test_scan_blocks_matches_plain_model_through_converters(plain_params, plain_result, remat):
    model = tiny_dit(scan_blocks=True, remat=remat)
    x, t, cond = inputs()
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, t, cond))["params"]
    stacked = stack_blocks(plain_params, DEPTH)
    assert "blocks" in abstract and not any(k.startswith("block") and k != "blocks"
                                            for k in abstract)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(
        lambda a: (a.shape, a.dtype), stacked)
    assert stacked["blocks"]["attn"]["qkv"]["kernel"].shape == (DEPTH, 32, 96)

    out, grads = output_and_grads(model, stacked)
    np.testing.assert_array_equal(out, plain_result[0])
    # The forward pass is bit for bit the same. The backward loop adds the
    # conditioning's cotangent over the blocks in another order and fuses other
    # ops: float32 sums reordered differ by a few ulps (measured up to 2e-7 of
    # each leaf's largest entry; float32 eps is 1.2e-7).
    for g, ref in zip(jax.tree.leaves(unstack_blocks(grads)), jax.tree.leaves(plain_result[1]),
                      strict=True):
        np.testing.assert_allclose(g, ref, rtol=0, atol=1e-6 * float(jnp.abs(ref).max()))


def test_stack_and_unstack_are_inverse(plain_params):
    back = unstack_blocks(stack_blocks(plain_params, DEPTH))
    assert jax.tree.structure(back) == jax.tree.structure(plain_params)
    jax.tree.map(np.testing.assert_array_equal, back, plain_params)


def test_converters_name_what_is_wrong(plain_params):
    with pytest.raises(InputError, match=rf"missing \['block{DEPTH}'\]"):
        stack_blocks(plain_params, DEPTH + 1)
    with pytest.raises(InputError, match="scan_blocks=True"):
        unstack_blocks(plain_params)


def test_scanned_params_keep_logical_axes_and_shard_over_fsdp():
    x, t, cond = inputs()
    abstract = abstract_init(tiny_dit(scan_blocks=True), x, t, cond)
    box = abstract["params"]["blocks"]["fc1"]["kernel"]
    assert tuple(box.names) == (SCAN_AXIS, "embed", "mlp")
    shardings = nn.unbox(param_shardings(abstract, make_mesh(fsdp=4)))
    # The stacked axis stays whole on every device; the block's own axes shard as before.
    assert tuple(shardings["params"]["blocks"]["fc1"]["kernel"].spec) == (None, "fsdp", None)


# bf16 compute, fp32 master weights. bf16 keeps 8 significant bits: one rounding
# costs up to 2^-9 ~ 0.2% relative. The forward pass adds roughly ten roundings
# per block that accumulate like a random walk and, through the residual
# stream, do not compound (tests/test_models.py bounds the output at 3%). The
# backward pass rounds the same activations again and the incoming cotangents
# too, so its error can grow up to about sqrt(2) times that of the forward pass:
# measured 0.65-0.7% (output) and 0.5% (gradients) here, bounded at 3% and 5%; a lost upcast
# or a gradient computed in the wrong dtype gives errors of order 1.
BF16_OUT_TOL = 3e-2
BF16_GRAD_TOL = 5e-2


@pytest.mark.parametrize("options", [{}, {"scan_blocks": True, "remat": True}])
def test_bf16_compute_keeps_fp32_master_weights_and_gradients(plain_params, plain_result,
                                                              options):
    params = stack_blocks(plain_params, DEPTH) if options else plain_params
    out, grads = output_and_grads(tiny_dit(dtype=jnp.bfloat16, **options), params)
    if options:
        grads = unstack_blocks(grads)
    assert out.dtype == jnp.float32
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    assert 0 < rel(out, plain_result[0]) < BF16_OUT_TOL
    flat = lambda tree: jnp.concatenate([g.ravel() for g in jax.tree.leaves(tree)])
    assert 0 < rel(flat(grads), flat(plain_result[1])) < BF16_GRAD_TOL
