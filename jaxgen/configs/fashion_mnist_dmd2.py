"""DMD2 of a Fashion-MNIST flow run into a one- or few-step generator.

"Improved Distribution Matching Distillation for Fast Image Synthesis" (Yin et
al., NeurIPS 2024) without its GAN term (not built here) and, as DMD2, without
DMD's regression loss. Three networks of the teacher's architecture, all
starting from the teacher's weights (its first EMA, or ``distill.teacher_weights``;
the student's network, process and prediction must match the teacher's run):

- the generator ``G(z) = x0(sigma(t_max) z, t_max)``, the student network read at
  pure noise (:func:`jaxgen.diffusion.distillation.few_step_generator`), trained by
  the distribution-matching gradient (Yin et al. 2023, Eqs. 7-8): the difference of
  the fake and the real scores' ``x0`` at ``G(z)`` re-noised to a uniform ``t``.
  With ``--config.distill.generator_steps=N`` (``eval.steps`` follows it) it is
  DMD2's ``N``-step generator (Sec. 4.4): its own ``x0`` at the times ``t = 1,
  1 - 1/N, ...`` (:func:`jaxgen.sampling.generator_times`), re-noised between them,
  trained at a step drawn per example on inputs made by its own sampler (backward
  simulation);
- the real score, the frozen teacher (``distill.real_guidance``: classifier-free
  guidance on it, 1 = none, which needs a teacher trained with label dropout);
- the fake score, which denoises the generator's samples (Eq. 6), kept in the
  train state and checkpointed with its own Adam state.

DMD2's two time-scale update rule: ``distill.fake_updates = 5`` fake-score updates
per generator update (every step updates the fake score, every fifth the generator
too). Both use ``optim`` (Adam at 1e-4 here, far above DMD2's 2e-6 for ImageNet:
the toy run lasts minutes), each network's warmup and schedule counting its own
updates; the EMA (0.999) averages the generator after each of its updates. The
batch's labels condition the generator; its images are not used. No label
dropout. Defaults: the default recipe (:mod:`jaxgen.configs.fashion_mnist`) as
teacher::

    python -m jaxgen.train --config jaxgen/configs/fashion_mnist.py --workdir runs/fm \
        --config.train.minutes=10
    python -m jaxgen.train --config jaxgen/configs/fashion_mnist_dmd2.py --workdir runs/dmd2 \
        --config.distill.teacher=runs/fm --config.train.minutes=20
    python -m jaxgen.sample --workdir runs/dmd2 --steps 1 --num 1000 --out runs/dmd2/1step.npz

The run samples in its ``N`` steps only (``--steps N``; ``--solver`` is not used; the
in-loop grids and FIDs likewise). A resumed run loads the teacher again from the folder its
config names. From the README's 10-minute teacher, 12 idle CPU minutes give a
one-step FID of 75.4 against the teacher's 199.4 at one Euler step, and 20 minutes
of the 2-step generator (``--config.distill.generator_steps=2``) a 2-step FID of 48.7,
below the teacher's 49.7 at four Euler steps (BENCHMARKS.md, "Few-step students").
Built on :mod:`jaxgen.configs._fashion_mnist` with the default recipe's U-Net
(:func:`jaxgen.configs._fashion_mnist.unet_kwargs`).
"""

import ml_collections

from jaxgen.configs import _fashion_mnist


def get_config() -> ml_collections.ConfigDict:
    """The default recipe's model and flow (:mod:`jaxgen.configs._fashion_mnist`) as a
    one-step generator distilled from ``distill.teacher`` by DMD2."""
    c = _fashion_mnist.get_config()
    c.model.name = "unet-small"  # the default recipe's U-Net, which the teacher must be
    c.model.kwargs = _fashion_mnist.unet_kwargs(class_dropout=0.0)
    c.diffusion.loss = "dmd2"
    c.distill.teacher = "runs/fm"  # the default recipe's run; --config.distill.teacher=DIR
    c.distill.fake_updates = 5
    c.distill.real_guidance = 1.0
    c.optim.lr = 1e-4
    c.distill.generator_steps = 1  # --config.distill.generator_steps=2: DMD2's 2-step generator
    # the generator's evaluations (eval.solver is not used), following generator_steps
    c.eval.steps = c.distill.get_ref("generator_steps")
    return c
