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
        --vae sd-vae-ft-ema/ --num 50000 --solver ddpm_learned --steps 250 --cfg-scale 1.5 \
        --guide-channels 3 --out samples.npz

Guidance and feature caching (:class:`jaxgen.sampling.Guidance`, ``sample``):
``--cfg-scale W`` is classifier-free guidance; ``--cfg-method cfg++|apg`` picks CFG++
(``W`` is its ``lambda``) or adaptive projected guidance (``--apg-eta``,
``--apg-threshold``, ``--apg-momentum``); ``--guidance-interval LO HI`` guides only
where ``LO < sigma/alpha <= HI``; ``--pag-scale S`` adds perturbed-attention guidance
(DiT and U-Net runs); ``--cache-interval K`` runs the full network every ``K``-th
evaluation and reuses its deep features in between (DeepCache on a U-Net, FORA on
a DiT; ``1`` is uncached sampling, bit for bit)::

    python -m jaxgen.sample --workdir runs/fm --cfg-scale 2 --cfg-method apg \
        --pag-scale 1 --cache-interval 2 --out samples.npz

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
                        "evaluations (1, 2, 4, ...), and --solver is not used; for a DMD2 "
                        "generator, the steps it was trained for (distill.generator_steps)")
    g = p.add_argument_group("guidance and feature caching")
    g.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance weight (default 1: none; CFG++'s lambda)")
    g.add_argument("--cfg-method", default="cfg",
                   help="cfg, cfg++ or apg: how the guided prediction is formed; cfg++ and apg "
                        "need --cfg-scale")
    g.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only where LO < sigma/alpha <= HI (Kynkaanniemi et al. 2024)")
    g.add_argument("--cfg-rescale", type=float, help="CFG rescale phi in [0, 1] (Lin et al.)")
    g.add_argument("--guide-channels", type=int, help="guide only the first N channels")
    g.add_argument("--apg-eta", type=float, help="apg: weight of the parallel part (default 0)")
    g.add_argument("--apg-threshold", type=float, help="apg: norm cap r (default 0: none)")
    g.add_argument("--apg-momentum", type=float, help="apg: momentum beta in (-1, 1)")
    g.add_argument("--pag-scale", type=float, default=0.0,
                   help="perturbed-attention guidance scale (0: none; DiT and U-Net runs)")
    g.add_argument("--cache-interval", type=int,
                   help="feature caching: a full network pass every K evaluations (1: uncached)")
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
    cli.check_positive(args, "num", "batch_size", "steps", "cache_interval")
    if args.cfg_scale is not None and not math.isfinite(args.cfg_scale):
        raise InputError(f"--cfg-scale {args.cfg_scale}: must be a finite number (1: no guidance).")
    check_guidance(args)
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


APG_FLAGS = ("apg_eta", "apg_threshold", "apg_momentum")
SHAPING_FLAGS = ("guidance_interval", "cfg_rescale", "guide_channels")  # act on guidance only


def guidance_options(args: argparse.Namespace) -> dict:
    """The :class:`jaxgen.sampling.Guidance` fields the flags set, besides the scale."""
    interval = None if args.guidance_interval is None else tuple(args.guidance_interval)
    fields = dict(method=args.cfg_method, interval=interval, rescale=args.cfg_rescale,
                  channels=args.guide_channels, pag_scale=args.pag_scale,
                  **{name: getattr(args, name) for name in APG_FLAGS})
    return {k: v for k, v in fields.items() if v is not None}


def check_guidance(args: argparse.Namespace) -> None:
    """Refuse guidance flags that :class:`~jaxgen.sampling.Guidance` refuses, or that do
    nothing: a variant without ``--cfg-scale``, APG options without APG, an interval,
    rescale or channel subset without any guidance."""
    options = guidance_options(args)
    if options != {"method": "cfg", "pag_scale": 0.0}:
        from jaxgen.sampling.guidance import Guidance  # imports JAX: only for guidance flags

        scale = 1.0 if args.cfg_scale is None else args.cfg_scale
        try:  # a stand-in condition: whether the model has classes is known once it is loaded
            Guidance(scale, uncond={}, **options).check(cond={})
        except InputError as e:
            raise InputError(f"guidance flags: {e}") from None
    if args.cfg_method != "cfg" and args.cfg_scale is None:
        raise InputError(f"--cfg-method {args.cfg_method} needs --cfg-scale W (its guidance "
                         "weight; CFG++'s lambda, usually in [0, 1]).")
    apg = [name for name in APG_FLAGS if getattr(args, name) is not None]
    if apg and args.cfg_method != "apg":
        flag = "--" + apg[0].replace("_", "-")
        raise InputError(f"{flag} is an option of --cfg-method apg; add that or drop {flag}.")
    shaping = [name for name in SHAPING_FLAGS if getattr(args, name) is not None]
    if shaping and args.cfg_scale is None and not args.pag_scale:
        flag = "--" + shaping[0].replace("_", "-")
        raise InputError(f"{flag} shapes guidance, and there is none: add --cfg-scale W "
                         "or --pag-scale S, or drop it.")


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
        solver=args.solver, steps=args.steps,
        cfg_scale=1.0 if args.cfg_scale is None else args.cfg_scale,
        guidance_options=guidance_options(args), cache_interval=args.cache_interval,
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
