"""Tests of jaxgen.models: parameter counts, shapes, conditioning, dtypes, sharding, FLOPs."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.errors import InputError
from jaxgen.models import (
    DIT_SIZES,
    MODEL_NAMES,
    DiT,
    UNet,
    abstract_init,
    as_model_fn,
    count_params,
    create_model,
    dit,
    forward_flops,
    param_shardings,
    param_table,
    sincos_pos_embed_2d,
    unet,
)
from jaxgen.parallel import make_mesh

S = jax.ShapeDtypeStruct


def tiny_dit(**kw) -> DiT:
    return DiT(**{**dict(patch=2, hidden=32, depth=2, num_heads=4, num_classes=10), **kw})


def tiny_unet(**kw) -> UNet:
    base = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_groups=4,
                num_classes=10, dropout=0.5)
    return UNet(**{**base, **kw})


def inputs(shape=(2, 8, 8, 4), seed=0):
    kx, kt = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, shape)
    t = jax.random.uniform(kt, shape[:1], maxval=1000.0)
    return x, t, {"label": jnp.arange(shape[0], dtype=jnp.int32) % 10}


@functools.cache
def _jitted(model: nn.Module):
    # One compiled init/apply per model config for the whole session: compiling
    # dominates these tests, and eager op-by-op dispatch is slower still. XLA's
    # CPU backend spends ~15 s optimising the U-Net's unrolled initialisers at
    # the default level and ~2 s at level 0; init runs once, so speed is moot.
    fast_compile = {"xla_backend_optimization_level": 0}
    return (jax.jit(model.init, compiler_options=fast_compile),
            jax.jit(model.apply, static_argnames="train"))


def init(model, *args, seed=0):
    return _jitted(model)[0](jax.random.key(seed), *args)


def apply(model, variables, *args, **kw):
    return _jitted(model)[1](variables, *args, **kw)


def perturbed(variables, scale=0.05, seed=1):
    """Variables plus noise, so zero-initialised layers (adaLN-Zero, output convs) act."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: p + (scale * rng.standard_normal(p.shape)).astype(p.dtype), nn.unbox(variables)
    )


# ---------------------------------------------------------------- parameter counts


def dit_count_from_paper(hidden: int, depth: int, patch: int, channels: int = 4) -> int:
    """Trainable parameters of DiT as specified in the paper / reference code.

    Patch embedding (conv p x p x C -> D), timestep MLP (256 -> D -> D), class
    table (1000 + null), per block QKV + proj + MLP(4D) + adaLN(6D), final
    adaLN(2D) + linear to p*p*2C (learned sigma); LayerNorms have no affine.
    """
    d = hidden
    lin = lambda i, o: i * o + o
    out = patch * patch * 2 * channels
    block = lin(d, 3 * d) + lin(d, d) + lin(d, 4 * d) + lin(4 * d, d) + lin(d, 6 * d)
    return (
        lin(patch * patch * channels, d)
        + lin(256, d) + lin(d, d)
        + 1001 * d
        + depth * block
        + lin(d, 2 * d) + lin(d, out)
    )


DIT_PAPER_MILLIONS = {"S": 33, "B": 130, "L": 458, "XL": 675}  # paper's Table 1 (patch 2)
DIT_TORCH_XL2 = 675_129_632  # reference train.py's count, which includes the fixed pos-emb


@pytest.mark.parametrize("size", list(DIT_SIZES))
def test_dit_param_counts_match_paper(size):
    model = dit(f"DiT-{size}/2")
    variables = abstract_init(model, S((1, 32, 32, 4), jnp.float32), S((1,), jnp.float32),
                              {"label": S((1,), jnp.int32)})
    n = count_params(variables["params"])
    cfg = DIT_SIZES[size]
    assert n == dit_count_from_paper(cfg["hidden"], cfg["depth"], 2)
    assert round(n / 1e6) == DIT_PAPER_MILLIONS[size]
    if size == "XL":
        # PyTorch counts the frozen 256 x 1152 position table as a parameter too.
        assert n + 256 * 1152 == DIT_TORCH_XL2


@pytest.mark.parametrize("name", ["DiT-S/4", "DiT-B/8"])
def test_dit_param_counts_other_patches(name):
    model = dit(name)
    variables = abstract_init(model, S((1, 32, 32, 4), jnp.float32), S((1,), jnp.float32))
    cfg = DIT_SIZES[name[4]]
    assert count_params(variables["params"]) == dit_count_from_paper(
        cfg["hidden"], cfg["depth"], model.patch
    )


