"""Training recipes: ``python -m jaxgen.train --config jaxgen/configs/NAME.py --workdir DIR``.

Each recipe module has ``get_config() -> ml_collections.ConfigDict`` and
builds on :mod:`jaxgen.configs.base`, which documents every field; the
module docstring gives the command and the paper's settings. From Python,
``from jaxgen.configs import fashion_mnist; config = fashion_mnist.get_config()``.

- ``fashion_mnist``: the offline default, a small flow-matching U-Net (CPU).
- ``cifar10_ddpm``, ``cifar10_edm``, ``cifar10_flow``: DDPM, EDM and flow
  matching on CIFAR-10 with the 35.7M DDPM U-Net (CIFAR fields in ``_cifar10``).
- ``imagenet_dit_b2``, ``imagenet_dit_xl2``: DiT on ImageNet 64x64 pixels.
- ``fashion_mnist_edm2``: EDM2 (network, loss, schedule, post-hoc EMA) at toy size (CPU).
- ``fashion_mnist_ct``, ``fashion_mnist_cd``, ``fashion_mnist_scm``: few-step consistency
  models at toy size (CPU), trained from data (iCT, sCT) or distilled from a run
  (``--config.distill.teacher``: CD, sCD); ``fashion_mnist_scd`` and
  ``fashion_mnist_cd_from_teacher``: sCD and CD starting from the default recipe's run,
  on its flow parametrisation; ``fashion_mnist_pd``: one stage of progressive
  distillation of a run; ``fashion_mnist_reflow``: rectified-flow reflow of a flow run;
  ``fashion_mnist_dmd2``: a one- or few-step generator distilled from a run by DMD2.
- ``imagenet512_edm2_{xs,s,m,l,xl,xxl}``: EDM2 on ImageNet-512 latents, the official
  presets (shared settings in ``_edm2``); ``imagenet64_edm2_s``: EDM2-S on ImageNet-64 pixels.
- ``imagenet256_dit_xl2``, ``imagenet256_sit_xl2``: DiT-XL/2 and SiT-XL/2 on ImageNet-256
  SD-VAE latents (``python -m jaxgen.encode`` first), the papers' recipes.
- ``imagenet256_sit_xl2_repa``: SiT-XL/2 + REPA (DINOv2-B alignment; Yu et al. 2025);
  ``fashion_mnist_repa``: REPA offline at toy size (Inception's mixed_6/conv, CPU).
- ``fashion_mnist_latent``: latent diffusion end to end on the CPU, with a small
  autoencoder trained by ``python -m jaxgen.train_autoencoder``.
"""

RECIPES = (
    "fashion_mnist",
    "cifar10_ddpm",
    "cifar10_edm",
    "cifar10_flow",
    "imagenet_dit_b2",
    "imagenet_dit_xl2",
    "fashion_mnist_edm2",
    "fashion_mnist_ct",
    "fashion_mnist_cd",
    "fashion_mnist_cd_from_teacher",
    "fashion_mnist_scm",
    "fashion_mnist_scd",
    "fashion_mnist_pd",
    "fashion_mnist_reflow",
    "fashion_mnist_dmd2",
    "imagenet512_edm2_xs",
    "imagenet512_edm2_s",
    "imagenet512_edm2_m",
    "imagenet512_edm2_l",
    "imagenet512_edm2_xl",
    "imagenet512_edm2_xxl",
    "imagenet64_edm2_s",
    "imagenet256_dit_xl2",
    "imagenet256_sit_xl2",
    "imagenet256_sit_xl2_repa",
    "fashion_mnist_repa",
    "fashion_mnist_latent",
)
