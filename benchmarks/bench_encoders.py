"""Encoder speed (jaxgen vs transformers, same random weights) and CMMD's cost.

    python benchmarks/bench_encoders.py [--runs 3] [--batch 8] [--cmmd-n 10000]

1. Images/s of the whole feature path from uint8 images (preprocessing +
   network): DINOv2 ViT-L/14 as FD-DINOv2 runs it (jaxgen: PIL-exact resize
   to 224 + Flax, jitted; transformers: ``Dinov2Model`` on the same
   preprocessed pixels, preprocessing not timed) and CLIP ViT-L/14-336.
   Both on this machine's CPU, alternating, weights from one seeded draw.
   transformers and torch are optional; without them only jaxgen is timed.
2. CMMD between two ``--cmmd-n`` x 768 unit-norm embedding sets: seconds and
   peak traced memory (tracemalloc sees NumPy's buffers) at block 4096;
   the cost grows as N^2 (30k x 30k is 9x the 10k figure).

Prints a Markdown table (medians of ``--runs``) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import tracemalloc

import numpy as np


def _median_time(fn, runs: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _random_params(module, size: int, seed: int):
    import jax
    import jax.numpy as jnp

    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: (rng.standard_normal(s.shape) / np.sqrt(s.shape[0] if s.ndim > 1 else 50))
        .astype(np.float32), shapes)


def bench_encoders(runs: int, batch: int) -> list[tuple[str, float, float | None]]:
    import jax

    from jaxgen.encoders import clip, dinov2

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 256, 256, 3), dtype=np.uint8)
    rows = []
    cases = [("DINOv2 ViT-L/14 (FD-DINOv2 input)", dinov2.model("vitl14"), 224,
              dinov2.preprocess_dgm_eval, "cls"),
             ("CLIP ViT-L/14-336 (CMMD input)", clip.model("vitl14_336"), 336,
              clip.preprocess_cmmd, "embedding")]
    for name, module, size, prep, key in cases:
        variables = _random_params(module, size, 1)
        fn = jax.jit(lambda v, x, m=module, p=prep, k=key: m.apply(v, p(x))[k])
        run = lambda f=fn, v=variables: jax.block_until_ready(f(v, images))
        t_jax = _median_time(run, runs)
        t_torch = _torch_time(name, np.array(jax.jit(prep)(images)), runs)
        rows.append((name, batch / t_jax, None if t_torch is None else batch / t_torch))
    return rows


def _torch_time(name: str, pixels: np.ndarray, runs: int) -> float | None:
    try:
        import torch
        from transformers import (
            CLIPVisionConfig,
            CLIPVisionModelWithProjection,
            Dinov2Config,
            Dinov2Model,
        )
    except ImportError:
        return None
    if name.startswith("DINOv2"):
        model = Dinov2Model(Dinov2Config(hidden_size=1024, num_hidden_layers=24,
                                         num_attention_heads=16, image_size=518, patch_size=14))
    else:
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
            intermediate_size=4096, image_size=336, patch_size=14, projection_dim=768,
            hidden_act="quick_gelu"))
    model.eval()
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()

    def run():
        with torch.no_grad():
            model(pixel_values=x)

    return _median_time(run, runs)


def bench_cmmd(n: int) -> tuple[float, float]:
    from jaxgen.metrics.cmmd import cmmd

    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    x, y = unit(rng.standard_normal((n, 768))), unit(rng.standard_normal((n, 768)) + 0.05)
    tracemalloc.start()
    t = time.perf_counter()
    value = cmmd(x, y)
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"cmmd = {value:.6f}")
    return seconds, peak / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cmmd-n", type=int, default=10000)
    p.add_argument("--skip-encoders", action="store_true")
    args = p.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, batch {args.batch}")
    if not args.skip_encoders:
        print("| encoder | jaxgen img/s | transformers img/s | ratio |")
        print("|---|---|---|---|")
        for name, ours, theirs in bench_encoders(args.runs, args.batch):
            ratio = "-" if theirs is None else f"{ours / theirs:.2f}"
            theirs_s = "-" if theirs is None else f"{theirs:.2f}"
            print(f"| {name} | {ours:.3f} | {theirs_s} | {ratio} |")
    seconds, peak = bench_cmmd(args.cmmd_n)
    print(f"| CMMD {args.cmmd_n} x {args.cmmd_n}, D=768, float64 | {seconds:.1f} s | "
          f"peak {peak:.0f} MiB |")


if __name__ == "__main__":
    main()
