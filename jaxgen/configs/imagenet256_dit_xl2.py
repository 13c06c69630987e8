"""Class-conditional ImageNet 256x256 with DiT-XL/2 on SD-VAE latents (Peebles & Xie 2023).

The paper's latent recipe (Sec. 4 and ``train.py``): images center-cropped as
ADM does, encoded by Stable Diffusion's ``sd-vae-ft-ema`` to 32x32x4 latents
times 0.18215, a posterior sample per step, horizontal flips; DiT-XL/2 (675M,
1000 classes, class dropout 0.1, learned sigma trained by IDDPM's
L_simple + L_vlb), linear VP schedule of 1000 steps, eps prediction, AdamW lr
1e-4 constant, no weight decay, no warmup, batch 256, EMA 0.9999, 400K steps;
sampled with 250 ancestral steps on IDDPM's respaced grid with the learned
variance (``ddpm_learned``) and classifier-free guidance 1.5, which DiT's
``forward_with_cfg`` applies to the first three latent channels
(``--guide-channels 3`` below). The paper reports FID-50K 19.5 at 400K steps
without guidance and 2.27 at 7M steps with cfg 1.5.

    # weights: https://huggingface.co/stabilityai/sd-vae-ft-ema (a diffusers folder)
    python -m jaxgen.encode tfds:imagenet2012:train latents/in256_sd \
        --vae sd-vae-ft-ema --vae-model vae-sd --resolution 256
    python -m jaxgen.train --config jaxgen/configs/imagenet256_dit_xl2.py \
        --workdir runs/in256_dit_xl2
    python -m jaxgen.sample --workdir runs/in256_dit_xl2 --num 50000 --solver ddpm_learned \
        --steps 250 --cfg-scale 1.5 --guide-channels 3 --out runs/in256_dit_xl2/samples.npz
"""

import ml_collections

from jaxgen.configs import imagenet_dit_b2


def get_config() -> ml_collections.ConfigDict:
    """DiT-XL/2 on 256x256 SD-VAE latents for the paper's 400K steps, sharded 8 ways."""
    c = imagenet_dit_b2.dit_config("DiT-XL/2", num_steps=400_000)
    c.data.source = "latents/in256_sd"  # written by python -m jaxgen.encode (above)
    c.data.resolution = 256  # of the images; the model sees 32x32x4 latents
    c.latent.vae = "sd-vae-ft-ema"
    c.latent.vae_model = "vae-sd"
    c.latent.scale = 0.18215
    c.train.compute_dtype = "float32"  # the paper trains in float32 (TF32 matmuls)
    c.train.fsdp = 8
    c.eval.solver = "ddpm_learned"
    c.eval.steps = 250
    c.eval.cfg_scale = 1.5
    return c
