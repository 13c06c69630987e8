"""The official EDM2 training presets (Karras et al., CVPR 2024), shared by the EDM2 recipes.

"Analyzing and Improving the Training Dynamics of Diffusion Models", config G,
with the numbers of NVlabs/edm2 ``train_edm2.py`` ``config_presets`` (commit
4bf8162f): per preset the training length, width (``model_channels``; the
network's other settings are :data:`jaxgen.models.edm2.EDM2_PRESETS`'),
``alpha_ref``, ``t_ref`` (``decay``, in updates), dropout and the log-normal
``P_mean``, ``P_std``. Common to all: batch 2048, Adam (0.9, 0.99, eps 1e-8)
without weight decay or clipping at ``alpha_ref / sqrt(max(t / t_ref, 1))``,
ramped up over the first 10 Mi images (``rampup_Mimg=10``: 4882.8 updates,
4883 here), the uncertainty-weighted loss (Eq. 21), forced weight
normalisation, power-function EMAs with sigma_rel 0.05 and 0.10 snapshotted
every 8 Mi images (4096 updates), mixed precision (fp16 there, bfloat16 here),
sampling with Heun's method in 32 steps (63 NFE).

The ImageNet-512 presets train on latents of ``sd-vae-ft-mse`` exactly as
``training/encoders.py``'s ``StabilityVAEEncoder`` makes them: the VAE sees
images in [0, 1] (``x / 255``; ``latent.unit_range``), and each channel is
normalised from the assumed raw statistics :data:`RAW_MEAN`, :data:`RAW_STD` to
mean 0 and std 0.5: ``z = x * s + b``, ``s = 0.5 / raw_std`` (float32, as
there), ``b = -raw_mean * s``, i.e. ``latent.scale = s``, ``latent.shift =
raw_mean``. Encode ImageNet once (center-cropped as ADM; weights:
https://huggingface.co/stabilityai/sd-vae-ft-mse, a diffusers folder)::

    python -m jaxgen.encode tfds:imagenet2012:train latents/in512_sd_edm2 \\
        --vae sd-vae-ft-mse --vae-model vae-sd --resolution 512 --unit-range \\
        --scale 0.119904071,0.108225107,0.134770885,0.152439028 \\
        --shift 5.81,3.25,0.12,-2.15 --dtype float16

(``--dtype float16`` halves the 1.28M x 2 x 64x64x8 moments to 168 GB.)
Samples and the in-loop FID decode through the same VAE.
"""

import ml_collections
import numpy as np

from jaxgen.configs import base

BATCH = 2048
RAMPUP_UPDATES = 4883  # 10 Mi images at batch 2048 (4882.8 updates)
SNAPSHOT_UPDATES = 4096  # 8 Mi images
RAW_MEAN = (5.81, 3.25, 0.12, -2.15)  # StabilityVAEEncoder's assumed raw latent mean
RAW_STD = (4.17, 4.62, 3.71, 3.28)  # and standard deviation, per channel
FINAL_STD = 0.5  # the latents' standard deviation after normalisation (final_mean 0)
LATENT_SCALE = tuple(float(s) for s in np.float32(FINAL_STD) / np.float32(RAW_STD))
"""``latent.scale`` of the ImageNet-512 presets: EDM2's float32 ``final_std / raw_std``."""

PRESETS: dict[str, dict] = {
    # name: (training length in Mi images, alpha_ref, t_ref in updates, P_mean, P_std)
    "img512-xs": dict(mimg=2048, lr=0.0120, decay=70_000, p_mean=-0.4, p_std=1.0),
    "img512-s": dict(mimg=2048, lr=0.0100, decay=70_000, p_mean=-0.4, p_std=1.0),
    "img512-m": dict(mimg=2048, lr=0.0090, decay=70_000, p_mean=-0.4, p_std=1.0),
    "img512-l": dict(mimg=1792, lr=0.0080, decay=70_000, p_mean=-0.4, p_std=1.0),
    "img512-xl": dict(mimg=1280, lr=0.0070, decay=70_000, p_mean=-0.4, p_std=1.0),
    "img512-xxl": dict(mimg=896, lr=0.0065, decay=70_000, p_mean=-0.4, p_std=1.0),
    "img64-xs": dict(mimg=1024, lr=0.0120, decay=35_000, p_mean=-0.8, p_std=1.6),
    "img64-s": dict(mimg=1024, lr=0.0100, decay=35_000, p_mean=-0.8, p_std=1.6),
    "img64-m": dict(mimg=2048, lr=0.0090, decay=35_000, p_mean=-0.8, p_std=1.6),
    "img64-l": dict(mimg=1024, lr=0.0080, decay=35_000, p_mean=-0.8, p_std=1.6),
    "img64-xl": dict(mimg=640, lr=0.0070, decay=35_000, p_mean=-0.8, p_std=1.6),
}
"""``train_edm2.py``'s presets: width and dropout come with the model preset of the same size."""


def get_config(preset: str) -> ml_collections.ConfigDict:
    """The base with the fields of ``edm2-<preset>`` (e.g. ``"img512-xs"``, ``"img64-s"``)."""
    p = PRESETS[preset]
    latent = preset.startswith("img512-")
    c = base.get_config()
    if latent:  # 64x64x4 latents of the SD VAE, normalised per channel (module docstring)
        c.data.source = "latents/in512_sd_edm2"  # written by python -m jaxgen.encode (above)
        c.data.resolution = 512  # of the images; the model sees 64x64x4 latents
        c.latent.vae = "sd-vae-ft-mse"
        c.latent.vae_model = "vae-sd"
        c.latent.unit_range = True
        c.latent.scale = LATENT_SCALE
        c.latent.shift = RAW_MEAN
        c.model.name = "edm2-" + preset.removeprefix("img512-")
    else:  # ImageNet 64x64 pixels, center-cropped as ADM's dataset_tool does
        c.data.source = "tfds:imagenet2012:train"
        c.data.resolution = 64
        c.model.name = "edm2-" + preset
    c.data.batch_size = BATCH
    c.diffusion.process = "edm"
    c.diffusion.process_kwargs = ml_collections.ConfigDict(dict(sigma_min=0.002, sigma_max=80.0))
    c.diffusion.prediction = "x0"  # the network is EDM2's Precond: it returns the denoised image
    # diffusion.precond: the base's "none"; the network preconditions itself (sigma_data 0.5)
    c.diffusion.time_sampler = "lognormal"
    c.diffusion.time_sampler_kwargs = ml_collections.ConfigDict(
        dict(p_mean=p["p_mean"], p_std=p["p_std"]))
    c.diffusion.weighting = "edm"
    c.diffusion.loss = "edm2"
    c.optim.lr = p["lr"]  # alpha_ref
    c.optim.schedule = "inverse_sqrt"
    c.optim.ref_steps = p["decay"]  # t_ref, in updates (ref_batches)
    c.optim.warmup_steps = RAMPUP_UPDATES
    c.optim.b2 = 0.99
    c.train.num_steps = (p["mimg"] << 20) // BATCH
    c.train.ema_decays = ()
    c.train.phema_sigma_rels = (0.05, 0.1)
    c.train.phema_snapshot_every = SNAPSHOT_UPDATES
    c.train.compute_dtype = "bfloat16"
    c.eval.solver = "heun"
    c.eval.steps = 32
    c.eval.fid_samples = 50_000
    c.eval.fid_reference = "tfds:imagenet2012:validation"  # at data.resolution (512: decoded)
    return c
