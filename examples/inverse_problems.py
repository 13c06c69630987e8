"""Inpainting and 2x super-resolution with a trained run as the prior, with PSNR.

    python examples/inverse_problems.py --workdir /tmp/runs/fm_teacher --num 64 --out inverse.png

The first ``--num`` Fashion-MNIST test images are degraded (the centre 14x14
square masked out; 2x2 block means) and restored by DDNM (Wang et al. 2023,
noiseless ``y``) and PiGDM (Song et al. 2023, ``noise_std=0.01``) with
DPM-Solver++(2M), ``--steps`` steps. Printed: PSNR (dB, on [-1, 1] images, peak 2)
of each restoration and of the naive answer (mask filled with 0; nearest-neighbour
upsampling). The PNG rows: truth, degraded, DDNM, PiGDM, for 8 images per problem.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxgen.data import open_source
from jaxgen.sampling import inverse as I
from jaxgen.sampling import to_uint8
from jaxgen.train import load_run
from jaxgen.train.monitoring import image_grid


def psnr(x, truth):
    """Mean over images of ``10 log10(2^2 / MSE)`` on [-1, 1] images."""
    mse = np.mean((np.asarray(x, np.float64) - truth) ** 2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(4.0 / np.maximum(mse, 1e-12))))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default="inverse.png")
    args = p.parse_args()
    run = load_run(args.workdir)
    parts = run.parts
    images = open_source("fashion_mnist:test").read(np.arange(args.num))
    truth = images.astype(np.float64) / 127.5 - 1.0
    h, w, c = parts.image_shape
    mask = np.ones((h, w, 1), bool)
    mask[h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2] = False
    cond = ({"label": jnp.full((args.num,), parts.num_classes, jnp.int32)}
            if parts.num_classes else None)  # the null class: the unconditional prior
    problems = {"inpaint": I.Inpaint(mask), "sr2x": I.SuperResolution(2)}
    results, rows = {}, []
    for name, op in problems.items():
        y = op(jnp.asarray(truth, jnp.float32))
        naive = op.pinv(y)
        results[f"{name}_naive_psnr"] = psnr(naive, truth)
        row = [images[:8], np.asarray(to_uint8(naive[:8]))]
        for method, noise in (("ddnm", 0.0), ("pigdm", 0.01)):
            x, _ = I.posterior_sample(parts.model_fn, run.params, parts.process,
                                      jax.random.key(0), y, op, (args.num, h, w, c),
                                      prediction=parts.prediction, method=method,
                                      noise_std=noise, solver="dpmpp_2m", steps=args.steps,
                                      cond=cond)
            results[f"{name}_{method}_psnr"] = psnr(x, truth)
            row.append(np.asarray(to_uint8(x[:8])))
        rows.append(np.concatenate(row))
    Image.fromarray(image_grid(np.concatenate(rows), cols=8).squeeze()).save(args.out)
    print(json.dumps({"num": args.num, "steps": args.steps, "step": run.step, **results}))


if __name__ == "__main__":
    main()
