"""Per-device memory of a sharded train step, from XLA's ahead-of-time compilation.

    python benchmarks/bench_memory.py                          # DiT-XL/2, 8/32/256 devices
    python benchmarks/bench_memory.py --devices 8 --remat on --scan
    python benchmarks/bench_memory.py --model edm2-xxl --resolution 64 --remat off

The train step of ``benchmarks/bench_train.py`` (loss, gradient, clipping,
AdamW, EMA; float32 master weights, ``--dtype`` compute) is lowered for a
mesh of N simulated CPU devices
(``jaxgen.parallel.make_mesh(fsdp=F)``, ``F`` the largest divisor of N that
divides every dimension the rules shard; :func:`fsdp_size`): weights, EMA and
optimizer moments sharded by the models' logical axis rules
(``jaxgen.models.LOGICAL_AXIS_RULES``), the batch split over all N devices,
the state donated. Nothing is allocated:
``jit(...).lower(...).compile().memory_analysis()`` gives, per device, the
arguments (the state shard and the batch shard), the outputs, the bytes
aliased between them (the donated state) and XLA's temporary buffers
(activations kept for the backward pass, gathered weights, gradients). The
peak is arguments + outputs - aliased + temporaries.

Each device count runs in its own process (JAX fixes the CPU device count at
start-up). The figures are XLA CPU's buffer assignment: a TPU or GPU compiler
fuses and schedules differently (and keeps bf16 where the CPU backend may
compute in float32), so read them as an estimate of what fits, not as a
measurement of an accelerator.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30
CHIPS = {"v4 (16 GiB)": 16, "v5p (95 GiB)": 95}
"""HBM per chip of the TPUs the table is read against."""


def measure(model: str, devices: int, batch: int, dtype: str, remat: bool, scan: bool,
            resolution: int) -> dict:
    """Compile the train step for ``devices`` CPU devices; memory per device in bytes."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax
    from bench_train import make_optimizer, make_train_step
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxgen.models import abstract_init, count_params, create_model, param_shardings
    from jaxgen.parallel import batch_sharding, make_mesh

    jax.config.update("jax_num_cpu_devices", devices)
    options = dict(remat=remat, scan_blocks=scan) if model.startswith("DiT") else {}
    if not model.startswith("DiT") and (remat or scan):
        raise SystemExit(f"{model}: --remat on and --scan apply to DiT models only.")
    module = create_model(model, dtype=jnp.dtype(dtype), **options)
    S = jax.ShapeDtypeStruct
    x0 = S((batch, resolution, resolution, 4), jnp.float32)
    cond = {"label": S((batch,), jnp.int32)}
    boxed = abstract_init(module, x0, S((batch,), jnp.float32), cond)
    mesh = make_mesh(fsdp=fsdp_size(boxed, devices))
    params = nn.unbox(boxed)["params"]
    # Collections besides the weights (EDM2's Fourier buffers, a few KiB): constants.
    constants = {name: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
                 for name, tree in nn.unbox(boxed).items() if name != "params"}
    p_shard = nn.unbox(param_shardings(boxed, mesh))["params"]
    opt = jax.eval_shape(make_optimizer().init, params)
    key = jax.eval_shape(lambda: jax.random.key(0))
    state = (params, params, opt, key)
    rep = NamedSharding(mesh, PartitionSpec())
    # The AdamW moments are sharded like the parameters they mirror; counts are replicated.
    opt_shard = optax.tree_map_params(make_optimizer(), lambda _, s: s, opt, p_shard,
                                      transform_non_params=lambda _: rep)
    state_shard = (p_shard, p_shard, opt_shard, rep)
    data = batch_sharding(mesh)
    start = time.perf_counter()
    compiled = jax.jit(
        make_train_step(module, constants),
        in_shardings=(state_shard, data, data),
        out_shardings=(state_shard, rep),
        donate_argnums=0,
    ).lower(state, x0, cond).compile()
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
    return dict(model=model, devices=devices, fsdp=mesh.shape["fsdp"], batch=batch, dtype=dtype,
                remat=remat, scan=scan,
                params=count_params(params), arguments=m.argument_size_in_bytes,
                outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
                temp=m.temp_size_in_bytes, peak=peak, compile_s=seconds)


