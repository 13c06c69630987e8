"""Draw samples from a trained run: ADM-layout npz plus a PNG grid.

    python -m jaxgen.sample --workdir runs/fm --num 10000 --solver euler --steps 20 \
        --out samples.npz

The run's ``config.json`` and latest checkpoint give the model; samples come
from its first EMA (``--ema`` picks another decay, or ``params``). ``arr_0``
holds uint8 NHWC images and, for a class-conditional model, ``arr_1`` the
labels (``i % num_classes``, so classes are balanced); ``OUT.png`` shows the
first 64. Score them with ``python -m jaxgen.evaluate REAL samples.npz``.
``--workdir`` and ``--out`` may be in a bucket (``gs://BUCKET/...``).

Released weights sample without a training run: ``--weights`` names a DiT or
SiT checkpoint (``DiT-XL-2-256x256.pt``, ``SiT-XL-2-256x256.pt``) for
``--model``, ``--recipe`` gives the process, prediction and latent settings
(``imagenet256_dit_xl2`` by default; ``imagenet256_sit_xl2`` for SiT), and
``--vae`` the autoencoder that decodes the latents::

    python -m jaxgen.sample --weights DiT-XL-2-256x256.pt --model DiT-XL/2 \
        --vae sd-vae-ft-ema/ --num 50000 --solver ddpm --steps 250 --cfg-scale 1.5 \
        --out samples.npz

On a
pod, start it on every host as training is started (``JAXGEN_DISTRIBUTED=1``
or the ``JAXGEN_COORDINATOR``/``_NUM_PROCESSES``/``_PROCESS_ID`` variables):
the hosts share the work and process 0 writes the files.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from etils import epath

from jaxgen import cli
from jaxgen.errors import InputError
from jaxgen.files import as_path, check_outputs, check_writable


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(
        prog="python -m jaxgen.sample", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run = p.add_mutually_exclusive_group(required=True)
    run.add_argument("--workdir", type=epath.Path,
                     help="a jaxgen.train run folder (local or gs://...)")
    run.add_argument("--weights", type=epath.Path,
                     help="released DiT/SiT weights to sample instead of a run (with --vae)")
    p.add_argument("--model", default="DiT-XL/2", help="with --weights: the model they are for")
    p.add_argument("--recipe", default="imagenet256_dit_xl2",
                   help="with --weights: the jaxgen.configs recipe of process and latents")
    p.add_argument("--vae", type=epath.Path, help="with --weights: the VAE weights")
    p.add_argument("--vae-model", default="vae-sd", help="with --weights: the VAE's model name")
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--solver", default="euler", help="a jaxgen.sampling.SOLVERS name")
    p.add_argument("--steps", type=int, default=20,
                   help="solver steps; for a consistency model (a CT/CD run), its network "
                        "evaluations (1, 2, 4, ...), and --solver is not used")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance")
    p.add_argument("--batch-size", type=int, default=256, help="samples per device call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", default=None,
                   help="weights: an EMA decay (default: the run's first), 'params', "
                        "'phema:SIGMA_REL' (a power EMA the run tracks) or a phema-*.npz "
                        "snapshot or reconstruction (python -m jaxgen.phema)")
    p.add_argument("--out", type=epath.Path, default=epath.Path("samples.npz"),
                   help="the .npz to write (local or gs://...); the grid goes beside it")
    return p.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad numbers and outputs that would overwrite an input or each other, before
    any work: ``--out`` must be a writable ``.npz`` path, its grid ``OUT.png`` beside it
    (so ``--out X.png`` would write the grid over the samples), neither the workdir, its
    ``config.json`` nor anything in its ``checkpoints/``."""
    cli.check_positive(args, "num", "batch_size", "steps")
    if not math.isfinite(args.cfg_scale):
        raise InputError(f"--cfg-scale {args.cfg_scale}: must be a finite number (1: no guidance).")
    if args.out.suffix != ".npz":
        raise InputError(f"--out {args.out}: must end in .npz (the grid goes beside it as .png).")
    if args.weights is not None:
        if args.vae is None:
            raise InputError("--weights samples latents: give --vae FILE to decode them.")
        check_outputs({"--out": args.out, "its grid": args.out.with_suffix(".png")},
                      {"--weights": args.weights, "--vae": args.vae})
        check_writable(args.out, "--out")
        return
    as_path(args.workdir)  # a bucket without its backend: one line now
    check_outputs(
        {"--out": args.out, "its grid": args.out.with_suffix(".png")},
        {"--workdir": args.workdir, "the run's config": args.workdir / "config.json"},
        {"the run's checkpoints": args.workdir / "checkpoints"},
    )
    check_writable(args.out, "--out")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)
    check_arguments(args)
    import jax

    from jaxgen.files import open_atomic
    from jaxgen.parallel import initialize_distributed
    from jaxgen.train import (
        class_labels,
        image_grid,
        load_released,
        load_run,
        recipe_config,
        sample_images,
        save_png,
    )

    initialize_distributed()  # multi-host when launched as training is (JAXGEN_* or cluster env)
    if args.weights is not None:
        config = recipe_config(args.recipe, model=args.model, vae=args.vae,
                               vae_model=args.vae_model)
        setup, params, step, which = load_released(config, args.weights)
    else:
        setup, params, step, which = load_run(args.workdir, args.ema)
    key = jax.random.key_data(jax.random.key(args.seed))
    images = np.concatenate(list(sample_images(
        setup, params, key, num=args.num, batch_size=min(args.batch_size, args.num),
        solver=args.solver, steps=args.steps, cfg_scale=args.cfg_scale,
    )))
    arrays = {"arr_0": images}
    if setup.num_classes:
        arrays["arr_1"] = class_labels(np.arange(args.num), setup.num_classes).astype(np.int64)
    if jax.process_index() == 0:
        with open_atomic(args.out) as f:
            np.savez(f, **arrays)
        save_png(image_grid(images[:64]), args.out.with_suffix(".png"))
        print(f"wrote {args.out} ({len(images)} samples, step {step}, {which}) and "
              f"{args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    cli.run(main, split_cpu=True)
