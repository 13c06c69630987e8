"""Bits per dimension of a trained run on a dataset, by the probability-flow ODE.

    python -m jaxgen.likelihood --workdir runs/fm --data fashion_mnist:test --num 1000

Prints one JSON object: ``bits_per_dim`` (the mean over the images) with its
standard error ``bits_per_dim_sem``, ``n``, ``divergence``, ``steps``, ``nfe`` (per
image), ``weights``, ``step``. Each image is uniformly dequantised in its
uint8 bin (:func:`jaxgen.sampling.likelihood.bits_per_dim`, bins of width 2/255),
and its log-likelihood integrated by RK4 from ``t ~ 0`` to ``t_max`` with a
Hutchinson divergence (``--divergence exact`` costs ``H W C`` passes per
evaluation). Image ``i`` depends only on ``(--seed, i)``: batches are split over
all devices like the sampler's, and the last one is padded and cut. VP, EDM and
flow runs alike; a class-conditional model is scored with the null class
(``p(x)``, learnt by label dropout) unless ``--conditional`` gives each image its
label (``p(x | y)``).
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from jaxgen import cli
from jaxgen.errors import InputError


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="python -m jaxgen.likelihood", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", required=True, help="a python -m jaxgen.train run folder")
    p.add_argument("--data", required=True, help="images: fashion_mnist:test, npz, folder, ...")
    p.add_argument("--num", type=int, help="score the first NUM images (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="images per device call")
    p.add_argument("--steps", type=int, default=64, help="RK4 steps (4 evaluations each)")
    p.add_argument("--divergence", default="hutchinson", choices=("hutchinson", "exact"))
    p.add_argument("--ema", help="weights: an EMA decay or 'params' (default: the run's first)")
    p.add_argument("--conditional", action="store_true", help="score p(x | label)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cli.check_positive(args, "num", "batch_size", "steps")

    import jax
    import jax.numpy as jnp

    from jaxgen.data import open_source
    from jaxgen.parallel import batch_sharding, pad_batch, to_host
    from jaxgen.sampling.likelihood import bits_per_dim
    from jaxgen.train import load_run

    run = load_run(args.workdir, args.ema)
    parts = run.parts
    if parts.is_consistency or parts.is_dmd2_generator or parts.latent is not None:
        kind = ("consistency" if parts.is_consistency else
                "DMD2 generator" if parts.is_dmd2_generator else "latent")
        raise InputError(
            f"{args.workdir}: a {kind} run; bits/dim needs a pixel-space diffusion or flow "
            "model."
        )
    source = open_source(args.data)
    n = min(args.num or len(source), len(source))
    if source.image_shape not in (None, tuple(parts.image_shape)):
        raise InputError(
            f"--data {args.data} holds {source.image_shape} images; the run models "
            f"{tuple(parts.image_shape)}."
        )
    if args.conditional and not (parts.num_classes and source.has_labels):
        raise InputError("--conditional needs a class-conditional run and labelled --data.")
    mesh, key = parts.mesh, jax.random.key(args.seed)
    rows = math.ceil(args.batch_size / mesh.size) * mesh.size
    scores, nfe = [], 0
    for start in range(0, n, rows):
        images, labels = source.read_with_labels(np.arange(start, min(start + rows, n)))
        cond = None
        if parts.num_classes:
            label = labels if args.conditional else np.full(len(images), parts.num_classes)
            cond = {"label": np.asarray(label, np.int32)}
        (images, cond), real = pad_batch((images, cond), rows)
        put = lambda a: jax.device_put(jnp.asarray(a), batch_sharding(mesh))
        bpd, info = bits_per_dim(parts.model_fn, run.params, parts.process, put(images), key,
                                 prediction=parts.prediction, cond=jax.tree.map(put, cond),
                                 divergence=args.divergence, steps=args.steps,
                                 first_index=start)
        scores.append(to_host(bpd)[:real])
        nfe = info["nfe"]
    scores = np.concatenate(scores).astype(np.float64)
    print(json.dumps({
        "bits_per_dim": float(scores.mean()),
        "bits_per_dim_sem": float(scores.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
        "n": n, "divergence": args.divergence, "steps": args.steps, "nfe": nfe,
        "weights": run.weights, "step": run.step, "data": args.data,
    }))
    return 0


if __name__ == "__main__":
    cli.run(main, split_cpu=True)
