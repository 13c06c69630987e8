"""Image sources: random access to uint8 NHWC images from folders, arrays, IDX and TFDS.

One module per concern: :mod:`.base` (the :class:`ImageSource` interface,
checks, stacking, the decode thread pool), :mod:`.arrays` (in-memory arrays,
``.npz``, ``.npy``), :mod:`.folders` (image folders), :mod:`.idx` (MNIST's
IDX files), :mod:`.tfds` (TFDS array_record datasets), :mod:`.fashion_mnist`
(Debian's copy, else TFDS), :mod:`.latents` (VAE latent datasets),
:mod:`.first_n` (a prefix of another source) and
:mod:`.specs` (:func:`open_source`, from a spec string to a source; its
docstring lists the forms).
"""

from jaxgen.data.sources.arrays import ArraySource
from jaxgen.data.sources.base import ImageSource, check_images
from jaxgen.data.sources.fashion_mnist import FASHION_MNIST_DIR
from jaxgen.data.sources.first_n import FirstN
from jaxgen.data.sources.folders import FolderSource
from jaxgen.data.sources.latents import LatentSource
from jaxgen.data.sources.specs import open_source
from jaxgen.data.sources.tfds import TfdsSource

__all__ = [
    "FASHION_MNIST_DIR",
    "ArraySource",
    "FirstN",
    "FolderSource",
    "ImageSource",
    "LatentSource",
    "TfdsSource",
    "check_images",
    "open_source",
]
