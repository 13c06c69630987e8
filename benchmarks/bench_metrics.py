"""Time and peak memory of each metric computed from features (FID, IS, KID, PR, DC, FID/IS-inf).

    python benchmarks/bench_metrics.py                    # 10k x 10k (median of 3) and 50k x 50k
    python benchmarks/bench_metrics.py --sizes 10000 --repeats 5 --block-size 2048
    python benchmarks/bench_metrics.py --sizes 50000 --metrics all

Features are random, Inception-like (non-negative, dimension 2048; 1008-way
logits for IS; 2023 = 7 x 17 x 17 spatial dimensions for sFID): the metrics'
cost does not depend on the values. Each row runs in a fresh subprocess on
the default JAX devices (one CPU device here), so its time includes
compilation and its peak memory is that process's maximum resident set
(``ru_maxrss``; JAX's CPU buffers live in it). ``data`` is the resident set
after generating the inputs; ``peak - data`` is what the metric itself added.

``fid`` includes both sides' statistics from the features. ``all`` is one
``jaxgen.metrics.score_features`` call asking for every metric (fid, sfid,
is, kid, pr, dc, fid_inf, is_inf) with the statistics given, as
``evaluate`` makes it after the feature pass (which accumulates the
statistics batch by batch); ``stats`` is the time of those four statistics
(pool3 and spatial, both sides) computed from the features instead.

``--reference N`` times jaxgen's precision/recall/density/coverage (k = 5)
against the reference implementation of Naeem et al. (PyPI ``prdc``, which
needs scikit-learn; install both by hand, they are not jaxgen dependencies)
on N x N features, alternating the two in one process, and prints both
values, the median times and their ratio. The reference holds three N x N
distance matrices, so N stays around 10k here.

``--blas-threads`` sets OPENBLAS_NUM_THREADS for the subprocesses. On a CPU
shared with other jobs, OpenBLAS's spinning threads can slow ``eigh`` (the
FID in FID-inf) several-fold; one thread is then faster and steadier.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

METRICS = ("fid", "is", "kid", "pr", "dc", "prdc", "fid_inf", "is_inf", "stats", "all")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_one(metric: str, n: int, block_size: int) -> dict:
    """Generate inputs for ``metric`` at size ``n``, run it once; time and memory."""
    import jaxgen.metrics as m

    rng = np.random.default_rng(0)
    feats = lambda d=2048: np.abs(rng.standard_normal((n, d), dtype=np.float32)) * 0.5
    logits = lambda: rng.standard_normal((n, 1008), dtype=np.float32) * 3
    stats = m.GaussianStats.from_features
    if metric in ("is", "is_inf"):
        args = (logits(),)
    elif metric in ("stats", "all"):
        args = (feats(), feats(), feats(2023), feats(2023), logits())
    else:
        args = (feats(), feats())
    if metric == "all":  # statistics as the feature pass hands them over
        r, f, rs, fs, lg = args
        args = (
            {"pool3": r, "pool3_stats": stats(r), "spatial_stats": stats(rs)},
            {"pool3": f, "pool3_stats": stats(f), "spatial_stats": stats(fs), "logits": lg},
        )
    data = _rss_mib()
    calls = {
        "fid": lambda r, f: m.frechet_distance(stats(r), stats(f)),
        "is": lambda x: m.inception_score(x),
        "kid": lambda r, f: m.kid(r, f),
        "pr": lambda r, f: m.precision_recall(r, f, block_size=block_size),
        "dc": lambda r, f: m.density_coverage(r, f, block_size=block_size),
        "prdc": lambda r, f: m.prdc(r, f, block_size=block_size),
        "fid_inf": lambda r, f: m.fid_infinity(r, f).value,
        "is_inf": lambda x: m.is_infinity(x).value,
        "stats": lambda *xs: [stats(x).n for x in xs[:4]],
        "all": lambda r, f: {
            k: v
            for k, v in m.score_features(r, f, m.METRICS).items()
            if not k.endswith("_points")
        },
    }
    t = time.perf_counter()
    value = calls[metric](*args)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "data_mib": data, "peak_mib": _rss_mib(), "value": str(value)}


def compare_prdc(n: int, repeats: int, block_size: int) -> None:
    """jaxgen's PRDC vs the reference ``prdc.compute_prdc`` (k = 5), alternating in one process."""
    import contextlib
    import io

    import prdc as reference

    import jaxgen.metrics as m

    rng = np.random.default_rng(0)
    real, fake = (np.abs(rng.standard_normal((n, 2048), dtype=np.float32)) * 0.5 for _ in "rf")
    ours = lambda: m.prdc(real, fake, k_pr=5, k_dc=5, block_size=block_size)

    def ref():
        with contextlib.redirect_stdout(io.StringIO()):  # it prints the set sizes
            return {k: float(v) for k, v in reference.compute_prdc(real, fake, 5).items()}

    times: dict[str, list[float]] = {"jaxgen": [], "reference": []}
    values = {}
    for _ in range(repeats):
        for name, fn in (("jaxgen", ours), ("reference", ref)):
            t = time.perf_counter()
            values[name] = fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in times:
        runs = ", ".join(f"{x:.1f}" for x in times[name])
        print(f"| {n} | PRDC k=5, {name} | {med[name]:.1f} | {runs} | {values[name]} |")
    print(f"| {n} | reference / jaxgen | {med['reference'] / med['jaxgen']:.2f} | | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000])
    p.add_argument("--repeats", type=int, default=3, help="runs per metric (median)")
    p.add_argument("--block-size", type=int, default=2048)
    p.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    p.add_argument("--blas-threads", type=int, help="OPENBLAS_NUM_THREADS for the runs")
    p.add_argument("--reference", type=int, metavar="N", help="compare PRDC with `prdc` at N")
    p.add_argument("--one", nargs=2, metavar=("METRIC", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.block_size)))
        return

    if args.reference:
        print("| N | run | time s (median) | runs | values |")
        print("|---|---|---|---|---|")
        compare_prdc(args.reference, args.repeats, args.block_size)
        return
    env = dict(os.environ)
    if args.blas_threads:
        env["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)
    print("| N | metric | time s (median) | runs | data MiB | peak MiB | value |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for metric in args.metrics:
            runs = []
            for _ in range(args.repeats):
                cmd = [sys.executable, __file__, "--one", metric, str(n)]
                cmd += ["--block-size", str(args.block_size)]
                out = subprocess.run(
                    cmd, check=True, capture_output=True, text=True, env=env
                ).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            sec = statistics.median(r["seconds"] for r in runs)
            r = runs[0]
            times = ", ".join(f"{x['seconds']:.1f}" for x in runs)
            print(
                f"| {n} | {metric} | {sec:.1f} | {times} "
                f"| {r['data_mib']:.0f} | {max(x['peak_mib'] for x in runs):.0f} | {r['value']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
