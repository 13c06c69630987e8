"""Time and peak memory of each feature-set metric (IS, KID, PR, DC, FID/IS-infinity).

    python benchmarks/bench_metrics.py                    # 10k x 10k (median of 3) and 50k x 50k
    python benchmarks/bench_metrics.py --sizes 10000 --repeats 5 --block-size 2048
    python benchmarks/bench_metrics.py --sizes 50000 --metrics is kid prdc fid_inf is_inf

Features are random, Inception-like (non-negative, dimension 2048; 1008-way
logits for IS): the metrics' cost does not depend on the values. Each
metric runs in a fresh subprocess on the default JAX devices (one CPU device
here), so its time includes compilation and its peak memory is that process's
maximum resident set (``ru_maxrss``; JAX's CPU buffers live in it). ``data``
is the resident set after generating the inputs; ``peak - data`` is what the
metric itself added. ``all`` is what one evaluation asking for every metric
costs: IS + KID + PRDC in one sweep + FID-inf + IS-inf.

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

METRICS = ("is", "kid", "pr", "dc", "prdc", "fid_inf", "is_inf")
IN_ALL = ("is", "kid", "prdc", "fid_inf", "is_inf")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_one(metric: str, n: int, block_size: int) -> dict:
    """Generate inputs for ``metric`` at size ``n``, run it once; time and memory."""
    import jaxgen.metrics as m

    rng = np.random.default_rng(0)
    feats = lambda: np.abs(rng.standard_normal((n, 2048), dtype=np.float32)) * 0.5
    logits = lambda: rng.standard_normal((n, 1008), dtype=np.float32) * 3
    if metric in ("is", "is_inf"):
        args = (logits(),)
    else:
        args = (feats(), feats())
    data = _rss_mib()
    calls = {
        "is": lambda x: m.inception_score(x),
        "kid": lambda r, f: m.kid(r, f),
        "pr": lambda r, f: m.precision_recall(r, f, block_size=block_size),
        "dc": lambda r, f: m.density_coverage(r, f, block_size=block_size),
        "prdc": lambda r, f: m.prdc(r, f, block_size=block_size),
        "fid_inf": lambda r, f: m.fid_infinity(r, f).value,
        "is_inf": lambda x: m.is_infinity(x).value,
    }
    t = time.perf_counter()
    value = calls[metric](*args)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "data_mib": data, "peak_mib": _rss_mib(), "value": str(value)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000])
    p.add_argument("--repeats", type=int, default=3, help="runs per metric below 50k (median)")
    p.add_argument("--block-size", type=int, default=2048)
    p.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    p.add_argument("--blas-threads", type=int, help="OPENBLAS_NUM_THREADS for the runs")
    p.add_argument("--one", nargs=2, metavar=("METRIC", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.block_size)))
        return

    env = dict(os.environ)
    if args.blas_threads:
        env["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)
    print("| N | metric | time s (median) | runs | data MiB | peak MiB | value |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        total = 0.0
        for metric in args.metrics:
            runs = []
            for _ in range(args.repeats if n < 50000 else 1):
                cmd = [sys.executable, __file__, "--one", metric, str(n)]
                cmd += ["--block-size", str(args.block_size)]
                out = subprocess.run(
                    cmd, check=True, capture_output=True, text=True, env=env
                ).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            sec = statistics.median(r["seconds"] for r in runs)
            total += sec if metric in IN_ALL else 0.0
            r = runs[0]
            times = ", ".join(f"{x['seconds']:.1f}" for x in runs)
            print(
                f"| {n} | {metric} | {sec:.1f} | {times} "
                f"| {r['data_mib']:.0f} | {max(x['peak_mib'] for x in runs):.0f} | {r['value']} |",
                flush=True,
            )
        if set(IN_ALL) <= set(args.metrics):
            print(f"| {n} | all ({' + '.join(IN_ALL)}) | {total:.1f} | | | | |", flush=True)


if __name__ == "__main__":
    main()
