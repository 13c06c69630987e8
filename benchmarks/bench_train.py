"""Train-step throughput: steps/s and images/s of the jitted, sharded train step.

    python benchmarks/bench_train.py                       # default recipe + DiT-S/2
    python benchmarks/bench_train.py --only dit-s2 --batch-size 32 --dtype bfloat16

Each case times ``--steps`` consecutive steps on a fixed synthetic batch
(the input pipeline is not measured), after one compiling step, ``--repeats``
times, and prints the median with the FLOPs of a step (3x the forward pass,
XLA's count) and the achieved FLOP/s. On a GPU/TPU ``--peak-tflops`` adds the
model FLOPs utilisation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import fashion_mnist
from jaxgen.models import forward_flops
from jaxgen.parallel import make_mesh
from jaxgen.train import init_state, make_setup, make_train_step


def cases() -> dict[str, tuple[ml_collections.ConfigDict, tuple[int, int, int], int]]:
    """name -> (config, image shape, default batch size)."""
    default = fashion_mnist.get_config()
    dit = fashion_mnist.get_config()
    dit.model.name = "DiT-S/2"
    dit.model.kwargs = ml_collections.ConfigDict(dict(num_classes=10, learn_sigma=False))
    return {
        "default (fashion_mnist.py)": (default, (28, 28, 1), default.data.batch_size),
        "dit-s2": (dit, (28, 28, 1), 8),
    }


def bench(config, shape, batch_size: int, steps: int, repeats: int, dtype: str) -> dict:
    """Median seconds per step over ``repeats`` runs of ``steps`` steps."""
    config.train.compute_dtype = dtype
    setup = make_setup(config, make_mesh(), shape, 10_000)
    state = init_state(setup, seed=0)
    step = make_train_step(setup)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (batch_size, *shape), dtype=np.uint8)),
             "label": jnp.asarray(rng.integers(0, 10, (batch_size,)), jnp.int32)}
    start = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, batch)
        jax.block_until_ready((state, m))
        times.append((time.perf_counter() - start) / steps)
    x = jax.ShapeDtypeStruct((batch_size, *shape), jnp.float32)
    t = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
    cond = {"label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    flops = 3 * forward_flops(setup.module, x, t, cond)
    sec = statistics.median(times)
    return dict(sec=sec, runs=times, compile_s=compile_s, flops=flops)


def main() -> None:
    """Run the cases and print one line each."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="run only this case (default, dit-s2)")
    p.add_argument("--batch-size", type=int, help="override every case's batch size")
    p.add_argument("--steps", type=int, default=10, help="steps per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--peak-tflops", type=float, help="accelerator peak, for MFU")
    args = p.parse_args()
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, dtype {args.dtype}")
    for name, (config, shape, batch) in cases().items():
        if args.only and not name.startswith(args.only):
            continue
        batch = args.batch_size or batch
        steps = args.steps if name.startswith("default") else max(2, args.steps // 4)
        r = bench(config, shape, batch, steps, args.repeats, args.dtype)
        line = (f"{name:28s} {config.model.name:10s} batch {batch:4d} {shape}: "
                f"{1 / r['sec']:7.2f} steps/s, {batch / r['sec']:8.1f} images/s (median of "
                f"{args.repeats} x {steps} steps; runs {min(r['runs']):.3f}-{max(r['runs']):.3f} "
                f"s/step), {r['flops'] / 1e9:.1f} GFLOP/step, "
                f"{r['flops'] / r['sec'] / 1e9:.1f} GFLOP/s, compile {r['compile_s']:.1f} s")
        if args.peak_tflops:
            line += f", MFU {r['flops'] / r['sec'] / (args.peak_tflops * 1e12):.1%}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
