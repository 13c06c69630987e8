"""Class-conditional ImageNet 256x256 with SiT-XL/2 on SD-VAE latents (Ma et al. 2024).

SiT's recipe: DiT-XL/2's backbone, data and optimiser (``imagenet256_dit_xl2``:
SD-VAE latents times 0.18215, flips, AdamW lr 1e-4 constant, batch 256, EMA
0.9999, 400K steps) with the linear interpolant, velocity prediction and
uniform training times, in SiT's time direction (noise at 0, data at 1:
``diffusion.reverse_time``), so the released ``SiT-XL-2-256x256.pt`` samples
with this recipe too. Sampling: SiT's SDE (Euler-Maruyama, diffusion
``w = sigma``, 250 steps, mean last step) with cfg 1.5; for its ODE use
``--solver heun`` or ``rk4`` (SiT uses dopri5). The paper reports FID-50K
17.2 at 400K steps (SDE, no guidance) and 2.06 at 7M steps with cfg 1.5.

    python -m jaxgen.train --config jaxgen/configs/imagenet256_sit_xl2.py \
        --workdir runs/in256_sit_xl2
    python -m jaxgen.sample --weights SiT-XL-2-256x256.pt --model DiT-XL/2 \
        --recipe imagenet256_sit_xl2 --vae sd-vae-ft-ema --num 50000 \
        --solver euler_maruyama --steps 250 --cfg-scale 1.5 --out samples.npz
"""

import ml_collections

from jaxgen.configs import imagenet256_dit_xl2


def get_config() -> ml_collections.ConfigDict:
    """DiT-XL/2's latent recipe with SiT's linear interpolant and velocity prediction."""
    c = imagenet256_dit_xl2.get_config()
    c.diffusion.process = "flow"
    c.diffusion.process_kwargs = ml_collections.ConfigDict(dict(path="linear"))
    c.diffusion.prediction = "velocity"
    c.diffusion.time_scale = 1.0  # SiT embeds t in [0, 1]
    c.diffusion.time_shift = 0.0
    c.diffusion.reverse_time = True
    c.diffusion.time_sampler = "uniform"
    c.diffusion.learned_variance = ""  # SiT's loss leaves its variance channels untrained
    c.eval.solver = "euler_maruyama"
    c.eval.steps = 250
    return c
