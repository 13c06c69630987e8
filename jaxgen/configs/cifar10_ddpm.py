"""CIFAR-10, DDPM: eps-prediction with the 35.7M-parameter U-Net (Ho et al. 2020).

Settings of "Denoising Diffusion Probabilistic Models" (Ho, Jain & Abbeel,
2020), Sec. 4 and App. B: 1000-step linear beta schedule (1e-4 .. 0.02),
discrete uniform t, unweighted eps loss (L_simple), the 35.7M U-Net (ch 128,
multipliers 1,2,2,2, 2 residual blocks, attention at 16x16, dropout 0.1),
Adam lr 2e-4 with 5000 warmup steps, batch 128, gradient clipping at 1,
EMA 0.9999, random horizontal flips, 800k steps. The paper reports FID 3.17
(50k samples, 1000 ancestral steps).

    python -m jaxgen.train --config jaxgen/configs/cifar10_ddpm.py --workdir runs/cifar10_ddpm
    python -m jaxgen.sample --workdir runs/cifar10_ddpm --num 50000 --solver ddpm \
        --steps 1000 --out runs/cifar10_ddpm/samples.npz
    python -m jaxgen.evaluate tfds:cifar10:train runs/cifar10_ddpm/samples.npz
"""

import ml_collections

from jaxgen.configs import _cifar10


def get_config() -> ml_collections.ConfigDict:
    """The shared CIFAR-10 fields with DDPM's objective, optimizer and sampler."""
    c = _cifar10.get_config()
    c.data.batch_size = 128
    c.model.kwargs = ml_collections.ConfigDict(dict(num_classes=0))
    c.diffusion.process = "vp"
    c.diffusion.process_kwargs = ml_collections.ConfigDict(dict(schedule="linear", num_steps=1000))
    c.diffusion.prediction = "eps"
    c.diffusion.time_sampler = "discrete"
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 5000
    c.optim.grad_clip = 1.0
    c.train.num_steps = 800_000
    c.train.ema_decays = (0.9999,)
    c.eval.solver = "ddim"
    c.eval.steps = 100
    return c
