"""Write FID reference statistics of a dataset.

    python -m jaxgen.fid_stats SOURCE OUT.npz

SOURCE is anything ``python -m jaxgen.evaluate`` accepts as images. OUT.npz
holds ``mu``/``sigma`` (pool3, pytorch-fid's layout), ``mu_s``/``sigma_s``
(sFID, the ADM evaluator's keys), ``n``, and ``network``/``network_s`` naming
the features' network and protocol (``inception-2015-12-05/pool3``,
``inception-2015-12-05/mixed_6_conv[:7]``); both tools read it, and
``python -m jaxgen.evaluate`` refuses to compare it with statistics of another
protocol. OUT.npz may be
in a bucket (``gs://...``); it must not be SOURCE, and a place it cannot be
written is refused before the work.
"""

from __future__ import annotations

import argparse

from jaxgen import cli
from jaxgen.data import open_source
from jaxgen.files import as_path, check_outputs, check_writable
from jaxgen.metrics.evaluate import EvalInput, FeatureRequest, featurize
from jaxgen.metrics.features import FeatureExtractor, default_batch_size
from jaxgen.metrics.stats import save_stats


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    p = argparse.ArgumentParser(
        prog="python -m jaxgen.fid_stats", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="images: folder, npz/npy, IDX, tfds:NAME[:SPLIT], fashion_mnist")
    p.add_argument("out", help="statistics file to write (.npz)")
    p.add_argument("--batch-size", type=int,
                   help="images per step, all devices (default: 10 per device on CPU, else 100)")
    p.add_argument("--weights", help="Inception weight file (default: cache / download)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cli.check_positive(args, "batch_size")
    as_path(args.source)  # a bucket without its backend: one line now, not after the work
    inputs = {"SOURCE": args.source, "--weights": args.weights}
    check_outputs({"OUT": args.out}, {k: v for k, v in inputs.items() if v})
    check_writable(args.out, "OUT")
    from jaxgen.metrics.weights import load_inception

    side = EvalInput(args.source, source=open_source(args.source))
    batch_size = min(args.batch_size or default_batch_size(), len(side.source))  # no padding
    extractor = FeatureExtractor(*load_inception(args.weights), batch_size=batch_size)
    f = featurize(side, FeatureRequest(), extractor, progress=not args.no_progress)
    save_stats(args.out, f["pool3_stats"], f["spatial_stats"])
    print(f"wrote {args.out}: {f['pool3_stats'].n} images of {side.source.name}")
    return 0


if __name__ == "__main__":
    cli.run(main, split_cpu=True)
