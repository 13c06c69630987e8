"""Feature caching: wall-clock speed-up against sample quality at equal NFE.

Usage::

    python benchmarks/bench_feature_cache.py --workdir /tmp/runs/fm_teacher --num 1000
    python benchmarks/bench_feature_cache.py --dit --workdir runs/fm_dit --num 1000
    python benchmarks/bench_feature_cache.py --dit --num 64

With ``--workdir`` (a trained run: DeepCache on a U-Net, FORA on a DiT, whichever its
model is; ``--dit`` insists on a DiT): ``--num`` samples (Euler, ``--steps``, so every
interval has the same NFE) at each ``--intervals`` value (``0`` = no cache), the
sampling time (median of ``--repeats`` runs after a compile), the network passes that
run in full per sample, the FID of the samples against ``fashion_mnist:test`` (the
first ``--num-real`` images, by ``python -m jaxgen.evaluate``; ``--no-fid`` skips it),
and the RMS distance of the samples to the uncached ones from the same noise.
``--plot PNG`` draws the FID against the speed-up. With ``--dit`` alone, FORA on a
randomly initialised DiT-S/2 on ``--resolution`` x ``--resolution`` x 4 inputs (every
weight N(0, 0.02^2), so the blocks are not the identity): time and RMS distance only
(a random model has no FID).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import diffusion as D
from jaxgen import models
from jaxgen import sampling as S


def _time(fn, repeats):
    """Median seconds of ``fn() -> (x, info)`` after a compile, and its last output."""
    jax.block_until_ready(fn()[0])  # compile
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        jax.block_until_ready(out[0])
        runs.append(time.perf_counter() - start)
    return float(np.median(runs)), out


def sweep(args, sample_fn, fid_of=None):
    """Time ``sample_fn(cache_interval) -> (x, info)`` at each interval; the rows."""
    rows, plain = [], None
    for interval in args.intervals:
        seconds, (x, info) = _time(lambda i=interval: sample_fn(i or None), args.repeats)
        plain = x if plain is None else plain
        nfe = info["nfe"]
        rows.append({"interval": interval, "seconds": seconds, "nfe": nfe,
                     # full passes: evaluations 0, k, 2k, ... (make_denoiser's count)
                     "full_passes": math.ceil(nfe / (interval or 1)),
                     "rms_vs_uncached": float(jnp.sqrt(jnp.mean((x - plain) ** 2)))})
        if fid_of is not None:
            rows[-1]["fid"] = fid_of(x)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def fid(args, x):
    """FID of model-space samples ``x`` against the Fashion-MNIST test set."""
    with tempfile.NamedTemporaryFile(suffix=".npz") as f:
        np.savez(f.name, arr_0=np.asarray(S.to_uint8(x)))
        out = subprocess.run(
            [sys.executable, "-m", "jaxgen.evaluate", "fashion_mnist:test", f.name,
             "--num-real", str(args.num_real), "--metrics", "fid"],
            capture_output=True, text=True, check=True,
        ).stdout
    return json.loads(out[out.rfind("\n{") + 1:])["fid"]  # the indented JSON it prints last


def trained_run(args):
    """The sweep on a trained run's model (its own model_fn, preconditioning included)."""
    from jaxgen.train import load_run

    run = load_run(args.workdir)
    parts = run.parts
    if args.dit and not parts.config.model.name.startswith("DiT-"):
        sys.exit(f"--dit: {args.workdir} trained {parts.config.model.name}, not a DiT")
    labels = np.arange(args.num) % max(parts.num_classes, 1)
    cond = {"label": jnp.asarray(labels, jnp.int32)} if parts.num_classes else None
    kw = dict(prediction=parts.prediction, solver=args.solver, steps=args.steps, cond=cond,
              mesh=parts.mesh)
    sample = lambda interval: S.sample(parts.model_fn, run.params, parts.process,
                                       jax.random.key(0), (args.num, *parts.image_shape),
                                       cache_interval=interval, **kw)
    return sweep(args, sample, (lambda x: fid(args, x)) if args.fid else None)


def random_dit(args):
    """The sweep on a randomly initialised DiT-S/2 (time and RMS distance only)."""
    module = models.DiT(patch=2, hidden=384, depth=12, num_heads=6, num_classes=0,
                        learn_sigma=False)
    shape = (args.num, args.resolution, args.resolution, 4)
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape), jnp.ones(shape[0]))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype),
                          nn.unbox(abstract))
    fn = models.as_model_fn(module)
    sample = lambda interval: S.sample(fn, params["params"], D.Flow(), jax.random.key(0), shape,
                                       prediction="velocity", solver=args.solver,
                                       steps=args.steps, cache_interval=interval)
    return sweep(args, sample)


def plot(rows, path: str, title: str) -> None:
    """FID against wall-clock speed-up, one point per cache interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = rows[0]["seconds"]
    plt.figure(figsize=(5, 3.5))
    plt.plot([base / r["seconds"] for r in rows], [r["fid"] for r in rows], "o-")
    for r in rows:
        plt.annotate(f"k={r['interval'] or 'off'}", (base / r["seconds"], r["fid"]),
                     textcoords="offset points", xytext=(4, 4))
    plt.xlabel("speed-up over uncached sampling (same NFE)")
    plt.ylabel("FID")
    plt.title(title)
    plt.savefig(path, dpi=100, bbox_inches="tight")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir")
    p.add_argument("--dit", action="store_true")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--num-real", type=int, default=1000)
    p.add_argument("--no-fid", dest="fid", action="store_false", help="skip the FIDs")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--solver", default="euler")
    p.add_argument("--intervals", type=lambda s: [int(v) for v in s.split(",")],
                   default=[0, 2, 3, 5])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--resolution", type=int, default=32, help="--dit input side")
    p.add_argument("--plot", help="write FID against speed-up to this PNG (with FIDs)")
    args = p.parse_args()
    if args.intervals[0] != 0:
        args.intervals = [0, *args.intervals]  # the uncached reference comes first
    rows = trained_run(args) if args.workdir else random_dit(args)
    base = rows[0]["seconds"]
    for r in rows:
        print(f"interval {r['interval'] or 'off':>4}: {r['seconds']:.2f} s "
              f"(x{base / r['seconds']:.2f}), {r['full_passes']}/{r['nfe']} full passes  "
              + f"RMS vs uncached {r['rms_vs_uncached']:.4f}"
              + (f"  FID {r['fid']:.2f}" if "fid" in r else ""))
    if args.plot and "fid" in rows[0]:
        plot(rows, args.plot, f"feature caching, {args.workdir}, {args.num} samples")
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
