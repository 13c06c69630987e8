"""The Fashion-MNIST fields the toy recipes share; not a recipe itself.

On :mod:`jaxgen.configs.base`: Debian's (or TFDS's) Fashion-MNIST at batch 32,
flow matching with velocity prediction and logit-normal times, AdamW at 1e-3
(warmup 100, beta2 0.99, clipping at 1), a warmed-up EMA of decay 0.999,
checkpoints every 1000 steps, sample grids every 5000 and FID of 1000 Euler
samples (20 steps) against the test set at 10, 30 and 60 minutes. The toy
recipes (``fashion_mnist``, ``_latent``, ``_repa``, ``_ct``) add their model,
and change what differs.
"""

import ml_collections

from jaxgen.configs import base


def get_config() -> ml_collections.ConfigDict:
    """The base with the toy recipes' data, objective, optimizer and cadence."""
    c = base.get_config()
    c.data.source = "fashion_mnist:train"
    c.data.batch_size = 32
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


def unet_kwargs(class_dropout: float = 0.1) -> ml_collections.ConfigDict:
    """The default recipe's ``unet-small`` arguments (0.72M parameters, 10 classes);
    ``class_dropout`` is the label dropout of classifier-free guidance."""
    return ml_collections.ConfigDict(dict(
        ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attention_levels=(2,), head_channels=32,
        num_groups=8, dropout=0.0, num_classes=10, class_dropout=class_dropout,
    ))
