"""The offline default: a small class-conditional U-Net, flow matching, Fashion-MNIST at 28x28.

Runs on a laptop CPU without downloads (Debian's Fashion-MNIST copy, or
TFDS). Rectified-flow / flow-matching training (Liu et al. 2023; Lipman et
al. 2023) with velocity prediction and logit-normal time sampling (Esser et
al. 2024, Eq. 19) learns fastest per CPU-second among the recipes here; the
U-Net is the DDPM/ADM design (Ho et al. 2020; Dhariwal & Nichol 2021) shrunk
to 0.72M parameters (136 MFLOP per forward pass), native 28x28 (28 -> 14 -> 7, attention at 7x7).

    python -m jaxgen.train --config jaxgen/configs/fashion_mnist.py --workdir runs/fm \
        --config.train.minutes=10

Expected on a 2-core CPU: garments recognisable in the 8x8 grid
(``runs/fm/samples/``) after ~10 minutes of training; FID figures in
BENCHMARKS.md. Built on :mod:`jaxgen.configs._fashion_mnist` (the toy recipes' shared fields).
"""

import ml_collections

from jaxgen.configs import _fashion_mnist


def get_config() -> ml_collections.ConfigDict:
    """The toy recipes' fields (:mod:`jaxgen.configs._fashion_mnist`) with a small U-Net."""
    c = _fashion_mnist.get_config()
    c.model.name = "unet-small"
    c.model.kwargs = _fashion_mnist.unet_kwargs()
    return c
