"""The offline default: a small class-conditional U-Net, flow matching, Fashion-MNIST at 28x28.

Runs on a laptop CPU without downloads (Debian's Fashion-MNIST copy, or
TFDS). Rectified-flow / flow-matching training (Liu et al. 2023; Lipman et
al. 2023) with velocity prediction and logit-normal time sampling (Esser et
al. 2024, Eq. 19) learns fastest per CPU-second among the recipes here; the
U-Net is the DDPM/ADM design (Ho et al. 2020; Dhariwal & Nichol 2021) shrunk
to 0.72M parameters (136 MFLOP per forward pass), native 28x28 (28 -> 14 -> 7, attention at 7x7).

    python -m jaxgen.train --config jaxgen/configs/fashion_mnist.py --workdir runs/fm \
        --config.train.minutes=10

Expected on a 2-core CPU: garments recognisable in the 8x8 grid
(``runs/fm/samples/``) after ~10 minutes of training; FID figures in
BENCHMARKS.md. Built on :mod:`jaxgen.configs.base`, like every recipe.
"""

import ml_collections

from jaxgen.configs import base


def get_config() -> ml_collections.ConfigDict:
    """The base with the toy recipe's fields: small batches, short cadence, fast EMA."""
    c = base.get_config()
    c.data.source = "fashion_mnist:train"
    c.data.batch_size = 32
    c.model.name = "unet-small"
    c.model.kwargs = ml_collections.ConfigDict(dict(
        ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attention_levels=(2,), head_channels=32,
        num_groups=8, dropout=0.0, num_classes=10, class_dropout=0.1,
    ))
    c.diffusion.process = "flow"
    c.diffusion.process_kwargs = ml_collections.ConfigDict(dict(path="linear"))
    c.diffusion.prediction = "velocity"
    c.diffusion.time_sampler = "logit_normal"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.b2 = 0.99
    c.optim.grad_clip = 1.0
    c.train.num_steps = 1_000_000  # in practice bounded by --config.train.minutes
    c.train.ema_decays = (0.999,)
    c.train.ema_warmup = True
    c.checkpoint.every_steps = 1000
    c.eval.every_steps = 5000
    c.eval.at_minutes = (10.0, 30.0, 60.0)
    c.eval.solver = "euler"
    c.eval.steps = 20
    c.eval.fid_samples = 1000
    c.eval.fid_reference = "fashion_mnist:test"
    return c
