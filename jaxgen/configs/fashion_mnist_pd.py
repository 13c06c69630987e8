"""Progressive distillation (one stage) of a Fashion-MNIST run: N DDIM steps into N / 2.

"Progressive Distillation for Fast Sampling of Diffusion Models" (Salimans & Ho,
ICLR 2022), Algorithm 2. The student is its teacher's network, process and
prediction (those fields must match the teacher's run; only the dropout rates may
differ) and starts from the teacher's weights (its first EMA, or
``distill.teacher_weights``). For a time ``t = i / N`` of the teacher's uniform
grid, two deterministic DDIM steps of the teacher give the ``x0`` target with which
one student step lands at the same point; the loss is the squared error in ``x0``
with the "truncated SNR" weight ``max(SNR(t), 1)``. The student samples with DDIM
on every second time of the teacher's grid: ``python -m jaxgen.sample --steps N/2``
(``--solver`` is not used). No label dropout: the student learns the teacher's
conditional targets. Defaults: the default recipe (:mod:`jaxgen.configs.fashion_mnist`,
flow matching) as teacher at ``N = 16`` steps, Adam at 1e-4.

One stage per run; the next stage is a new run whose teacher is this one, with
``distill.teacher_steps`` halved (checked: a pd teacher must have been distilled to
that many steps)::

    python -m jaxgen.train --config jaxgen/configs/fashion_mnist_pd.py --workdir runs/pd8 \
        --config.distill.teacher=runs/fm --config.distill.teacher_steps=16 \
        --config.train.minutes=10
    python -m jaxgen.train --config jaxgen/configs/fashion_mnist_pd.py --workdir runs/pd4 \
        --config.distill.teacher=runs/pd8 --config.distill.teacher_steps=8 \
        --config.train.minutes=10
    python -m jaxgen.sample --workdir runs/pd4 --steps 4 --num 1000 --out runs/pd4/4step.npz

The in-loop grids and FIDs use ``eval.steps = distill.teacher_steps / 2``. A resumed run
loads the teacher again from the folder its config names. Built on
:mod:`jaxgen.configs._fashion_mnist` with the default recipe's U-Net
(:func:`jaxgen.configs._fashion_mnist.unet_kwargs`).
"""

import ml_collections

from jaxgen.configs import _fashion_mnist


def get_config() -> ml_collections.ConfigDict:
    """The default recipe's model and objective (:mod:`jaxgen.configs._fashion_mnist`),
    distilled from ``distill.teacher``."""
    c = _fashion_mnist.get_config()
    c.model.name = "unet-small"  # the default recipe's U-Net, which the teacher must be
    c.model.kwargs = _fashion_mnist.unet_kwargs(class_dropout=0.0)
    c.diffusion.loss = "pd"
    c.distill.teacher = "runs/fm"  # the default recipe's run; --config.distill.teacher=DIR
    c.distill.teacher_steps = 16
    c.distill.loss_kwargs = ml_collections.ConfigDict(dict(weighting="truncated_snr"))
    c.optim.lr = 1e-4
    c.eval.solver = "ddim"  # what the student samples with (fixed for pd)
    c.eval.steps = c.distill.get_ref("teacher_steps") // 2
    return c
