"""The CIFAR-10 fields the DDPM, EDM and flow recipes share; not a recipe itself.

Data, backbone and FID reference of ``cifar10_ddpm.py``, ``cifar10_edm.py``
and ``cifar10_flow.py``, on :mod:`jaxgen.configs.base`; each recipe adds its
objective, optimizer and sampler.
"""

import ml_collections

from jaxgen.configs import base


def get_config() -> ml_collections.ConfigDict:
    """The base with CIFAR-10's data, the 35.7M DDPM U-Net and the FID reference."""
    c = base.get_config()
    c.data.source = "tfds:cifar10:train"
    c.data.resolution = 32  # CIFAR-10 is 32x32 already; declared so shapes are known offline
    c.data.flip = True
    c.model.name = "unet-ddpm-cifar10"
    c.diffusion.time_scale = 1000.0  # the network embeds the step index k = 1000 t
    c.eval.fid_reference = "tfds:cifar10:train"
    return c
