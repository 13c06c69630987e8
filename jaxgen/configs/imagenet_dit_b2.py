"""Class-conditional ImageNet with DiT-B/2 (Peebles & Xie 2023), in pixel space at 64x64.

"Scalable Diffusion Models with Transformers" (Peebles & Xie, 2023), Sec. 4:
AdamW lr 1e-4 constant, no weight decay, no warmup, batch 256, EMA 0.9999,
horizontal flips, 1000-step linear VP schedule, eps prediction, class
dropout 0.1 for classifier-free guidance, 400k steps. The paper trains on
32x32x4 Stable-Diffusion VAE latents of 256x256 images (256 tokens for
patch 2) and reports FID-50K 43.5 for DiT-B/2 at 400k steps without
guidance. Here the model works on 64x64 pixels (1024 tokens for patch 2);
jaxgen's data pipeline reads uint8 images, so precomputed float latents
are not an input yet. The learned variance is trained as in the paper, by
IDDPM's L_simple + L_vlb; sample with a DDIM/DPM-Solver grid, or with the
paper's 250 ancestral steps that use it (``--solver ddpm_learned --steps 250``).
``tfds:imagenet2012`` needs the manual ImageNet download of TFDS.

    python -m jaxgen.train --config jaxgen/configs/imagenet_dit_b2.py --workdir runs/in64_dit_b2
    python -m jaxgen.sample --workdir runs/in64_dit_b2 --num 50000 --solver dpmpp_2m \
        --steps 50 --cfg-scale 1.5 --out runs/in64_dit_b2/samples.npz
"""

import ml_collections

from jaxgen.configs import base


def dit_config(model: str, num_steps: int) -> ml_collections.ConfigDict:
    """The base with DiT's ImageNet fields (Sec. 4) for the DiT size ``model``."""
    c = base.get_config()
    c.data.source = "tfds:imagenet2012:train"
    c.data.resolution = 64
    c.data.batch_size = 256
    c.data.flip = True
    c.model.name = model
    c.model.kwargs = ml_collections.ConfigDict(
        dict(num_classes=1000, class_dropout=0.1, learn_sigma=True)
    )
    c.diffusion.process = "vp"
    c.diffusion.process_kwargs = ml_collections.ConfigDict(dict(schedule="linear", num_steps=1000))
    c.diffusion.prediction = "eps"
    # The network embeds DiT's 0-based step index 1000 t - 1 (released weights need it).
    c.diffusion.time_scale = 1000.0
    c.diffusion.time_shift = -1.0
    c.diffusion.time_sampler = "discrete"
    c.diffusion.learned_variance = "vlb"  # IDDPM's hybrid loss (DiT's learn_sigma=True)
    c.optim.lr = 1e-4
    c.train.num_steps = num_steps
    c.train.ema_decays = (0.9999,)
    c.train.compute_dtype = "bfloat16"
    c.eval.solver = "dpmpp_2m"
    c.eval.steps = 50
    c.eval.fid_reference = "tfds:imagenet2012:validation"
    return c


def get_config() -> ml_collections.ConfigDict:
    """DiT-B/2 for the paper's 400k steps."""
    return dit_config("DiT-B/2", num_steps=400_000)
