"""Consistency training (iCT) on Fashion-MNIST at 28x28: a one- to few-step generator, no teacher.

"Improved Techniques for Training Consistency Models" (Song & Dhariwal, ICLR
2024) on the default recipe's U-Net (:mod:`jaxgen.configs.fashion_mnist`'s
0.72M parameters, class-conditional, no label dropout: a consistency model
samples without guidance). What is kept from the paper: the consistency
parametrisation on EDM's process (``sigma`` in [0.002, 80], ``sigma_data``
0.5; ``f(x, 0.002) = x`` exactly), the exponential curriculum ``N(k)`` from 10
to 1280 intervals over the run's ``train.num_steps``, log-normal noise levels
(P_mean -1.1, P_std 2.0) over the discretisation, the ``1 / (sigma_{i+1} -
sigma_i)`` weighting, the pseudo-Huber distance (``c = 0.00054 sqrt(d)``) and
no EMA teacher (the target is the stop-gradient of the current weights);
samples come from the EMA. What is scaled down: batch 32 (not 1024), 10k
steps (not 400k), Adam at 2e-4 (not RAdam at 1e-4 on batch 1024).

    python -m jaxgen.train --config jaxgen/configs/fashion_mnist_ct.py --workdir runs/ct
    python -m jaxgen.sample --workdir runs/ct --steps 2 --num 1000 --out runs/ct/2step.npz

``train.num_steps`` sets the curriculum, so it cannot change when the run
resumes (``train.minutes`` can, and stops the curriculum early). The in-loop
grids and FIDs are 2-step samples (``eval.steps`` is the number of network
evaluations); figures for the few-step students are in BENCHMARKS.md. Built on
:mod:`jaxgen.configs._fashion_mnist` (the toy recipes' shared fields).
"""

import ml_collections

from jaxgen.configs import _fashion_mnist


def get_config() -> ml_collections.ConfigDict:
    """The toy recipes' fields with iCT's objective."""
    c = _fashion_mnist.get_config()
    c.model.name = "unet-small"
    c.model.kwargs = _fashion_mnist.unet_kwargs(class_dropout=0.0)
    c.diffusion.process = "edm"
    c.diffusion.process_kwargs = ml_collections.ConfigDict(dict(sigma_min=0.002, sigma_max=80.0))
    c.diffusion.precond = "consistency"
    c.diffusion.prediction = "x0"  # what the consistency function returns
    c.diffusion.time_sampler = "lognormal"  # unused: iCT draws its levels from its own grid
    c.diffusion.loss = "ict"
    c.optim.lr = 2e-4
    c.train.num_steps = 10_000  # the curriculum's length K
    c.eval.at_minutes = (10.0, 30.0)
    c.eval.solver = "euler"  # unused: a consistency model takes eval.steps evaluations
    c.eval.steps = 2
    return c
