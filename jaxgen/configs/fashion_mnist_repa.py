"""REPA offline at toy size: a small DiT on Fashion-MNIST aligned to Inception features.

REPA (Yu et al., ICLR 2025) with the one pretrained encoder available offline:
the FID Inception's ``mixed_6/conv`` (192 channels on a 17 x 17 grid, resized
to the DiT's 7 x 7 tokens), after block 2 of a 6-block DiT of width 192,
patch 4 (28 x 28 -> 49 tokens), projector width 512, lambda 0.5. The rest is
the flow-matching toy recipe (``fashion_mnist``: linear interpolant, velocity,
logit-normal times, lr 1e-3). For the comparison without REPA, add
``--config.train.repa.encoder=''``. The encoder runs Inception at 299 x 299 on
every training image, which dominates a CPU step; Inception weights come with
``bash scripts/install.sh``.

    python -m jaxgen.train --config jaxgen/configs/fashion_mnist_repa.py \
        --workdir runs/fm_repa --config.train.minutes=30
"""

import ml_collections

from jaxgen.configs import _fashion_mnist


def get_config() -> ml_collections.ConfigDict:
    """A 6-block DiT on Fashion-MNIST with REPA on Inception's mixed_6/conv."""
    c = _fashion_mnist.get_config()
    c.model.name = "DiT-S/4"
    c.model.kwargs = ml_collections.ConfigDict(dict(
        hidden=192, depth=6, num_heads=3, num_classes=10, class_dropout=0.1, learn_sigma=False,
    ))
    c.train.repa.encoder = "inception"
    c.train.repa.depth = 2
    c.train.repa["lambda"] = 0.5
    c.train.repa.projector_dim = 512
    return c
