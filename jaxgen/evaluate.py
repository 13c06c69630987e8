"""Score generated images: FID, sFID, IS, KID, precision/recall, density/coverage, FID/IS-inf.

    python -m jaxgen.evaluate REAL FAKE --metrics fid,kid,pr --json out.json

REAL and FAKE are each an image folder (png/jpg/webp, recursive), an
``.npz``/``.npy`` of uint8 NHWC images (ADM's ``arr_0`` layout), a statistics
npz (pytorch-fid's ``mu``/``sigma`` or ADM's with ``mu_s``/``sigma_s``), an
IDX file, ``tfds:NAME[:SPLIT]``, or ``fashion_mnist[:SPLIT]`` (Debian's copy
when installed). One flat JSON object is printed (and written to ``--json``);
a progress bar goes to stderr. Bad input exits with code 2 and a one-line
message. ``fd_dinov2``, ``cmmd`` and ``clean_fid`` run DINOv2 ViT-L/14, CLIP
ViT-L/14-336 and clean-fid's resize + Inception (``jaxgen.metrics.encoder_eval``);
``--features dinov2`` computes fid/kid/pr/dc/fid_inf on DINOv2 features.
Asked together, Inception and encoder metrics share one read of each side's
images, each batch going through every network. A statistics file whose
``network`` (protocol) differs from the features compared is refused by name.
``--json`` may be in a bucket (``gs://...``); it must not be an input,
and a place it cannot be written is refused before the work. Should the write
still fail, the results are on stdout already.
"""

from __future__ import annotations

import argparse
import json

from jaxgen import cli
from jaxgen.errors import InputError
from jaxgen.files import as_path, check_outputs, check_writable, describe_os_error, open_atomic
from jaxgen.metrics import defaults
from jaxgen.metrics.encoder_eval import DINOV2_FEATURE_METRICS, ENCODER_METRICS, evaluate_encoders
from jaxgen.metrics.evaluate import METRICS, evaluate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(
        prog="python -m jaxgen.evaluate", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("real", help="reference images or statistics")
    p.add_argument("fake", help="generated images or statistics")
    p.add_argument("--metrics", default="fid",
                   help=f"comma-separated, of {','.join(METRICS + ENCODER_METRICS)}")
    p.add_argument("--json", help="also write the results to this file (local or gs://...)")
    p.add_argument("--batch-size", type=int,
                   help="images per step, all devices (default: 10 per device on CPU, else 100)")
    p.add_argument("--weights", help="Inception weight file (default: cache / download)")
    p.add_argument("--features", default="inception", choices=("inception", "dinov2"),
                   help="network of fid,kid,pr,dc,fid_inf (dinov2: ViT-L/14 CLS, dgm-eval input)")
    p.add_argument("--dinov2-weights", help="DINOv2 ViT-L/14 file (default: $JAXGEN_CACHE)")
    p.add_argument("--clip-weights", help="CLIP ViT-L/14-336 file (default: $JAXGEN_CACHE)")
    # Defaults: jaxgen.metrics.defaults, which the Python API reads too.
    p.add_argument("--kid-subsets", type=int, default=defaults.KID_SUBSETS,
                   help="KID: random subsets (default: %(default)s)")
    p.add_argument("--kid-subset-size", type=int, default=defaults.KID_SUBSET_SIZE,
                   help="KID: images per subset (default: %(default)s)")
    p.add_argument("--pr-k", type=int, default=defaults.PR_K,
                   help="precision/recall: k nearest neighbours (default: %(default)s)")
    p.add_argument("--dc-k", type=int, default=defaults.DC_K,
                   help="density/coverage: k nearest neighbours (default: %(default)s)")
    p.add_argument("--is-splits", type=int, default=defaults.IS_SPLITS,
                   help="IS: splits (default: %(default)s)")
    p.add_argument("--is-seed", type=int, default=defaults.IS_SEED,
                   help="IS: seed of a row shuffle before splitting (default: rows in order, as "
                        "the original IS code and ADM; 2020 reproduces torch-fidelity)")
    p.add_argument("--inf-points", type=int, default=defaults.INF_POINTS,
                   help="FID-inf/IS-inf: fitted points (default: %(default)s)")
    p.add_argument("--inf-min-n", type=int, default=defaults.INF_MIN_N,
                   help="FID-inf/IS-inf: smallest N (default: %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.SEED,
                   help="seed of KID's and FID-inf/IS-inf's draws (default: %(default)s)")
    p.add_argument("--num-real", type=int, help="use only the first N real images")
    p.add_argument("--num-fake", type=int, help="use only the first N fake images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    cli.check_positive(args, "batch_size", "kid_subsets", "kid_subset_size", "pr_k", "dc_k",
                       "is_splits", "num_real", "num_fake")
    for flag, value in (("--inf-points", args.inf_points), ("--inf-min-n", args.inf_min_n)):
        if value < 2:  # a line through at least 2 points, each a score of at least 2 samples
            raise InputError(f"{flag} {value}: must be at least 2.")
    for side in (args.real, args.fake):
        as_path(side)  # a bucket without its backend: one line now, not after the work
    if args.json is not None:
        inputs = {"REAL": args.real, "FAKE": args.fake, "--weights": args.weights}
        check_outputs({"--json": args.json}, {k: v for k, v in inputs.items() if v})
        check_writable(args.json, "--json")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)
    from jaxgen.metrics.weights import load_inception

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    on_encoders = [m for m in metrics if m in ENCODER_METRICS
                   or (args.features == "dinov2" and m in DINOV2_FEATURE_METRICS)]
    scores = dict(kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                  pr_k=args.pr_k, dc_k=args.dc_k, is_splits=args.is_splits,
                  is_seed=args.is_seed, inf_points=args.inf_points, inf_min_n=args.inf_min_n,
                  seed=args.seed)
    common = dict(batch_size=args.batch_size, num_real=args.num_real, num_fake=args.num_fake,
                  progress=not args.no_progress)
    if on_encoders:  # one read of each side feeds every network (Inception's metrics too)
        from jaxgen.encoders import load_clip, load_dinov2

        result = evaluate_encoders(
            args.real, args.fake, metrics, features=args.features,
            inception=(load_inception(args.weights)
                       if "clean_fid" in on_encoders or len(on_encoders) < len(metrics)
                       else None),
            dinov2=load_dinov2(args.dinov2_weights) if args.dinov2_weights else None,
            clip=load_clip(args.clip_weights) if args.clip_weights else None,
            **scores, **common,
        )
    else:
        result = evaluate(args.real, args.fake, metrics, inception=load_inception(args.weights),
                          **scores, **common)
    text = json.dumps(result, indent=2)
    print(text, flush=True)  # first: a failed write below must not lose the results
    if args.json is not None:
        try:
            with open_atomic(args.json) as f:
                f.write((text + "\n").encode())
        except OSError as e:
            raise InputError(f"{describe_os_error(e)}; the results are printed above.") from None
    return 0


if __name__ == "__main__":
    cli.run(main, split_cpu=True)
