"""Class-conditional ImageNet-64 with EDM2-S in pixels (Karras et al., CVPR 2024).

NVlabs/edm2's preset ``edm2-img64-s`` (192 channels, dropout 0, 1024 Mi
images, alpha_ref 0.0100, t_ref 35k updates, ln sigma ~ N(-0.8, 1.6^2)); the
settings every EDM2 preset shares are in :mod:`jaxgen.configs._edm2`. The
official post-hoc EMA reconstruction (sigma_rel 0.075) gives FID 1.58.

Data: ImageNet train from TFDS (``tfds:imagenet2012:train``, which needs the
manual download TFDS describes), center-cropped and resized to 64x64.

    python -m jaxgen.train --config jaxgen/configs/imagenet64_edm2_s.py \
        --workdir runs/in64_edm2_s --dry-run
"""

import ml_collections

from jaxgen.configs import _edm2


def get_config() -> ml_collections.ConfigDict:
    """The base with the ``edm2-img64-s`` preset's fields."""
    return _edm2.get_config("img64-s")
