"""SiT-XL/2 + REPA on ImageNet 256x256 SD-VAE latents (Yu et al., ICLR 2025).

"Representation Alignment for Generation: Training Diffusion Transformers Is
Easier Than You Think", sihyun-yu/REPA: SiT-XL/2's recipe (``imagenet256_sit_xl2``:
linear interpolant, velocity, uniform times, SD-VAE latents, AdamW lr 1e-4,
batch 256, EMA 0.9999) plus REPA: a 3-layer SiLU MLP projector (width 2048)
on the tokens after block 8, aligned by negative cosine similarity with
DINOv2 ViT-B/14's patch tokens of the clean image (REPA's preprocessing:
224 x 224, 16 x 16 tokens, the model's grid), weight lambda 0.5; gradient
clipping at 1 as the reference's ``max_grad_norm``. The paper reports FID-50K
7.9 at 400K steps (SDE, 250 steps, no guidance; SiT-XL/2 alone: 17.2) and
1.80 at 4M steps with cfg 1.8 on [0, 0.7] (1.42 with it).

Data: as in the reference (its ``dataset.py`` gives each example's raw image
and its VAE moments), the latent dataset (``data.source`` below) keeps the
images the VAE saw (``--keep-images``): the model trains on the latents while
DINOv2 runs, frozen, on the images (REPA's preprocessing, on the fly), the
mirror image with the mirror view's latents. A latent dataset without its
images is refused with a one-line message naming the fix, so this recipe reads
its own folder (one with images serves the DiT/SiT recipes too). ImageNet's
1.28M images take 252 GB beside 84 GB of float32 moments (42 GB with
``--dtype float16``). DINOv2 weights: torch hub's
``dinov2_vitb14_pretrain.pth`` in ``$JAXGEN_CACHE`` or
``--config.train.repa.weights=FILE``.

    python -m jaxgen.encode tfds:imagenet2012:train latents/in256_sd_images \
        --vae sd-vae-ft-ema --vae-model vae-sd --resolution 256 --keep-images
    python -m jaxgen.train --config jaxgen/configs/imagenet256_sit_xl2_repa.py \
        --workdir runs/in256_sit_xl2_repa
"""

import ml_collections

from jaxgen.configs import imagenet256_sit_xl2


def get_config() -> ml_collections.ConfigDict:
    """SiT-XL/2's latent recipe with REPA (DINOv2-B, depth 8, lambda 0.5, projector 2048)."""
    c = imagenet256_sit_xl2.get_config()
    c.model.kwargs.learn_sigma = False  # REPA's SiT regresses the velocity alone
    c.optim.grad_clip = 1.0
    c.data.source = "latents/in256_sd_images"  # with its images (encode --keep-images, above)
    c.train.repa.encoder = "dinov2-vitb14"
    c.train.repa.depth = 8
    c.train.repa["lambda"] = 0.5
    c.train.repa.projector_dim = 2048
    return c
