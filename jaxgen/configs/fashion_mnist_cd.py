"""Consistency distillation (CD) of a Fashion-MNIST run into a one- to few-step generator.

"Consistency Models" (Song et al., ICML 2023), Algorithm 2, with the teacher any
jaxgen run of the same images and classes, e.g. the default recipe
(:mod:`jaxgen.configs.fashion_mnist`, a flow-matching U-Net): its weights are
read from its workdir (``--config.distill.teacher``), frozen, and one Heun
step of its probability-flow ODE between neighbouring levels of the paper's
18-level Karras discretisation of [0.002, 80] gives each target (the teacher's
process is met at equal noise level ``sigma / alpha``). The student is
:mod:`jaxgen.configs.fashion_mnist_ct`'s consistency U-Net and parametrisation;
the loss is the paper's l2 (mean squared error) with uniform weighting, and
the target is the stop-gradient of the student itself (no EMA target, as iCT);
samples come from the student's EMA. The student starts from scratch (the
teacher's network has another parametrisation).

    python -m jaxgen.train --config jaxgen/configs/fashion_mnist.py --workdir runs/fm \
        --config.train.minutes=10
    python -m jaxgen.train --config jaxgen/configs/fashion_mnist_cd.py --workdir runs/cd \
        --config.distill.teacher=runs/fm --config.train.minutes=20
    python -m jaxgen.sample --workdir runs/cd --steps 1 --num 1000 --out runs/cd/1step.npz

A resumed run loads the teacher again from the folder its config names.
Figures (FID of 1-, 2- and 4-step students against the teacher's Euler
samples) are in BENCHMARKS.md. Built on :mod:`jaxgen.configs.fashion_mnist_ct`.
"""

import ml_collections

from jaxgen.configs import fashion_mnist_ct


def get_config() -> ml_collections.ConfigDict:
    """The iCT recipe's student, distilled from ``distill.teacher`` (set on the command line)."""
    c = fashion_mnist_ct.get_config()
    c.diffusion.loss = "cd"
    c.distill.teacher = "runs/fm"  # the default recipe's run; --config.distill.teacher=DIR
    c.distill.solver = "heun"
    c.distill.loss_kwargs = ml_collections.ConfigDict(dict(num_scales=18, distance="mse"))
    c.optim.lr = 1e-3
    c.train.num_steps = 1_000_000  # in practice bounded by --config.train.minutes
    return c
