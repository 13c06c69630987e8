"""Class-conditional ImageNet-512 with EDM2-XS in 64x64x4 latents (Karras et al., CVPR 2024).

"Analyzing and Improving the Training Dynamics of Diffusion Models", config G,
with the numbers of NVlabs/edm2 ``train_edm2.py`` preset ``edm2-img512-xs``
(commit 4bf8162f): 124,713,253 parameters (``model_channels`` 128, dropout
0), batch 2048, 2048 Mi images (1,048,576 updates; the released pickles'
"2147483 kimg"), Adam (0.9, 0.99, eps 1e-8) without weight decay or
clipping at ``alpha_ref / sqrt(max(t / t_ref, 1))`` with ``alpha_ref`` 0.0120
and ``t_ref`` 70k updates, ramped up over the first 10 Mi images
(``learning_rate_schedule``'s ``rampup_Mimg=10``: 4882.8 updates, 4883 here),
``ln sigma ~ N(-0.4, 1.0^2)``, the uncertainty-weighted loss (Eq. 21),
forced weight normalisation, power-function EMAs with sigma_rel 0.05 and
0.10 snapshotted every 8 Mi images (4096 updates), mixed precision (fp16
there, bfloat16 here). The paper reports FID 3.53 without guidance with the
post-hoc EMA of sigma_rel 0.135, and 2.91 guided by an unconditional XS
(sigma_rel 0.045, guidance 1.4), sampling with Heun's method in 32 steps.

Data: the latents are a file you provide, ``--config.data.source=PATH``:
ImageNet train images center-cropped to 512x512 and encoded by the Stable
Diffusion VAE (sd-vae-ft-mse) into 64x64x4 latents, normalised as EDM2's
``StabilityVAEEncoder`` does (per-channel mean 5.81, 3.25, 0.12, -2.15 and
std 4.17, 4.62, 3.71, 3.28, scaled to std 0.5), with labels. jaxgen's data
sources read uint8 images only: until the latent dataset of issue 15 exists,
this recipe describes the run (``--dry-run``) but cannot read such a file,
and in-loop evaluation is off (samples are latents, and nothing here decodes
them yet).

    python -m jaxgen.train --config jaxgen/configs/imagenet512_edm2_xs.py \
        --workdir runs/in512_edm2_xs --config.data.source=PATH --dry-run
    python -m jaxgen.phema --workdir runs/in512_edm2_xs --sigma-rel 0.135 \
        --out runs/in512_edm2_xs/posthoc
"""

import ml_collections

from jaxgen.configs import base


def get_config() -> ml_collections.ConfigDict:
    """The base with the ``edm2-img512-xs`` preset's fields."""
    c = base.get_config()
    c.data.source = "imagenet512-sd-latents.npz"  # yours: --config.data.source=PATH
    c.data.resolution = 64  # the latents' size (stored so: nothing is resized)
    c.data.batch_size = 2048
    c.model.name = "edm2-xs"  # 64x64x4 in, 1000 classes, 128 channels, dropout 0
    c.diffusion.process = "edm"
    c.diffusion.process_kwargs = ml_collections.ConfigDict(dict(sigma_min=0.002, sigma_max=80.0))
    c.diffusion.prediction = "x0"  # the network is EDM2's Precond: it returns the denoised latent
    # diffusion.precond: the base's "none"; the network preconditions itself (sigma_data 0.5)
    c.diffusion.time_sampler = "lognormal"
    c.diffusion.time_sampler_kwargs = ml_collections.ConfigDict(dict(p_mean=-0.4, p_std=1.0))
    c.diffusion.weighting = "edm"
    c.diffusion.loss = "edm2"
    c.optim.lr = 0.0120  # alpha_ref
    c.optim.schedule = "inverse_sqrt"
    c.optim.ref_steps = 70_000  # t_ref, in updates (ref_batches)
    c.optim.warmup_steps = 4883  # 10 Mi images at batch 2048 (4882.8 updates)
    c.optim.b2 = 0.99
    c.train.num_steps = 1_048_576  # 2048 Mi images at batch 2048
    c.train.ema_decays = ()
    c.train.phema_sigma_rels = (0.05, 0.1)
    c.train.phema_snapshot_every = 4096  # 8 Mi images
    c.train.compute_dtype = "bfloat16"
    c.eval.every_steps = 0  # no in-loop evaluation: nothing decodes latents yet
    c.eval.solver = "heun"
    c.eval.steps = 32
    c.eval.fid_samples = 50_000
    c.eval.fid_reference = "tfds:imagenet2012:validation"  # FID of decoded samples, once they are
    return c
