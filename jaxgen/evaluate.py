"""Score generated images: FID, sFID, IS, KID, precision/recall, density/coverage, FID/IS-inf.

    python -m jaxgen.evaluate REAL FAKE --metrics fid,kid,pr --json out.json

REAL and FAKE are each an image folder (png/jpg/webp, recursive), an
``.npz``/``.npy`` of uint8 NHWC images (ADM's ``arr_0`` layout), a statistics
npz (pytorch-fid's ``mu``/``sigma`` or ADM's with ``mu_s``/``sigma_s``), an
IDX file, ``tfds:NAME[:SPLIT]``, or ``fashion_mnist[:SPLIT]`` (Debian's copy
when installed). One flat JSON object is printed (and written to ``--json``);
a progress bar goes to stderr. Bad input exits with code 2 and a one-line
message.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxgen import cli
from jaxgen.files import open_atomic
from jaxgen.metrics.evaluate import METRICS, evaluate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(
        prog="python -m jaxgen.evaluate", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("real", help="reference images or statistics")
    p.add_argument("fake", help="generated images or statistics")
    p.add_argument("--metrics", default="fid", help=f"comma-separated, of {','.join(METRICS)}")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    p.add_argument("--batch-size", type=int,
                   help="images per step, all devices (default: 10 per device on CPU, else 100)")
    p.add_argument("--weights", help="Inception weight file (default: cache / download)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--inf-points", type=int, default=15, help="FID-inf/IS-inf: fitted points")
    p.add_argument("--inf-min-n", type=int, default=5000, help="FID-inf/IS-inf: smallest N")
    p.add_argument("--seed", type=int, default=0, help="seed of KID's and FID-inf's draws")
    p.add_argument("--num-real", type=int, help="use only the first N real images")
    p.add_argument("--num-fake", type=int, help="use only the first N fake images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)
    from jaxgen.metrics.weights import load_inception

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    result = evaluate(
        args.real, args.fake, metrics,
        batch_size=args.batch_size,
        inception=load_inception(args.weights),
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        inf_points=args.inf_points,
        inf_min_n=args.inf_min_n,
        seed=args.seed,
        num_real=args.num_real,
        num_fake=args.num_fake,
        progress=not args.no_progress,
    )
    text = json.dumps(result, indent=2)
    if args.json is not None:
        with open_atomic(args.json) as f:
            f.write((text + "\n").encode())
    print(text)
    return 0



if __name__ == "__main__":
    cli.run(main, split_cpu=True)
