"""Latent diffusion end to end on the CPU: Fashion-MNIST through a small KL autoencoder.

The chain of Rombach et al. (2022) at toy size, offline: a ``vae-small``
autoencoder (28x28x1 -> 7x7x4 latents) trained here, the training set encoded
with its mirror images, a class-conditional DiT with patch 1 (49 tokens,
width 128, depth 6) trained by flow matching on scaled posterior samples,
samples decoded through the autoencoder for the grid and the FID (against
``fashion_mnist:test``, as the pixel default ``fashion_mnist``).

    python -m jaxgen.train_autoencoder fashion_mnist:train runs/fml/vae.safetensors \
        --vae-model vae-small --minutes 12 --eval-source fashion_mnist:test
    # prints the latent scale 1/std (0.1943 here); give yours to both commands below
    python -m jaxgen.encode fashion_mnist:train runs/fml/latents --vae runs/fml/vae.safetensors \
        --vae-model vae-small --resolution 28 --scale 0.1943
    python -m jaxgen.train --config jaxgen/configs/fashion_mnist_latent.py --workdir runs/fml/run \
        --config.latent.scale=0.1943 --config.train.minutes=10

Expected on the 2-core CPU (BENCHMARKS.md, "Latent diffusion on the CPU"):
reconstruction PSNR ~19.6 dB after 12 minutes, encoding ~5 minutes,
blurry but recognisable garments in the grid after 8 minutes of training.
"""

import ml_collections

from jaxgen.configs import _fashion_mnist


def get_config() -> ml_collections.ConfigDict:
    """A latent DiT on Fashion-MNIST latents of the small autoencoder."""
    c = _fashion_mnist.get_config()
    c.data.source = "runs/fml/latents"  # python -m jaxgen.encode (above)
    c.data.resolution = 28  # of the images; the model sees 7x7x4 latents
    c.data.batch_size = 64
    c.latent.vae = "runs/fml/vae.safetensors"
    c.latent.vae_model = "vae-small"
    c.latent.scale = 0.1943  # 1 / std of posterior samples, as train_autoencoder measured
    c.model.name = "DiT-S/2"
    c.model.kwargs = ml_collections.ConfigDict(dict(
        patch=1, hidden=128, depth=6, num_heads=4, num_classes=10, class_dropout=0.1,
        learn_sigma=False,
    ))
    c.optim.lr = 3e-4
    c.eval.at_minutes = (10.0, 30.0)
    return c
