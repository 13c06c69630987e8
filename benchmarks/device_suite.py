"""The accelerator figures of BENCHMARKS.md in one run (called by ``device_suite.sh``).

    python benchmarks/device_suite.py            # on a GPU or TPU machine, < 8 minutes
    python benchmarks/device_suite.py --smoke    # tiny sizes, any CPU, ~20 s

Three measurements, each compilation excluded and reported apart:

1. **FID of 50k images end to end**: ``--fid-images`` random uint8 32x32 RGB
   images through jaxgen's feature path (TF1 bilinear resize to 299,
   Inception-v3, pool3), their float64 statistics and the Fréchet distance to
   a second set's statistics; Inception features/s and the seconds for the
   whole set. The FID weights are used when found (``load_inception``); else
   randomly initialised ones (same speed; the FID value is then meaningless).
2. **DiT-XL/2 train step**: the step of ``bench_train.py`` (loss, backward,
   clipping, AdamW, EMA) in bf16 compute with float32 master weights and
   remat of the blocks, global batch ``--train-batch`` of 32x32x4 latents over
   every device; images/s and the model FLOPs utilisation (3x XLA's forward
   FLOPs, a multiply-add counted as 2, recomputation not counted, over the
   chip's dense bf16 peak).
3. **DiT-XL/2 sampling**: ``jaxgen.sampling.sample`` with DDIM, 50 steps,
   classifier-free guidance 1.5 (two model passes per step, as DiT's FID-50K
   setting), bf16, ``--sample-batch`` latents; images/s (latents; the VAE
   decoder is not included).

Prints one Markdown table ready for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from bench_train import make_optimizer, make_train_step

from jaxgen import diffusion, sampling
from jaxgen.errors import InputError
from jaxgen.metrics import FeatureExtractor, GaussianStats, InceptionV3, frechet_distance
from jaxgen.metrics.weights import load_inception
from jaxgen.models import create_model, forward_flops
from jaxgen.parallel import batch_sharding, make_mesh, replicated

PEAK_BF16_TFLOPS = {  # dense bf16 peak per chip, from the vendors' data sheets
    "H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6": 918.0,
}

FULL = dict(fid_images=50_000, fid_batch=500, model="DiT-XL/2", model_kwargs={},
            resolution=32, train_batch=256, train_steps=10, sample_batch=256, sample_steps=50)
SMOKE = dict(fid_images=16, fid_batch=8, model="DiT-S/2",
             model_kwargs=dict(hidden=64, depth=1, num_heads=2), resolution=8, train_batch=8,
             train_steps=2, sample_batch=8, sample_steps=2)


def peak_tflops(kind: str) -> float | None:
    """The dense bf16 peak of a device kind (``jax.devices()[0].device_kind``), if known."""
    for name in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "TPU v5p" before "TPU v5"
        if name in kind:
            return PEAK_BF16_TFLOPS[name]
    return None


def timed(fn):
    """``(result, seconds)`` of ``fn()``, waiting for its device work."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def fid_end_to_end(n: int, batch: int) -> dict:
    """Features/s of the FID Inception and seconds for ``n`` images to an FID value."""
    try:
        module, variables = load_inception(download=False)
        weights = module.source
    except InputError:
        module = InceptionV3(with_logits=False)
        variables = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 299, 299, 3)))
        weights = "random weights"
    extractor = FeatureExtractor(module, variables, batch_size=batch)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    _, compile_s = timed(lambda: extractor(images[:batch]))
    start = time.perf_counter()
    stats = GaussianStats.from_features(extractor(images)["pool3"])
    features_s = time.perf_counter() - start
    reference = GaussianStats(stats.mu + 0.01, stats.sigma)
    fid = frechet_distance(stats, reference)
    total = time.perf_counter() - start
    return dict(rate=n / features_s, total=total, compile=compile_s, fid=fid, weights=weights)


