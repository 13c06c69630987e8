"""Class-conditional ImageNet-512 with EDM2-M in 64x64x4 latents (Karras et al., CVPR 2024).

NVlabs/edm2's preset ``edm2-img512-m``: 497,807,781 parameters; the
settings every EDM2 preset shares are in :mod:`jaxgen.configs._edm2`. The
official post-hoc EMA reconstructions give FID 2.25 (sigma_rel
0.100) and 2.01 with guidance 1.20 by an unconditional XS (sigma_rel 0.030).

Data: ImageNet train center-cropped to 512x512 and encoded by the Stable
Diffusion VAE (sd-vae-ft-mse) into 64x64x4 latents as EDM2's
``StabilityVAEEncoder`` does (images in [0, 1]; per-channel mean 5.81, 3.25,
0.12, -2.15 and std 4.17, 4.62, 3.71, 3.28 normalised to std 0.5), with
labels: the ``python -m jaxgen.encode`` command in :mod:`jaxgen.configs._edm2`
writes ``latents/in512_sd_edm2`` (elsewhere: ``--config.data.source=PATH``).
Samples and the in-loop FID decode through the same VAE.

    python -m jaxgen.train --config jaxgen/configs/imagenet512_edm2_m.py \
        --workdir runs/in512_edm2_m --dry-run
    python -m jaxgen.phema --workdir runs/in512_edm2_m --sigma-rel 0.1 \
        --out runs/in512_edm2_m/posthoc
"""

import ml_collections

from jaxgen.configs import _edm2


def get_config() -> ml_collections.ConfigDict:
    """The base with the ``edm2-img512-m`` preset's fields."""
    return _edm2.get_config("img512-m")
