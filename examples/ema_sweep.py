"""FID against EMA length for one EDM2 run, from its power-EMA snapshots (post-hoc EMA).

    python examples/ema_sweep.py --workdir runs/fm_edm2 --sigma-rel 0.02,0.05,0.1,0.15,0.2 \
        --num 1000 --reference fashion_mnist:test --out runs/fm_edm2/ema_sweep.png

Karras et al. (CVPR 2024, Sec. 3 and Fig. 5) choose the EMA length after
training: the run keeps two power-function EMAs and saves their snapshots
(``train.phema_sigma_rels``, ``train.phema_snapshot_every``); any other
``sigma_rel`` is reconstructed from the snapshots by least squares
(:func:`jaxgen.train.phema.reconstruct`, what ``python -m jaxgen.phema`` does).
This script reconstructs each requested ``sigma_rel`` at the latest snapshot,
draws ``--num`` samples with the run's evaluation sampler (``eval.solver``,
``eval.steps``; the same seed for every length, so the noise is shared),
computes their FID against ``--num-real`` reference images, prints one line
per length and plots FID against ``sigma_rel``. Nothing is written but the plot.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from jaxgen import cli
from jaxgen.metrics import load_inception
from jaxgen.metrics.features import FeatureExtractor
from jaxgen.train import fid_of_samples, load_run, reference_stats, sample_images
from jaxgen.train.phema import (
    list_snapshots,
    load_snapshot,
    reconstruct,
    save_snapshot,
    snapshot_folder,
)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="an EDM2 run with power-EMA snapshots")
    p.add_argument("--sigma-rel", default="0.02,0.05,0.1,0.15,0.2",
                   help="comma-separated EMA lengths to reconstruct")
    p.add_argument("--num", type=int, default=1000, help="samples per EMA length")
    p.add_argument("--reference", default="fashion_mnist:test", help="real images (source spec)")
    p.add_argument("--num-real", type=int, default=1000, help="reference images used")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", default=None, help="PNG of FID against sigma_rel (optional)")
    args = p.parse_args(argv)
    sigma_rels = sorted({float(s) for s in args.sigma_rel.split(",")})
    snapshots = list_snapshots(snapshot_folder(args.workdir))
    t = max(s.t for s in snapshots)
    run = load_run(args.workdir)  # the model, its buffers and process; weights replaced below
    cfg = run.parts.config
    extractor = FeatureExtractor(*load_inception(), mesh=run.parts.mesh)
    with tempfile.TemporaryDirectory() as tmp:  # the reference statistics' cache
        reference = reference_stats(args.reference, tmp, extractor, num=args.num_real,
                                    resolution=cfg.data.resolution, pad_to=cfg.data.pad_to)
    key = jax.random.key_data(jax.random.key(cfg.seed))
    print(f"{args.workdir}: {len(snapshots)} snapshots, reconstructing at t = {t} updates; "
          f"{args.num} samples ({cfg.eval.solver}, {cfg.eval.steps} steps) vs {args.num_real} "
          f"images of {args.reference}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sigma_rel, flat in reconstruct(snapshots, sigma_rels, t):
            params = load_snapshot(save_snapshot(tmp, flat, t, sigma_rel))
            start = time.perf_counter()
            images = np.concatenate(list(sample_images(
                run.parts, params, key, num=args.num, batch_size=args.batch_size,
                solver=cfg.eval.solver, steps=cfg.eval.steps)))
            fid = fid_of_samples(images, reference, extractor)
            rows.append((sigma_rel, fid))
            seconds = time.perf_counter() - start
            print(f"sigma_rel {sigma_rel:.3f}  FID {fid:7.2f}  ({seconds:.0f} s)", flush=True)
    best = min(rows, key=lambda r: r[1])
    print(f"best: sigma_rel {best[0]:.3f}, FID {best[1]:.2f}")
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        plt.figure(figsize=(5, 3.5))
        plt.plot(*zip(*rows, strict=True), "o-")
        plt.xlabel("EMA length sigma_rel")
        plt.ylabel(f"FID ({args.num} samples)")
        plt.title(f"post-hoc EMA at t = {t} updates")
        plt.savefig(args.out, dpi=100, bbox_inches="tight")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
