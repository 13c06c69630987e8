"""Consistency distillation (CD) of the default recipe's run, the student starting from its weights.

"Consistency Models" (Song et al., ICML 2023), Algorithm 2, started as the paper
starts CD: from the teacher's weights. The student is the teacher's own network,
process and parametrisation (the default recipe's: flow matching, velocity
prediction, :mod:`jaxgen.configs._fashion_mnist`), seen as a consistency function
(:func:`jaxgen.diffusion.consistency.consistency_view`): its ``x0`` at equal
log-SNR is EDM's denoiser of some raw network ``F``, and the student is the paper's
``c_skip x + c_out F`` of that ``F`` with boundary ``sigma_min = 0.002``
(``f(x, 0.002) = x`` exactly), so it starts as the teacher's denoiser. One Heun step
of the teacher's probability-flow ODE between neighbouring levels of the paper's
18-level Karras discretisation of [0.002, 80] gives each target; l2 distance, uniform
weighting, the EMA target network ``mu = 0.95`` (the paper's on CIFAR-10). Scaled
down: batch 32, Adam at 1e-4. No label dropout. Samples come from the student's EMA,
by CM's multistep sampler on the same levels (1 step: ``sigma = 80``; 2: and 2.51)::

    python -m jaxgen.train --config jaxgen/configs/fashion_mnist_cd_from_teacher.py \\
        --workdir runs/cdt --config.distill.teacher=runs/fm --config.train.minutes=12
    python -m jaxgen.sample --workdir runs/cdt --steps 1 --num 1000 --out runs/cdt/1step.npz

For a student of the consistency parametrisation on EDM, trained from scratch, see
:mod:`jaxgen.configs.fashion_mnist_cd`. A resumed run loads the teacher again from the
folder its config names.
"""

import ml_collections

from jaxgen.configs import _fashion_mnist


def get_config() -> ml_collections.ConfigDict:
    """The default recipe's model and process, distilled from ``distill.teacher`` by CD."""
    c = _fashion_mnist.get_config()
    c.model.name = "unet-small"  # the default recipe's U-Net, which the teacher must be
    c.model.kwargs = _fashion_mnist.unet_kwargs(class_dropout=0.0)
    c.diffusion.loss = "cd"
    c.distill.teacher = "runs/fm"  # the default recipe's run; --config.distill.teacher=DIR
    c.distill.init_from_teacher = True
    c.distill.solver = "heun"
    c.distill.target_ema = 0.95
    c.distill.loss_kwargs = ml_collections.ConfigDict(dict(num_scales=18, distance="mse"))
    c.optim.lr = 1e-4
    c.eval.solver = "euler"  # unused: a consistency model takes eval.steps evaluations
    c.eval.steps = 2
    return c
