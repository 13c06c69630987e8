"""CIFAR-10, DDPM: eps-prediction with the 35.7M-parameter U-Net (Ho et al. 2020).

Settings of "Denoising Diffusion Probabilistic Models" (Ho, Jain & Abbeel,
2020), Sec. 4 and App. B: 1000-step linear beta schedule (1e-4 .. 0.02),
discrete uniform t, unweighted eps loss (L_simple), the 35.7M U-Net (ch 128,
multipliers 1,2,2,2, 2 residual blocks, attention at 16x16, dropout 0.1),
Adam lr 2e-4 with 5000 warmup steps, batch 128, gradient clipping at 1,
EMA 0.9999, random horizontal flips, 800k steps. The paper reports FID 3.17
(50k samples, 1000 ancestral steps).

    python -m jaxgen.train --config configs/cifar10_ddpm.py --workdir runs/cifar10_ddpm
    python -m jaxgen.sample --workdir runs/cifar10_ddpm --num 50000 --solver ddpm \
        --steps 1000 --out runs/cifar10_ddpm/samples.npz
    python -m jaxgen.evaluate tfds:cifar10:train runs/cifar10_ddpm/samples.npz
"""

import ml_collections

from configs import fashion_mnist


def get_config() -> ml_collections.ConfigDict:
    """The default recipe with DDPM's CIFAR-10 fields."""
    c = fashion_mnist.get_config()
    c.data.source = "tfds:cifar10:train"
    c.data.resolution = 32  # CIFAR-10 is 32x32 already; declared so shapes are known offline
    c.data.batch_size = 128
    c.data.flip = True
    c.model.name = "unet-ddpm-cifar10"
    c.model.kwargs = ml_collections.ConfigDict(dict(num_classes=0))
    c.diffusion.process = "vp"
    c.diffusion.process_kwargs = ml_collections.ConfigDict(dict(schedule="linear", num_steps=1000))
    c.diffusion.prediction = "eps"
    c.diffusion.time_sampler = "discrete"
    c.diffusion.weighting = "uniform"
    c.diffusion.time_scale = 1000.0  # the network embeds the step index k = 1000 t
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 5000
    c.optim.b2 = 0.999
    c.optim.grad_clip = 1.0
    c.train.num_steps = 800_000
    c.train.ema_decays = (0.9999,)
    c.train.ema_warmup = False
    c.checkpoint.every_steps = 10_000
    c.eval.every_steps = 50_000
    c.eval.at_minutes = ()
    c.eval.solver = "ddim"
    c.eval.steps = 100
    c.eval.fid_samples = 10_000
    c.eval.fid_reference = "tfds:cifar10:train"
    return c
