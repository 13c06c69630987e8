"""Throughput and FLOPs of jaxgen's models.

Prints, for DiT-S/2 on 32x32x4 latents and the DDPM CIFAR-10 U-Net on
32x32x3 images: forward and forward+backward images/s (median of ``--runs``
timed runs after a compile-and-warm-up call) and the achieved FLOP/s; then
forward FLOPs per image of every DiT size next to the paper's Table 4.

FLOPs come from XLA's cost analysis (2 per multiply-add); the DiT paper's
"Gflops" are fvcore multiply-adds, so the table shows XLA FLOPs / 2 next to them.

Usage::

    python benchmarks/bench_models.py                    # CPU, float32, batch 64
    python benchmarks/bench_models.py --dtype bfloat16   # e.g. on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jaxgen.models import DIT_PATCHES, DIT_SIZES, count_params, create_model, forward_flops

# DiT paper, Table 4: forward Gflops (multiply-adds) per image at 256 px (32x32x4 latents).
DIT_PAPER_GFLOPS = {
    "DiT-S/2": 6.06, "DiT-S/4": 1.41, "DiT-S/8": 0.36,
    "DiT-B/2": 23.01, "DiT-B/4": 5.56, "DiT-B/8": 1.42,
    "DiT-L/2": 80.71, "DiT-L/4": 19.70, "DiT-L/8": 5.01,
    "DiT-XL/2": 118.64, "DiT-XL/4": 29.05, "DiT-XL/8": 7.39,
}
CASES = {  # model name, input shape without batch, class-conditional
    "DiT-S/2": ((32, 32, 4), True),
    "unet-ddpm-cifar10": ((32, 32, 3), False),
}


def _median_seconds(fn, args, runs: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_throughput(name: str, batch: int, runs: int, dtype) -> dict:
    """Forward and forward+backward images/s and FLOP/s of one model at ``batch``."""
    shape, conditional = CASES[name]
    model = create_model(name, dtype=dtype)
    kx, kt, ke, kd = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (batch, *shape))
    t = jax.random.uniform(kt, (batch,), maxval=1000.0)
    cond = {"label": jnp.arange(batch, dtype=jnp.int32) % 1000} if conditional else None
    params = jax.jit(model.init)(kd, x, t, cond)["params"]
    eps = jax.random.normal(ke, (*x.shape[:3], shape[-1] * (2 if model.learn_sigma else 1)))

    forward = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, cond))

    def loss(p, x, t):
        out = model.apply({"params": p}, x, t, cond, train=True, rngs={"dropout": kd})
        return jnp.mean((out - eps) ** 2)

    train = jax.jit(jax.value_and_grad(loss))
    fwd_s = _median_seconds(forward, (params, x, t), runs)
    train_s = _median_seconds(train, (params, x, t), runs)
    flops = forward_flops(model, x, t, cond) / batch
    return dict(
        name=name, params=count_params(params), flops=flops,
        fwd=batch / fwd_s, fwd_flops=flops * batch / fwd_s,
        train=batch / train_s, train_flops=3 * flops * batch / train_s,  # backward ~ 2x forward
    )


def dit_flops_table() -> list[tuple[str, float, float]]:
    """(name, XLA GFLOPs / 2, paper Gflops) per image for every DiT at 32x32x4."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    cond = {"label": jax.ShapeDtypeStruct((1,), jnp.int32)}
    rows = []
    for size in DIT_SIZES:
        for patch in DIT_PATCHES:
            name = f"DiT-{size}/{patch}"
            gflops = forward_flops(create_model(name), x, t, cond) / 2e9
            rows.append((name, gflops, DIT_PAPER_GFLOPS[name]))
    return rows


def main() -> None:
    """Parse flags, run the benchmarks and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5, help="timed runs; the median is shown")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    print(f"# device: {device.device_kind} x{jax.device_count()} ({jax.default_backend()}), "
          f"dtype {args.dtype}, batch {args.batch}, median of {args.runs} runs")
    print("| model | params | fwd GFLOPs/img | fwd img/s | fwd GFLOP/s "
          "| fwd+bwd img/s | fwd+bwd GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        r = bench_throughput(name, args.batch, args.runs, dtype)
        print(f"| {r['name']} | {r['params']:,} | {r['flops'] / 1e9:.2f} | {r['fwd']:.1f} "
              f"| {r['fwd_flops'] / 1e9:.0f} | {r['train']:.1f} | {r['train_flops'] / 1e9:.0f} |",
              flush=True)
    print("\n| DiT (32x32x4 latents) | XLA GFLOPs/2 per image | paper Gflops | ratio |")
    print("|---|---:|---:|---:|")
    for name, ours, paper in dit_flops_table():
        print(f"| {name} | {ours:.2f} | {paper:.2f} | {ours / paper:.3f} |")


if __name__ == "__main__":
    main()
