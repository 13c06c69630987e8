"""Train a small KL autoencoder (the first stage of latent diffusion) and measure it.

    python -m jaxgen.train_autoencoder fashion_mnist:train runs/vae.safetensors \\
        --vae-model vae-small --steps 3000

The objective is LDM's without its perceptual and adversarial terms
(Rombach et al. 2022, App. G): the L1 reconstruction error of a posterior
sample ``z ~ q(z|x)``, summed over pixels, plus ``kl_weight`` times
``KL(q(z|x) || N(0, I))`` summed over latent elements, both averaged over the
batch; Adam. Batches come from :class:`jaxgen.data.TrainIterator` (seeded).

The weights are written in diffusers' format (:func:`jaxgen.models.export_weights`,
so ``--vae`` of ``jaxgen.encode`` and ``config.latent.vae`` read them), atomically,
never over an existing file. Printed as JSON: the last losses, the standard
deviation of posterior samples of the first ``--measure`` images and the
latent scale ``1 / std`` to give ``jaxgen.encode --scale`` and
``config.latent.scale`` (LDM's rule for its 0.18215), and the reconstruction
PSNR (uint8, through the posterior mean) of the first ``--measure`` images of
``--eval-source``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from jaxgen import cli
from jaxgen.errors import InputError
from jaxgen.files import check_outputs, check_writable, open_atomic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(prog="python -m jaxgen.train_autoencoder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="training images: any jaxgen.data.open_source spec")
    p.add_argument("out", type=Path, help="the .safetensors file to write")
    p.add_argument("--vae-model", default="vae-small", help="a jaxgen.models vae-* name")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--minutes", type=float, default=0.0, help="stop earlier after this (0: no)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6, help="LDM's f4/f8 value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-source", default=None, help="images for the PSNR (default: source)")
    p.add_argument("--measure", type=int, default=1000, help="images for scale and PSNR")
    return p.parse_args(argv)


def vae_objective(vae, params, x, key, kl_weight: float):
    """``(loss, (l1, kl))``: per-image sums averaged over the batch ``x`` (NHWC, [-1, 1])."""
    import jax.numpy as jnp

    from jaxgen.models import sample_latent

    mean, logvar = vae.apply({"params": params}, x, method="encode")
    recon = vae.apply({"params": params}, sample_latent(key, mean, logvar), method="decode")
    l1 = jnp.mean(jnp.sum(jnp.abs(recon - x), axis=(1, 2, 3)))
    kl = jnp.mean(0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1 - logvar, axis=(1, 2, 3)))
    return l1 + kl_weight * kl, (l1, kl)


def train_autoencoder(vae, source, *, steps: int, batch_size: int, lr: float, kl_weight: float,
                      seed: int = 0, minutes: float = 0.0, progress: bool = True):
    """Train ``vae`` on ``source``; returns ``(variables, {"steps", "l1", "kl", "minutes"})``."""
    import jax
    import optax
    from tqdm import tqdm

    from jaxgen.data import TrainIterator, to_model_space

    h, w, c = source.image_shape
    if c != vae.in_channels:
        raise InputError(f"{source.name}: {c}-channel images for a VAE of {vae.in_channels}.")
    key = jax.random.key(seed)
    params = jax.jit(vae.init)(key, np.zeros((1, h, w, c), np.float32))["params"]
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, images, key):
        grad_fn = jax.value_and_grad(lambda p: vae_objective(vae, p, to_model_space(images), key,
                                                             kl_weight), has_aux=True)
        (_, (l1, kl)), grads = grad_fn(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, l1, kl

    data = TrainIterator(source, batch_size, seed=seed, process_index=0, process_count=1)
    start, done = time.perf_counter(), 0
    with tqdm(total=steps, disable=not progress, file=sys.stderr, unit="step") as bar:
        for done in range(1, steps + 1):
            batch = next(data)["image"]
            params, opt_state, l1, kl = step(params, opt_state, batch,
                                             jax.random.fold_in(key, done))
            bar.update(1)
            if minutes and time.perf_counter() - start > minutes * 60:
                break
    data.close()
    stats = {"steps": done, "l1": float(l1), "kl": float(kl),
             "minutes": (time.perf_counter() - start) / 60}
    return {"params": params}, stats


def measure(vae, variables, images: np.ndarray, seed: int = 0) -> dict:
    """Latent std of posterior samples, the scale ``1 / std``, and reconstruction PSNR (dB).

    Args:
      images: uint8 NHWC.
    """
    import jax

    from jaxgen.models import sample_latent
    from jaxgen.sampling import to_uint8

    x = images.astype(np.float32) / 127.5 - 1
    mean, logvar = jax.jit(lambda v, x: vae.apply(v, x, method="encode"))(variables, x)
    z = np.asarray(sample_latent(jax.random.key(seed), mean, logvar))
    recon = np.asarray(to_uint8(jax.jit(lambda v, m: vae.apply(v, m, method="decode"))(
        variables, mean)))
    mse = np.mean((recon.astype(np.float64) - images) ** 2)
    std = float(z.std())
    return {"latent_std": std, "scale": float(f"{1 / std:.4g}"),
            "psnr": float(10 * np.log10(255.0**2 / max(mse, 1e-12)))}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)
    cli.check_positive(args, "steps", "batch_size", "measure")
    if args.out.suffix != ".safetensors":
        raise InputError(f"{args.out}: give a .safetensors path.")
    if args.out.exists():
        raise InputError(f"{args.out}: exists; give a new path (nothing is overwritten).")
    check_writable(args.out, "OUT")
    if Path(args.source).exists():
        check_outputs({"OUT": args.out}, {"SOURCE": args.source})
    import safetensors.numpy

    from jaxgen.data import open_source
    from jaxgen.models import AutoencoderKL, create_model, export_weights

    vae = create_model(args.vae_model)
    if not isinstance(vae, AutoencoderKL):
        raise InputError(f"--vae-model {args.vae_model}: not an autoencoder; use a vae-* name.")
    source = open_source(args.source)
    evaluation = source if args.eval_source is None else open_source(args.eval_source)
    variables, stats = train_autoencoder(
        vae, source, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        kl_weight=args.kl_weight, seed=args.seed, minutes=args.minutes)
    n = min(args.measure, len(evaluation))
    stats |= measure(vae, variables, evaluation.read(np.arange(n)), args.seed)
    tensors = {k: np.ascontiguousarray(v) for k, v in export_weights(variables, vae).items()}
    with open_atomic(args.out) as f:
        f.write(safetensors.numpy.save(tensors))
    print(json.dumps({"out": str(args.out), **stats}))
    return 0


if __name__ == "__main__":
    cli.run(main, split_cpu=True)
