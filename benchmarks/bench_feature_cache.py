"""Feature caching: wall-clock speed-up against sample quality at equal NFE.

Usage::

    python benchmarks/bench_feature_cache.py --workdir /tmp/runs/fm_teacher --num 1000
    python benchmarks/bench_feature_cache.py --dit --num 64

With ``--workdir`` (a trained U-Net run, flow or VP without EDM preconditioning),
DeepCache: ``--num`` samples (Euler, ``--steps``) at each ``--intervals`` value
(``0`` = no cache), the sampling time (median of ``--repeats`` runs after a
compile) and the FID of the samples against ``fashion_mnist:test`` (the first
``--num-real`` images, by ``python -m jaxgen.evaluate``; ``--no-fid`` skips it), and
the RMS distance of the samples to the uncached ones from the same noise. With ``--dit``, FORA on a
randomly initialised DiT-S/2 on ``--resolution`` x ``--resolution`` x 4 inputs (every
weight N(0, 0.02^2), so the blocks are not the identity): time, and the RMS distance
of the samples to the uncached ones from the same noise (a random model has no FID).
"""

from __future__ import annotations

import argparse
import json
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
    jax.block_until_ready(fn())  # compile
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        runs.append(time.perf_counter() - start)
    return float(np.median(runs)), out


def unet_run(args):
    from jaxgen.train import load_run

    run = load_run(args.workdir)
    parts = run.parts
    diff = parts.config.diffusion
    if diff.precond != "none" or diff.time_scale != 1.0 or diff.get("reverse_time", False):
        sys.exit("this benchmark calls the module directly: needs precond none, time_scale 1")
    fn = models.as_model_fn(parts.module, constants=parts.constants)
    labels = np.arange(args.num) % max(parts.num_classes, 1)
    cond = {"label": jnp.asarray(labels, jnp.int32)} if parts.num_classes else None
    rows, plain = [], None
    for interval in args.intervals:
        kw = dict(prediction=parts.prediction, solver=args.solver, steps=args.steps,
                  cond=cond, mesh=parts.mesh, cache_interval=interval or None)
        sample = lambda kw=kw: S.sample(fn, run.params, parts.process, jax.random.key(0),
                                        (args.num, *parts.image_shape), **kw)[0]
        seconds, x = _time(sample, args.repeats)
        plain = x if plain is None else plain
        rows.append({"interval": interval, "seconds": seconds,
                     "rms_vs_uncached": float(jnp.sqrt(jnp.mean((x - plain) ** 2)))})
        if args.fid:
            with tempfile.NamedTemporaryFile(suffix=".npz") as f:
                np.savez(f.name, arr_0=np.asarray(S.to_uint8(x)))
                out = subprocess.run(
                    [sys.executable, "-m", "jaxgen.evaluate", "fashion_mnist:test", f.name,
                     "--num-real", str(args.num_real), "--metrics", "fid"],
                    capture_output=True, text=True, check=True,
                ).stdout
            rows[-1]["fid"] = json.loads(out.strip().splitlines()[-1])["fid"]
        print(json.dumps(rows[-1]), flush=True)
    return rows


def dit_run(args):
    module = models.DiT(patch=2, hidden=384, depth=12, num_heads=6, num_classes=0,
                        learn_sigma=False)
    shape = (args.num, args.resolution, args.resolution, 4)
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape), jnp.ones(shape[0]))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype),
                          nn.unbox(abstract))
    fn = models.as_model_fn(module)
    rows, plain = [], None
    for interval in args.intervals:
        sample = lambda i=interval: S.sample(fn, params["params"], D.Flow(), jax.random.key(0),
                                             shape, prediction="velocity", solver=args.solver,
                                             steps=args.steps, cache_interval=i or None)[0]
        seconds, x = _time(sample, args.repeats)
        plain = x if plain is None else plain
        rms = float(jnp.sqrt(jnp.mean((x - plain) ** 2)))
        rows.append({"interval": interval, "seconds": seconds, "rms_vs_uncached": rms})
        print(json.dumps(rows[-1]), flush=True)
    return rows


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
    args = p.parse_args()
    if args.intervals[0] != 0:
        args.intervals = [0, *args.intervals]  # the uncached reference comes first
    rows = dit_run(args) if args.dit else unet_run(args)
    base = rows[0]["seconds"]
    for r in rows:
        print(f"interval {r['interval'] or 'off':>4}: {r['seconds']:.2f} s "
              f"(x{base / r['seconds']:.2f})  "
              + f"RMS vs uncached {r['rms_vs_uncached']:.4f}"
              + (f"  FID {r['fid']:.2f}" if "fid" in r else ""))


if __name__ == "__main__":
    main()