def unet_count_from_paper(ch=128, ch_mult=(1, 2, 2, 2), blocks=2, attn_res=(16,), size=32,
                          scale_shift=False, updown=False, classes=0, out=3) -> int:
    """Parameters of a DDPM/ADM U-Net walked through from its published configuration.

    Time MLP ch -> 4ch -> 4ch; res blocks GN-conv3-(+Dense(temb))-GN-conv3 with
    a 1x1 shortcut on channel change (ADM scale-shift: the Dense gives 2x
    channels); attention GN + q, k, v, proj (1x1); down/up by stride-2 conv /
    nearest + conv (DDPM) or by a residual block (ADM); GN + conv3 out; a
    class table of ``classes`` + 1 (null) rows of width 4ch.
    """
    conv = lambda i, o: 9 * i * o + o
    lin = lambda i, o: i * o + o
    gn = lambda c: 2 * c
    temb = 4 * ch
    res = lambda i, o: gn(i) + conv(i, o) + lin(temb, (2 if scale_shift else 1) * o) + gn(o) + (
        conv(o, o) + (lin(i, o) if i != o else 0))
    attn = lambda c: gn(c) + 4 * lin(c, c)
    resample = lambda c: res(c, c) if updown else conv(c, c)
    n = lin(ch, temb) + lin(temb, temb) + conv(3, ch) + (classes + 1) * temb * (classes > 0)
    skips, c, r = [ch], ch, size
    for level, m in enumerate(ch_mult):
        for _ in range(blocks):
            n += res(c, ch * m) + (attn(ch * m) if r in attn_res else 0)
            c = ch * m
            skips.append(c)
        if level != len(ch_mult) - 1:
            n += resample(c)
            skips.append(c)
            r //= 2
    n += 2 * res(c, c) + attn(c)
    for level, m in reversed(list(enumerate(ch_mult))):
        for _ in range(blocks + 1):
            n += res(c + skips.pop(), ch * m) + (attn(ch * m) if r in attn_res else 0)
            c = ch * m
        if level != 0:
            n += resample(c)
            r *= 2
    return n + gn(c) + conv(c, out)


def test_ddpm_cifar10_param_count_matches_paper():
    variables = abstract_init(unet("ddpm-cifar10"), S((1, 32, 32, 3), jnp.float32),
                              S((1,), jnp.float32))
    n = count_params(variables["params"])
    assert n == unet_count_from_paper() == 35_746_307
    assert round(n / 1e5) == 357  # "35.7M" in the DDPM paper


def test_adm_imagenet64_param_count_matches_paper():
    variables = abstract_init(unet("adm-imagenet64"), S((1, 64, 64, 3), jnp.float32),
                              S((1,), jnp.float32), {"label": S((1,), jnp.int32)})
    n = count_params(variables["params"])
    assert n == unet_count_from_paper(192, (1, 2, 3, 4), 3, (32, 16, 8), 64, scale_shift=True,
                                      updown=True, classes=1000, out=6)
    assert round(n / 1e6) == 296  # ADM paper, ImageNet 64x64


# ---------------------------------------------------------------- shapes and inputs


@pytest.mark.parametrize(
    "model, shape, out_ch",
    [
        (tiny_dit(), (2, 8, 8, 4), 8),  # learned sigma doubles the channels
        (tiny_dit(learn_sigma=False), (2, 8, 12, 3), 3),  # non-square pixels
        (tiny_dit(patch=4, learn_sigma=False, num_classes=0), (2, 16, 16, 1), 1),
        (tiny_dit(learn_sigma=False, out_channels=2), (1, 4, 4, 4), 2),
        (tiny_unet(), (2, 16, 16, 3), 3),
        (tiny_unet(ch_mult=(1, 2, 2), num_classes=0), (2, 28, 28, 1), 1),
        (tiny_unet(resblock_updown=True, scale_shift=True, head_channels=8), (2, 8, 8, 3), 3),
        (tiny_unet(conv_resample=False, learn_sigma=True), (2, 8, 8, 3), 6),
    ],
)
def test_output_shapes(model, shape, out_ch):
    x, t, cond = inputs(shape)
    cond = cond if model.num_classes else None
    variables = abstract_init(model, x, t, cond)
    out = jax.eval_shape(model.apply, variables, x, t, cond)
    assert out.shape == (*shape[:3], out_ch)
    assert out.dtype == jnp.float32


