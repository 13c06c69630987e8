"""Training speed of the README's default job (Fashion-MNIST U-Net, flow matching).

Runs ``python -m jaxgen.train --config jaxgen/configs/fashion_mnist.py`` (``configs/`` in
commits before the recipes moved into the package) for a few minutes of training from
each given checkout (e.g. this one and a ``git worktree`` of an older commit), one after
the other, and prints the median of the logged ``steps_per_s`` (every 50 steps; the
first window, which holds the compilation, is left out):

    git worktree add /tmp/jaxgen-old <commit>
    python benchmarks/bench_default_job.py --repos . /tmp/jaxgen-old --minutes 2 --runs 3

Each checkout runs with its own code (``PYTHONPATH`` and working directory set to it)
and its own defaults for devices (the current trainer splits the batch over one
CPU device per core).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def steps_per_second(repo: Path, minutes: float) -> tuple[float, int]:
    """Median logged steps/s after the first window, and the steps trained."""
    # The recipe's place in that checkout: jaxgen/configs/ now, configs/ in older commits.
    config = next(p for p in ("jaxgen/configs/fashion_mnist.py", "configs/fashion_mnist.py")
                  if (repo / p).exists())
    with tempfile.TemporaryDirectory() as workdir:
        cmd = [sys.executable, "-m", "jaxgen.train", "--config", config,
               "--workdir", workdir, f"--config.train.minutes={minutes}",
               "--config.eval.fid_samples=0", "--config.eval.every_steps=0",
               "--config.eval.at_minutes=()", "--config.checkpoint.every_steps=100000"]
        env = dict(os.environ, PYTHONPATH=str(repo))
        env.pop("XLA_FLAGS", None)
        subprocess.run(cmd, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        records = [json.loads(line) for line in
                   Path(workdir, "metrics.jsonl").read_text().splitlines()]
    rates = [r["steps_per_s"] for r in records if "steps_per_s" in r][1:]
    return float(np.median(rates)), max(r["step"] for r in records)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repos", nargs="+", type=Path, default=[Path(".")])
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--runs", type=int, default=3,
                   help="runs per checkout, the checkouts alternating; medians over the runs")
    args = p.parse_args()
    results: dict[Path, list[tuple[float, int]]] = {repo: [] for repo in args.repos}
    for _ in range(args.runs):
        for repo in args.repos:
            results[repo].append(steps_per_second(repo.resolve(), args.minutes))
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"load average at the end: {load}\n")
    print(f"| checkout | steps/s (median of {args.runs} runs) | runs | steps in {args.minutes:g} "
          "min (median) | ratio to first |")
    print("|---|---|---|---|---|")
    first = float(np.median([rate for rate, _ in results[args.repos[0]]]))
    for repo, runs in results.items():
        rate = float(np.median([r for r, _ in runs]))
        each = ", ".join(f"{r:.2f}" for r, _ in runs)
        steps = int(np.median([n for _, n in runs]))
        print(f"| {repo} | {rate:.2f} | {each} | {steps} | {rate / first:.2f} |")


if __name__ == "__main__":
    main()
