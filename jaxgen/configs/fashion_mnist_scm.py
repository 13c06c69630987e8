"""Continuous-time consistency (sCM) on Fashion-MNIST at 28x28: sCT from data, or sCD.

"Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models" (Lu &
Song, ICLR 2025), Algorithm 1, on :mod:`jaxgen.configs.fashion_mnist_ct`'s U-Net
(0.72M parameters, class-conditional, no dropout: a consistency model samples
without guidance). What is kept from the paper: TrigFlow (``x_t = cos(t) x0 +
sin(t) z``, ``sigma_d = 0.5``) with the model ``sigma_d F(x_t / sigma_d, c_noise(t))``
and the paper's identity time transformation ``c_noise(t) = t`` into the U-Net's
positional embedding (Sec. 4.1: the tangent carries ``dF/dt``, which an embedding of
``1000 t`` multiplies by up to 1000; with it this recipe's sCT grew its raw tangent
norm from 9 to ~2,000 and failed, FID 322 at one step, where ``c_noise = t`` keeps it
at 7-10 and reaches 153: BENCHMARKS.md, "Few-step students")
and the consistency function ``cos(t) x_t - sin(t) sigma_d F``; times
``t = arctan(e^tau / sigma_d)``, ``tau ~ N(-1.0, 1.4^2)``; the tangent
``dF-/dt`` by ``jax.jvp``, its normalisation ``g / (||g|| + 0.1)`` and its linear
warmup; the learned adaptive weight ``w(t)`` (a logvar head on the time embedding,
zero at the start); samples from the EMA at the paper's times (1 step:
``T = arctan(80 / 0.5)``; 2 steps: ``(T, 1.1)``). What is scaled down: batch 32, the
tangent warmup over 1,000 updates (the paper: 10,000) and Adam at 2e-4.

sCT (no teacher)::

    python -m jaxgen.train --config jaxgen/configs/fashion_mnist_scm.py --workdir runs/sct \
        --config.train.minutes=20
    python -m jaxgen.sample --workdir runs/sct --steps 2 --num 1000 --out runs/sct/2step.npz

sCD: the teacher (any jaxgen run of the same images and classes, e.g. the default
flow-matching recipe's) gives ``dx_t/dt`` at equal log-SNR; with a TrigFlow teacher
of this U-Net (``diffusion.loss=denoising`` on this recipe's process and precond),
``--config.distill.init_from_teacher=True`` starts the student from its weights as the
paper does::

    python -m jaxgen.train --config jaxgen/configs/fashion_mnist_scm.py --workdir runs/scd \
        --config.distill.teacher=runs/fm --config.train.minutes=20

A resumed sCD run loads the teacher again from the folder its config names. Built on
:mod:`jaxgen.configs.fashion_mnist_ct`.
"""

import ml_collections

from jaxgen.configs import fashion_mnist_ct


def get_config() -> ml_collections.ConfigDict:
    """The iCT recipe's U-Net on TrigFlow, trained with sCM's loss."""
    c = fashion_mnist_ct.get_config()
    c.diffusion.process = "trigflow"
    c.diffusion.process_kwargs = ml_collections.ConfigDict()
    c.diffusion.precond = "trigflow"
    c.diffusion.prediction = "velocity"  # the TrigFlow model's dx_t/dt = sigma_d F
    c.diffusion.time_scale = 1.0  # c_noise(t) = t (Lu & Song 2024, Sec. 4.1), not 1000 t
    c.diffusion.loss = "scm"
    c.distill.adaptive_weight = True
    c.distill.loss_kwargs = ml_collections.ConfigDict(dict(
        p_mean=-1.0, p_std=1.4, warmup_steps=1000, tangent_c=0.1))
    c.train.num_steps = 1_000_000  # in practice bounded by --config.train.minutes
    return c
