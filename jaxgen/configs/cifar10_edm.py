"""CIFAR-10 with EDM preconditioning, loss and sampler (Karras et al. 2022).

"Elucidating the Design Space of Diffusion-Based Generative Models" (Karras,
Aittala, Aila & Laine, 2022), Table 1 and App. F.2 (unconditional CIFAR-10):
sigma_data 0.5, ln(sigma) ~ N(-1.2, 1.2^2), loss weight
(sigma^2 + sd^2) / (sigma sd)^2, the c_skip/c_out/c_in/c_noise wrapper around
the network, Adam lr 1e-3 (betas 0.9, 0.999, eps 1e-8) ramped up over 10M
images, batch 512, dropout 0.13, EMA half-life 0.5M images (decay
0.5^(512/500000) = 0.99929 per step), 200M images (390,625 steps), Heun's
2nd-order sampler with 18 steps (35 NFE). The backbone here is jaxgen's
35.7M DDPM U-Net rather than the paper's DDPM++ (56M); the paper reports FID
1.97 with DDPM++.

    python -m jaxgen.train --config jaxgen/configs/cifar10_edm.py --workdir runs/cifar10_edm
    python -m jaxgen.sample --workdir runs/cifar10_edm --num 50000 --solver heun \
        --steps 18 --out runs/cifar10_edm/samples.npz
"""

import ml_collections

from jaxgen.configs import _cifar10


def get_config() -> ml_collections.ConfigDict:
    """The shared CIFAR-10 fields with EDM's process, preconditioning and schedule."""
    c = _cifar10.get_config()
    c.data.batch_size = 512
    c.model.kwargs = ml_collections.ConfigDict(dict(num_classes=0, dropout=0.13))
    c.diffusion.process = "edm"
    c.diffusion.process_kwargs = ml_collections.ConfigDict(dict(sigma_min=0.002, sigma_max=80.0))
    c.diffusion.prediction = "eps"
    c.diffusion.precond = "edm"
    # diffusion.sigma_data: the base's 0.5, the paper's; the process, precond and weighting read it
    c.diffusion.time_sampler = "lognormal"
    c.diffusion.time_sampler_kwargs = ml_collections.ConfigDict(dict(p_mean=-1.2, p_std=1.2))
    c.diffusion.weighting = "edm"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 19_531  # 10M images at batch 512
    c.train.num_steps = 390_625  # 200M images
    c.train.ema_decays = (0.99929,)
    c.eval.solver = "heun"
    c.eval.steps = 18
    return c