def train_step(cfg: dict, remat: bool) -> dict:
    """Images/s and MFU of the bf16 DiT train step at ``cfg["train_batch"]``."""
    module = create_model(cfg["model"], dtype=jnp.bfloat16, remat=remat, **cfg["model_kwargs"])
    mesh = make_mesh()
    b, r = cfg["train_batch"], cfg["resolution"]
    rng = np.random.default_rng(0)
    x0 = jax.device_put(rng.standard_normal((b, r, r, 4)).astype(np.float32), batch_sharding(mesh))
    cond = jax.device_put({"label": rng.integers(0, 1000, b).astype(np.int32)},
                          batch_sharding(mesh))
    params = nn.unbox(jax.jit(module.init)(jax.random.key(0), x0[:1], jnp.zeros((1,)),
                                           {"label": cond["label"][:1]}))["params"]
    state = (params, jax.tree.map(jnp.copy, params), make_optimizer().init(params),
             jax.random.key(1))
    state = jax.device_put(state, replicated(mesh))
    step = jax.jit(make_train_step(module), donate_argnums=0)
    (state, _), compile_s = timed(lambda: step(state, x0, cond))
    start = time.perf_counter()
    for _ in range(cfg["train_steps"]):
        state, loss = step(state, x0, cond)
    jax.block_until_ready(loss)
    sec = (time.perf_counter() - start) / cfg["train_steps"]
    flops = 3 * forward_flops(module, jax.ShapeDtypeStruct(x0.shape, jnp.float32),
                              jax.ShapeDtypeStruct((b,), jnp.float32),
                              {"label": jax.ShapeDtypeStruct((b,), jnp.int32)})
    return dict(rate=b / sec, tflops=flops / sec / 1e12, compile=compile_s)


def sample_rate(cfg: dict) -> dict:
    """Images/s of DDIM with classifier-free guidance at ``cfg["sample_steps"]`` steps."""
    module = create_model(cfg["model"], dtype=jnp.bfloat16, **cfg["model_kwargs"])
    b, r = cfg["sample_batch"], cfg["resolution"]
    labels = {"label": jnp.arange(b, dtype=jnp.int32) % 1000}
    params = nn.unbox(jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, r, r, 4)),
                                           jnp.zeros((1,)), {"label": labels["label"][:1]}))
    params = jax.tree.map(lambda p: p + 0.01, params)["params"]  # zero-init layers act

    def model_fn(p, x_t, t, c):
        return module.apply({"params": p}, x_t, 1000 * t, c)[..., : x_t.shape[-1]]

    guidance = sampling.Guidance(scale=1.5, uncond={"label": jnp.full((1,), 1000, jnp.int32)})

    def run():
        x, _ = sampling.sample(model_fn, params, diffusion.VP(), jax.random.key(0), (b, r, r, 4),
                               prediction="eps", solver="ddim", steps=cfg["sample_steps"],
                               cond=labels, guidance=guidance)
        return x

    _, compile_s = timed(run)
    _, sec = timed(run)
    return dict(rate=b / sec, compile=compile_s)


def main() -> None:
    """Run the three measurements and print the table."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a check that it runs)")
    p.add_argument("--no-remat", action="store_true",
                   help="keep every block's activations (DiT-XL/2 at batch 256 then needs "
                        "several chips)")
    p.add_argument("--peak-tflops", type=float, help="chip's bf16 peak, if not in the table")
    for key in ("fid_images", "train_batch", "sample_batch"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int)
    args = p.parse_args()
    cfg = dict(SMOKE if args.smoke else FULL)
    cfg.update({k: v for k in ("fid_images", "train_batch", "sample_batch")
                if (v := getattr(args, k)) is not None})
    dev = jax.devices()[0]
    peak = args.peak_tflops or peak_tflops(dev.device_kind)
    begin = time.perf_counter()
    print(f"{jax.device_count()} x {dev.device_kind} ({dev.platform}), jax {jax.__version__}, "
          f"host {platform.node()} ({os.cpu_count()} CPUs){', SMOKE sizes' if args.smoke else ''}",
          flush=True)
    fid = fid_end_to_end(cfg["fid_images"], cfg["fid_batch"])
    train = train_step(cfg, remat=not args.no_remat)
    samp = sample_rate(cfg)
    mfu = f"{train['tflops'] / peak:.1%}" if peak else "n/a (pass --peak-tflops)"
    name = cfg["model"] + (" (smoke size)" if args.smoke else "")
    print(f"\n| measurement ({jax.device_count()} x {dev.device_kind}) | result | compile, s |")
    print("|---|---|---:|")
    print(f"| FID of {cfg['fid_images']:,} random 32x32 images end to end ({fid['weights']}) | "
          f"{fid['rate']:,.3g} Inception features/s, {fid['total']:.1f} s in all | "
          f"{fid['compile']:.1f} |")
    print(f"| {name} bf16 train step, batch {cfg['train_batch']}"
          f"{'' if args.no_remat else ', remat'} | {train['rate']:,.1f} img/s, "
          f"{train['tflops']:.1f} TFLOP/s, MFU {mfu} | {train['compile']:.1f} |")
    print(f"| {name} sampling, DDIM {cfg['sample_steps']} steps, CFG 1.5, batch "
          f"{cfg['sample_batch']} | {samp['rate']:,.2f} img/s | {samp['compile']:.1f} |")
    print(f"\nsuite: {time.perf_counter() - begin:.0f} s", flush=True)


if __name__ == "__main__":
    main()
