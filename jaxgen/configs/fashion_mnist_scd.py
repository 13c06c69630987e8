"""sCD (Lu & Song 2024) of the default recipe's run, the student starting from its weights.

"Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models" (Lu &
Song, ICLR 2025), Algorithm 1 with a teacher: the student is the teacher's own
network, process and parametrisation (the default recipe's: flow matching,
velocity prediction, :mod:`jaxgen.configs._fashion_mnist`), initialised from the
teacher's weights as the paper does, and the loss sees it as a TrigFlow model at equal log-SNR
(:func:`jaxgen.diffusion.scm.trigflow_velocity`, exact for any process): its
consistency function ``cos(t) x_t - sin(t) sigma_d F`` is its own ``x0`` prediction.
The tangent ``dF-/dt`` by ``jax.jvp``, its normalisation ``g / (||g|| + 0.1)`` and
linear warmup, the learned adaptive weight (a logvar head on the time embedding, zero
at the start) and the time proposal ``tan(t) sigma_d ~ LogNormal(-1.0, 1.4^2)`` are
the paper's; samples at its times (1 step: ``sigma / alpha = 80``; 2 steps: and
``t = 1.1`` on TrigFlow), as the flow times of the same log-SNR. Scaled down: batch 32,
tangent warmup over 200 updates (the paper: 10,000), Adam at 1e-4. No label dropout:
the student learns the teacher's conditional velocity (no guidance)::

    python -m jaxgen.train --config jaxgen/configs/fashion_mnist_scd.py --workdir runs/scd \\
        --config.distill.teacher=runs/fm --config.train.minutes=12
    python -m jaxgen.sample --workdir runs/scd --steps 2 --num 1000 --out runs/scd/2step.npz

For sCD or sCT on TrigFlow's own parametrisation see :mod:`jaxgen.configs.fashion_mnist_scm`.
A resumed run loads the teacher again from the folder its config names.
"""

import ml_collections

from jaxgen.configs import _fashion_mnist


def get_config() -> ml_collections.ConfigDict:
    """The default recipe's model and process, distilled from ``distill.teacher`` by sCM."""
    c = _fashion_mnist.get_config()
    c.model.name = "unet-small"  # the default recipe's U-Net, which the teacher must be
    c.model.kwargs = _fashion_mnist.unet_kwargs(class_dropout=0.0)
    c.diffusion.loss = "scm"
    c.distill.teacher = "runs/fm"  # the default recipe's run; --config.distill.teacher=DIR
    c.distill.init_from_teacher = True
    c.distill.adaptive_weight = True
    c.distill.loss_kwargs = ml_collections.ConfigDict(dict(
        p_mean=-1.0, p_std=1.4, warmup_steps=200, tangent_c=0.1))
    c.optim.lr = 1e-4
    c.eval.solver = "euler"  # unused: a consistency model takes eval.steps evaluations
    c.eval.steps = 2
    return c
