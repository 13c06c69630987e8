"""Draw samples from a trained run: ADM-layout npz plus a PNG grid.

    python -m jaxgen.sample --workdir runs/fm --num 10000 --solver euler --steps 20 \
        --out samples.npz

The run's ``config.json`` and latest checkpoint give the model; samples come
from its first EMA (``--ema`` picks another decay, or ``params``). ``arr_0``
holds uint8 NHWC images and, for a class-conditional model, ``arr_1`` the
labels (``i % num_classes``, so classes are balanced); ``OUT.png`` shows the
first 64. Score them with ``python -m jaxgen.evaluate REAL samples.npz``.
``--workdir`` and ``--out`` may be in a bucket (``gs://BUCKET/...``). On a
pod, start it on every host as training is started (``JAXGEN_DISTRIBUTED=1``
or the ``JAXGEN_COORDINATOR``/``_NUM_PROCESSES``/``_PROCESS_ID`` variables):
the hosts share the work and process 0 writes the files.
"""

from __future__ import annotations

import argparse

import numpy as np
from etils import epath

from jaxgen import cli
from jaxgen.errors import InputError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(
        prog="python -m jaxgen.sample", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workdir", required=True, type=epath.Path,
                   help="a jaxgen.train run folder (local or gs://...)")
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--solver", default="euler", help="a jaxgen.sampling.SOLVERS name")
    p.add_argument("--steps", type=int, default=20, help="solver steps")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance")
    p.add_argument("--batch-size", type=int, default=256, help="samples per device call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", default=None, help="EMA decay to use (default: the first) or 'params'")
    p.add_argument("--out", type=epath.Path, default=epath.Path("samples.npz"),
                   help="the .npz to write (local or gs://...); the grid goes beside it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)
    if args.num < 1 or args.batch_size < 1:
        raise InputError(f"--num {args.num} and --batch-size {args.batch_size} must be >= 1.")
    import jax

    from jaxgen.files import open_atomic
    from jaxgen.parallel import initialize_distributed
    from jaxgen.train import generate, image_grid, load_run, make_sampler, save_png

    initialize_distributed()  # multi-host when launched as training is (JAXGEN_* or cluster env)
    setup, params, step, which = load_run(args.workdir, args.ema)
    batch = min(args.batch_size, args.num)
    sampler = make_sampler(setup, batch, solver=args.solver, steps=args.steps,
                           cfg_scale=args.cfg_scale)
    key = jax.random.key_data(jax.random.key(args.seed))
    parts = list(generate(sampler, params, key, args.num, batch, setup.num_classes))
    images = np.concatenate([p[0] for p in parts])
    arrays = {"arr_0": images}
    if setup.num_classes:
        arrays["arr_1"] = np.concatenate([p[1] for p in parts]).astype(np.int64)
    if jax.process_index() == 0:
        with open_atomic(args.out) as f:
            np.savez(f, **arrays)
        save_png(image_grid(images[:64]), args.out.with_suffix(".png"))
        print(f"wrote {args.out} ({len(images)} samples, step {step}, {which}) and "
              f"{args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    cli.run(main)
