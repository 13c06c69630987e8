"""Rectified-flow reflow of a Fashion-MNIST flow run: straighter paths, fewer Euler steps.

"Flow Straight and Fast" (Liu et al., ICLR 2023), Algorithm 1 ("Reflow"). The
student is its teacher's network, process (a flow: ``diffusion.process = "flow"``)
and prediction (those fields must match the teacher's run; only the dropout rates
may differ) and starts from the teacher's weights (its first EMA, or
``distill.teacher_weights``). Each step draws fresh noise ``z``, integrates the
teacher's probability-flow ODE from it to ``x0`` in ``distill.teacher_steps = 8``
Heun steps (15 network evaluations, deterministic, conditioned on the batch's
labels, no guidance), and fits the student's velocity to the straight path
``z - x0`` at ``t ~ U(0, 1)`` (the paper's uniform times; ``diffusion.time_sampler``
is not read, ``distill.loss_kwargs.time_sampler`` is). The paper generates the
pairs once into a stored set; here they are drawn afresh every step (the same
coupling, never a pair twice), so a step costs about 15 teacher evaluations
more than a plain flow-matching step. The batch's images are not used, only
its labels. No label dropout: the student learns the teacher's conditional
coupling. Defaults: the default recipe (:mod:`jaxgen.configs.fashion_mnist`) as
teacher, Adam at 1e-4.

The student is an ordinary flow model: it samples with any solver, in few steps
(the in-loop grids and FIDs use 2 Euler steps). A second reflow is a new run whose
teacher is this one::

    python -m jaxgen.train --config jaxgen/configs/fashion_mnist.py --workdir runs/fm \
        --config.train.minutes=10
    python -m jaxgen.train --config jaxgen/configs/fashion_mnist_reflow.py \
        --workdir runs/reflow --config.distill.teacher=runs/fm --config.train.minutes=20
    python -m jaxgen.sample --workdir runs/reflow --solver euler --steps 2 --num 1000 \
        --out runs/reflow/2step.npz

(``--steps 1`` and ``--steps 4`` likewise.) A resumed run loads the teacher again from
the folder its config names. From the README's 10-minute teacher, 12 idle CPU
minutes (1,285 updates) give Euler FIDs of 116.2 / 92.9 / 86.3 at 1 / 2 / 4 steps against
the teacher's 199.4 / 76.0 / 49.7: better at one step, not yet at two (BENCHMARKS.md,
"Few-step students"). Built on
:mod:`jaxgen.configs._fashion_mnist` with the default recipe's U-Net
(:func:`jaxgen.configs._fashion_mnist.unet_kwargs`).
"""

import ml_collections

from jaxgen.configs import _fashion_mnist


def get_config() -> ml_collections.ConfigDict:
    """The default recipe's model and flow (:mod:`jaxgen.configs._fashion_mnist`),
    reflowed from ``distill.teacher``."""
    c = _fashion_mnist.get_config()
    c.model.name = "unet-small"  # the default recipe's U-Net, which the teacher must be
    c.model.kwargs = _fashion_mnist.unet_kwargs(class_dropout=0.0)
    c.diffusion.loss = "reflow"
    c.distill.teacher = "runs/fm"  # the default recipe's run; --config.distill.teacher=DIR
    c.distill.solver = "heun"
    c.distill.teacher_steps = 8
    c.optim.lr = 1e-4
    c.eval.solver = "euler"
    c.eval.steps = 2
    return c