def fsdp_size(boxed, devices: int) -> int:
    """The largest ``fsdp`` axis that divides ``devices`` and every dimension it would split.

    DiT-XL/2's width 1152 = 2^7 * 9 splits at most 128 ways, so 256 devices
    become a (data 2, fsdp 128) mesh: weights in 128 shards, the batch in 256.
    """
    import flax.linen as nn
    import jax

    from jaxgen.models import LOGICAL_AXIS_RULES

    sharded = {name for name, axis in LOGICAL_AXIS_RULES if axis == "fsdp"}
    size = devices
    for box in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        if not isinstance(box, nn.Partitioned):  # an unsharded variable (EDM2's buffers)
            continue
        for dim, name in zip(box.value.shape, box.names, strict=True):
            if name in sharded:
                size = math.gcd(size, dim)
    return size


def row(r: dict) -> str:
    """One Markdown table row."""
    fits = " | ".join("yes" if r["peak"] <= gib * GIB else "no" for gib in CHIPS.values())
    mesh = f"{r['devices'] // r['fsdp']} x {r['fsdp']}"
    return (f"| {r['model']} | {r['devices']} | {mesh} | {r['batch'] // r['devices']} | "
            f"{'on' if r['remat'] else 'off'} | {r['arguments'] / GIB:.2f} | "
            f"{r['temp'] / GIB:.2f} | **{r['peak'] / GIB:.2f}** | {fits} | "
            f"{r['compile_s']:.0f} |")


def main() -> None:
    """Run one compilation per (device count, remat) in a fresh process; print the table."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XL/2",
                   help="a jaxgen DiT name, or an EDM2 preset (edm2-xxl: 64x64x4 latents)")
    p.add_argument("--devices", type=int, nargs="+", default=[8, 32, 256])
    p.add_argument("--batch", type=int, default=256, help="global batch")
    p.add_argument("--resolution", type=int, default=32, help="latent height and width")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--remat", choices=("on", "off", "both"), default="both",
                   help="DiT only; give --remat off for other models")
    p.add_argument("--scan", action="store_true", help="nn.scan over the DiT blocks")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process
    args = p.parse_args()
    if args.one:
        r = measure(args.model, args.devices[0], args.batch, args.dtype, args.remat == "on",
                    args.scan, args.resolution)
        print(json.dumps(r))
        return
    print(f"{args.model}, global batch {args.batch}, {args.resolution}x{args.resolution}x4 "
          f"latents, {args.dtype} compute, float32 weights + EMA + AdamW moments, "
          f"FSDP (weights over the largest fsdp axis they divide, batch over all devices)"
          f"{', scan over blocks' if args.scan else ''}; "
          f"load {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    print("| model | devices | mesh data x fsdp | batch/device | remat | state + batch, GiB | "
          "temporaries, GiB | peak per device, GiB | "
          f"{' | '.join(f'fits {c}' for c in CHIPS)} | compile, s |")
    print("|---|---:|---|---:|---|---:|---:|---:|" + "---|" * len(CHIPS) + "---:|", flush=True)
    remats = ("off", "on") if args.remat == "both" else (args.remat,)
    for n in args.devices:
        for remat in remats:
            cmd = [sys.executable, __file__, "--one", "--model", args.model, "--devices", str(n),
                   "--batch", str(args.batch), "--resolution", str(args.resolution),
                   "--dtype", args.dtype, "--remat", remat, *(["--scan"] if args.scan else [])]
            out = subprocess.run(cmd, capture_output=True, text=True,
                                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
            if out.returncode:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
            print(row(json.loads(out.stdout.strip().splitlines()[-1])), flush=True)


if __name__ == "__main__":
    main()
