"""EDM2 on Fashion-MNIST at 28x28: a small magnitude-preserving U-Net, offline on a CPU.

"Analyzing and Improving the Training Dynamics of Diffusion Models" (Karras
et al., CVPR 2024; NVlabs/edm2 ``train_edm2.py``) shrunk to the size of the
default recipe (:mod:`jaxgen.configs.fashion_mnist`: 0.77M parameters and
171 MFLOP per forward pass against its 0.72M and 136 MFLOP). What is kept
from the paper: config G's network (``edm2-img64-*`` with 16 channels,
levels 28 -> 14 -> 7, attention at 7x7, one block per level), its built-in
EDM preconditioning and learned uncertainty (``diffusion.loss = "edm2"``,
Eq. 21), the ImageNet-64 presets' noise levels (``ln sigma ~ N(-0.8, 1.6^2)``),
Adam (0.9, 0.99) without weight decay or clipping at the inverse square-root
rate, forced weight normalisation after every update, and power-function EMAs
(sigma_rel 0.05 and 0.10) with snapshots every 1000 steps for post-hoc EMA.
What is scaled down: the batch (32, not 2048), the learning rate (alpha_ref
0.01, the S preset's), t_ref (2000 updates, not 35k) and the ramp-up (100
updates, not 10 Mimg). Sampling: Heun with 16 steps (31 NFE) on the
Karras grid, from the first power EMA (there is no classic EMA).

    python -m jaxgen.train --config jaxgen/configs/fashion_mnist_edm2.py \
        --workdir runs/fm_edm2 --config.train.minutes=10
    python -m jaxgen.phema --workdir runs/fm_edm2 --sigma-rel 0.05,0.1,0.15 \
        --out runs/fm_edm2/posthoc
    python -m jaxgen.sample --workdir runs/fm_edm2 --num 64 --solver heun --steps 16 \
        --ema runs/fm_edm2/posthoc/phema-<t>-0.150.npz --out runs/fm_edm2/posthoc.npz

Runs without downloads (Debian's Fashion-MNIST copy, or TFDS); how its FID
compares with the default recipe's at equal CPU minutes is for BENCHMARKS.md
to say. Built on :mod:`jaxgen.configs.base`, like every recipe.
"""

import ml_collections

from jaxgen.configs import base


def get_config() -> ml_collections.ConfigDict:
    """The base with EDM2's fields at toy size."""
    c = base.get_config()
    c.data.source = "fashion_mnist:train"
    c.data.batch_size = 32
    c.model.name = "edm2-img64-xs"  # config G; its size set below
    c.model.kwargs = ml_collections.ConfigDict(dict(
        img_resolution=28, img_channels=1, num_classes=10, model_channels=16,
        channel_mult=(1, 2, 4), num_blocks=1, attn_resolutions=(7,), channels_per_head=32,
        dropout=0.0,
    ))
    c.diffusion.process = "edm"
    c.diffusion.process_kwargs = ml_collections.ConfigDict(dict(sigma_min=0.002, sigma_max=80.0))
    c.diffusion.prediction = "x0"  # the network is EDM2's Precond: it returns the denoised image
    # diffusion.precond: the base's "none"; the network preconditions itself (sigma_data 0.5)
    c.diffusion.time_sampler = "lognormal"
    c.diffusion.time_sampler_kwargs = ml_collections.ConfigDict(dict(p_mean=-0.8, p_std=1.6))
    c.diffusion.weighting = "edm"
    c.diffusion.loss = "edm2"
    c.optim.lr = 0.01  # alpha_ref
    c.optim.schedule = "inverse_sqrt"
    c.optim.ref_steps = 2000  # t_ref
    c.optim.warmup_steps = 100  # the ramp-up
    c.optim.b2 = 0.99
    c.train.num_steps = 1_000_000  # in practice bounded by --config.train.minutes
    c.train.ema_decays = ()
    c.train.phema_sigma_rels = (0.05, 0.1)
    c.train.phema_snapshot_every = 1000
    c.checkpoint.every_steps = 1000
    c.eval.every_steps = 5000
    c.eval.at_minutes = (10.0, 30.0, 60.0)
    c.eval.solver = "heun"
    c.eval.steps = 16
    c.eval.fid_samples = 1000
    c.eval.fid_reference = "fashion_mnist:test"
    return c
