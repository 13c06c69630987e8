"""Encode and decode images/s of the SD VAE: jaxgen vs diffusers on the same CPU, one process.

    PYTHONPATH=. python benchmarks/bench_vae.py [--resolution 128] [--batch 4] [--runs 3]

Builds diffusers' ``AutoencoderKL`` with the SD config (83,653,863
parameters, PyTorch's default random initialisation), hands its weights to
jaxgen through a diffusers safetensors file and
:func:`jaxgen.models.load_weights`, checks that both decode the same latent
to 1e-4 (relative to the output's scale), then times ``encode`` (posterior
moments) and ``decode`` on a batch of ``resolution``² RGB images, the two
libraries alternating, ``--runs`` times each after one warm-up call; prints
the medians and jaxgen / diffusers ratios. jaxgen is timed twice: as
``jaxgen.encode`` and the samplers call it (:func:`jaxgen.models.micro_batched`:
one image at a time from 128x128 up) and on the whole batch at once.
float32 throughout. Needs torch and diffusers (not jaxgen dependencies).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import safetensors.numpy
import torch
from diffusers import AutoencoderKL

from jaxgen.models import create_model, micro_batched
from jaxgen.models.checkpoints import load_weights


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)

    ref = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4).eval()
    model = create_model("vae-sd")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "diffusion_pytorch_model.safetensors"
        safetensors.numpy.save_file({k: v.numpy() for k, v in ref.state_dict().items()}, str(path))
        variables = load_weights(tmp, model)

    rng = np.random.default_rng(0)
    r, b = args.resolution, args.batch
    x = rng.uniform(-1, 1, (b, r, r, 3)).astype(np.float32)
    z = rng.standard_normal((b, r // 8, r // 8, 4)).astype(np.float32)
    x_t, z_t = torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(z).permute(0, 3, 1, 2)

    def jitted(method, micro):
        def run(v, a):
            fn = lambda u: model.apply(v, u, method=method)
            return micro_batched(fn, a, pixels=r * r) if micro else fn(a)
        return jax.jit(run)

    encode, decode = jitted("encode", True), jitted("decode", True)
    whole = {m: jitted(m, False) for m in ("encode", "decode")}
    calls = {
        "encode": (lambda: jax.block_until_ready(encode(variables, x)),
                   lambda: jax.block_until_ready(whole["encode"](variables, x)),
                   lambda: ref.encode(x_t).latent_dist.mean),
        "decode": (lambda: jax.block_until_ready(decode(variables, z)),
                   lambda: jax.block_until_ready(whole["decode"](variables, z)),
                   lambda: ref.decode(z_t).sample),
    }
    with torch.no_grad():
        want = ref.decode(z_t).sample.permute(0, 2, 3, 1).numpy()
        got = np.asarray(decode(variables, z))
        err = float(np.abs(got - want).max() / np.abs(want).max())
        assert err < 1e-4, f"jaxgen and diffusers disagree: relative error {err:.3g}"
        print(f"SD VAE, {b} x {r}x{r}x3, float32; decode relative max difference {err:.2g}")
        print(f"load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
        for name, (jaxgen_fn, batch_fn, torch_fn) in calls.items():
            jaxgen_fn(), batch_fn(), torch_fn()  # compile / warm up
            times = {"jaxgen": [], "batch": [], "diffusers": []}
            for _ in range(args.runs):
                times["jaxgen"].append(_seconds(jaxgen_fn))
                times["batch"].append(_seconds(batch_fn))
                times["diffusers"].append(_seconds(torch_fn))
            rate = {k: b / statistics.median(v) for k, v in times.items()}
            ratio = {k: rate[k] / rate["diffusers"] for k in ("jaxgen", "batch")}
            print(f"{name}: jaxgen {rate['jaxgen']:.2f} img/s (whole batch at once "
                  f"{rate['batch']:.2f}), diffusers {rate['diffusers']:.2f} img/s, ratio "
                  f"{ratio['jaxgen']:.2f} ({ratio['batch']:.2f})")


if __name__ == "__main__":
    main()