def test_presets_build_and_run():
    x, t, _ = inputs((1, 28, 28, 1))
    small = create_model("unet-small")
    out = jax.eval_shape(small.apply, abstract_init(small, x, t), x, t)
    assert out.shape == x.shape
    assert len([n for n in MODEL_NAMES if n.startswith(("DiT-", "unet-"))]) == 15
    assert create_model("DiT-XL/8").patch == 8


def test_bad_inputs_raise_input_error():
    x, t, cond = inputs((2, 8, 8, 4))
    model = tiny_dit(patch=4)
    variables = init(model, x, t, cond)
    with pytest.raises(InputError, match="divisible by 4"):
        apply(model, variables, x[:, :6, :6], t, cond)
    with pytest.raises(InputError, match="unknown keys"):
        apply(model, variables, x, t, {"lable": cond["label"]})
    with pytest.raises(InputError, match="shape"):
        apply(model, variables, x, t[:1], cond)
    with pytest.raises(InputError, match="NHWC"):
        apply(model, variables, x[0], t, cond)
    with pytest.raises(InputError, match="num_classes=0"):
        abstract_init(tiny_unet(num_classes=0), x, t, cond)
    with pytest.raises(InputError, match="divisible by 2"):
        abstract_init(tiny_unet(), x[:, :7, :7], t)
    with pytest.raises(InputError, match="unknown model"):
        create_model("DiT-M/2")
    with pytest.raises(InputError, match="unknown U-Net"):
        unet("big")


# ---------------------------------------------------------------- behaviour


def test_dit_outputs_exactly_zero_at_init():
    x, t, cond = inputs()
    model = tiny_dit()
    out = apply(model, init(model, x, t, cond, seed=3), x, t, cond)
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("make", [tiny_dit, tiny_unet])
def test_determinism(make):
    x, t, cond = inputs((2, 8, 8, 4))
    model = make()
    v1 = init(model, x, t, cond, seed=7)
    v2 = init(model, x, t, cond, seed=7)
    v3 = init(model, x, t, cond, seed=8)
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), nn.unbox(v1), nn.unbox(v2))
    assert all(jax.tree.leaves(same))
    assert not np.array_equal(nn.unbox(v1)["params"]["t_embedder"]["fc1"]["kernel"],
                              nn.unbox(v3)["params"]["t_embedder"]["fc1"]["kernel"])
    p = perturbed(v1)
    np.testing.assert_array_equal(apply(model, p, x, t, cond), apply(model, p, x, t, cond))


def test_jit_compiles_once_for_a_fixed_shape():
    model = tiny_dit()
    x, t, cond = inputs()
    params = perturbed(init(model, x, t, cond))
    traces = []

    @jax.jit
    def fwd(p, x, t, cond):
        traces.append(1)
        return apply(model, p, x, t, cond)

    for seed in range(3):
        fwd(params, *inputs(seed=seed))
    assert len(traces) == 1


@pytest.mark.parametrize("make", [tiny_dit, tiny_unet])
def test_conditioning_changes_output(make):
    model = make()
    x, t, cond = inputs((2, 8, 8, 4))
    p = perturbed(init(model, x, t, cond))
    out = apply(model, p, x, t, cond)
    other = apply(model, p, x, t, {"label": cond["label"] + 1})
    assert float(jnp.abs(out - other).max()) > 1e-3
    assert float(jnp.abs(out - apply(model, p, x, t + 10.0, cond)).max()) > 1e-3
    # No label means the null class, row num_classes of the table.
    null = apply(model, p, x, t, {"label": jnp.full((2,), 10, jnp.int32)})
    np.testing.assert_array_equal(apply(model, p, x, t, None), null)


