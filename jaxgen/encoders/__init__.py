"""Frozen image encoders in Flax shared by metrics and training: DINOv2 and CLIP.

``load_dinov2()`` / ``load_clip()`` return ``(module, variables, identity)``
from released weight files; the modules take inputs prepared by their
modules' ``preprocess_*`` functions (exact ports of the reference pipelines):
``jaxgen.encoders.dinov2`` and ``jaxgen.encoders.clip``.
"""

from jaxgen.encoders.clip import CLIPVision
from jaxgen.encoders.dinov2 import DINOv2
from jaxgen.encoders.weights import load_clip, load_dinov2

__all__ = ["CLIPVision", "DINOv2", "load_clip", "load_dinov2"]
