"""Images per second delivered by jaxgen's input pipelines on this machine.

    python benchmarks/bench_data.py [--runs 5] [--num-png 10000]

Measures, as the median over ``--runs`` runs:

- Fashion-MNIST (Debian copy) through the training iterator: global batch
  256, random flips, 28 -> 32 padding, background prefetch;
- a folder of ``--num-png`` 64x64 RGB PNGs, written by this script into a
  temporary folder: the time to open it (header scan), the evaluation
  iterator (batch 250, every image once) and the training iterator (batch
  256, flips).

Batches are only pulled, never used, so the figure is the ceiling the host
can feed a training or evaluation step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from jaxgen import data
from jaxgen.metrics.eval_parts import iterate_eval


def _write_pngs(root: Path, n: int, size: int = 64) -> None:
    """Smooth random images (low-frequency noise, upsampled), so PNG sizes look like photos."""
    rng = np.random.default_rng(0)
    for i in range(n):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC)
        noisy = np.asarray(image).astype(np.int16) + rng.integers(-8, 9, (size, size, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(root / f"{i:06d}.png")


def _median_rate(run: Callable[[], int], runs: int) -> tuple[float, list[float]]:
    """Median of ``images / seconds`` over ``runs`` calls of ``run`` (which returns images)."""
    rates = []
    for _ in range(runs):
        t = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates), rates


def _train_images(source: data.ImageSource, batches: int, **kw) -> Callable[[], int]:
    def run() -> int:
        it = data.TrainIterator(source, 256, seed=0, flip=True, **kw)
        next(it)  # start-up (thread, first epoch's permutation) is not steady state
        n = sum(len(next(it)["image"]) for _ in range(batches))
        it.close()
        return n

    return run


def main() -> None:
    """Print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--num-png", type=int, default=10_000)
    args = parser.parse_args()

    fmnist = data.open_source("fashion_mnist:train")
    rate, rates = _median_rate(_train_images(fmnist, 200, pad_to=32), args.runs)
    print(
        f"fashion_mnist train iterator (B=256, flip, pad 32): {rate:,.0f} img/s  "
        f"runs: {', '.join(f'{r:,.0f}' for r in rates)}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        _write_pngs(root, args.num_png)
        size = sum(p.stat().st_size for p in root.iterdir()) / args.num_png
        print(
            f"wrote {args.num_png} 64x64 PNGs ({size / 1024:.1f} KiB each) in "
            f"{time.perf_counter() - t:.1f} s"
        )
        opens = []
        for _ in range(args.runs):
            t = time.perf_counter()
            folder = data.open_source(str(root))
            opens.append(time.perf_counter() - t)
        print(
            f"open folder (header scan of {len(folder)} files): "
            f"{statistics.median(opens):.2f} s median"
        )

        def evaluate() -> int:
            return sum(len(b) for b in iterate_eval(folder, 250))

        rate, rates = _median_rate(evaluate, args.runs)
        print(
            f"png folder eval iterator (B=250): {rate:,.0f} img/s  "
            f"runs: {', '.join(f'{r:,.0f}' for r in rates)}"
        )
        batches = max(1, min(40, args.num_png // 256))
        rate, rates = _median_rate(_train_images(folder, batches), args.runs)
        print(
            f"png folder train iterator (B=256, flip): {rate:,.0f} img/s  "
            f"runs: {', '.join(f'{r:,.0f}' for r in rates)}"
        )


if __name__ == "__main__":
    main()