def test_dropout_only_in_train_mode():
    model = tiny_unet()  # dropout 0.5
    x, t, cond = inputs()
    p = perturbed(init(model, x, t, cond))
    eval_a = apply(model, p, x, t, cond, rngs={"dropout": jax.random.key(1)})
    eval_b = apply(model, p, x, t, cond, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = apply(model, p, x, t, cond, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = apply(model, p, x, t, cond, train=True, rngs={"dropout": jax.random.key(2)})
    assert float(jnp.abs(train_a - train_b).max()) > 1e-3
    assert float(jnp.abs(train_a - eval_a).max()) > 1e-3


def test_label_dropout_uses_null_class_in_training_only():
    model = tiny_dit()
    x, t, cond = inputs()
    p = perturbed(init(model, x, t, cond))
    always = tiny_dit(class_dropout=1.0)
    dropped = apply(always, p, x, t, cond, train=True, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_array_equal(dropped, apply(model, p, x, t, None))
    assert float(jnp.abs(apply(model, p, x, t, cond) - dropped).max()) > 1e-3


# bf16 has an 8-bit significand: one rounding costs up to 2^-9 ~ 0.2% relative.
# A forward pass is a chain of ~10 roundings per block whose errors add roughly
# like a random walk, and the residual stream keeps relative errors from
# compounding: the tiny DiT lands at 0.7% and the tiny U-Net (more roundings
# per block) at 1.4% relative L2 error. 3% (15x one rounding) leaves margin
# without hiding real bugs (a wrong dtype path or a lost upcast gives O(1) errors).
BF16_REL_TOL = 3e-2


@pytest.mark.parametrize("make", [tiny_dit, tiny_unet])
def test_bf16_compute_matches_fp32(make):
    x, t, cond = inputs()
    fp32 = make()
    p = perturbed(init(fp32, x, t, cond), scale=0.1)
    ref = apply(fp32, p, x, t, cond)
    out = apply(make(dtype=jnp.bfloat16), p, x, t, cond)
    assert out.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < BF16_REL_TOL


def test_param_dtype_sets_storage_dtype():
    x, t, cond = inputs()
    variables = abstract_init(tiny_dit(param_dtype=jnp.bfloat16), x, t, cond)
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(nn.unbox(variables))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}


def test_as_model_fn_keeps_prediction_channels():
    model = tiny_dit()  # learn_sigma=True
    x, t, cond = inputs()
    p = perturbed(init(model, x, t, cond))
    out = jax.jit(as_model_fn(model))(p["params"], x, t, cond)
    # The weights are an argument in both programs: the same computation, to rounding.
    np.testing.assert_allclose(out, apply(model, p, x, t, cond)[..., :4], atol=1e-6)


def test_sincos_pos_embed_matches_reference_layout():
    table = sincos_pos_embed_2d(8, 2, 3)
    # Token (row 1, col 2): first half encodes the column, second the row.
    omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
    expect = np.concatenate([np.sin(2 * omega), np.cos(2 * omega),
                             np.sin(1 * omega), np.cos(1 * omega)])
    np.testing.assert_allclose(table[1 * 3 + 2], expect, rtol=1e-6)


# ---------------------------------------------------------------- sharding, tables, FLOPs


@pytest.mark.parametrize("make", [tiny_dit, tiny_unet])
def test_params_shard_over_fsdp_and_give_same_output(make):
    model = make()
    x, t, cond = inputs()
    mesh = make_mesh(fsdp=4)
    abstract = abstract_init(model, x, t, cond)
    boxes = jax.tree.leaves(abstract, is_leaf=lambda a: isinstance(a, nn.Partitioned))
    assert all(isinstance(b, nn.Partitioned) for b in boxes)  # every parameter is named
    shardings = param_shardings(abstract, mesh)
    specs = [s.spec for s in jax.tree.leaves(nn.unbox(shardings))]
    assert sum("fsdp" in spec for spec in specs) >= len(specs) // 2
    p = perturbed(init(model, x, t, cond))
    p_sharded = jax.device_put(p, nn.unbox(shardings))
    kernel = p_sharded["params"]["t_embedder"]["fc2"]["kernel"]
    assert tuple(kernel.sharding.spec) == (None, "fsdp")
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0], kernel.shape[1] // 4)
    out = jax.jit(model.apply)(p_sharded, x, t, cond)
    np.testing.assert_allclose(out, apply(model, p, x, t, cond), atol=1e-5)


def test_param_table_lists_every_parameter_and_total():
    model = tiny_unet()
    x, t, cond = inputs()
    params = init(model, x, t, cond)["params"]
    table = param_table(params)
    n = count_params(params)
    assert table.splitlines()[-1].split()[-1] == f"{n:,}"
    assert "t_embedder/fc1/kernel" in table and "('freq', 'mlp')" in table
    assert len(table.splitlines()) == len(jax.tree.leaves(nn.unbox(params))) + 4
    top = param_table(params, depth=1)
    assert "mid_attn " in top and top.splitlines()[-1].split()[-1] == f"{n:,}"


def test_forward_flops_match_dit_paper():
    # DiT-XL/2 on 32x32x4 latents (256 px): 118.6 "Gflops" in the paper, counted
    # by fvcore as multiply-adds; XLA counts 2 FLOPs per multiply-add.
    model = dit("DiT-XL/2")
    flops = forward_flops(model, S((2, 32, 32, 4), jnp.float32), S((2,), jnp.float32),
                          {"label": S((2,), jnp.int32)})
    assert abs(flops / 2 / 2 / 118.6e9 - 1) < 0.01
