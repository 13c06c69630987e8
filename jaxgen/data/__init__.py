"""Input pipelines: image sources (folders, arrays, IDX, TFDS) and batch iterators."""

from jaxgen.data.images import RESIZE_METHODS, center_crop_resize, pad_images
from jaxgen.data.pipeline import TrainIterator, global_positions, to_model_space
from jaxgen.data.prefetch import Prefetcher
from jaxgen.data.sources import (
    FASHION_MNIST_DIR,
    ArraySource,
    FirstN,
    FolderSource,
    ImageSource,
    TfdsSource,
    check_images,
    open_source,
)

__all__ = [
    "FASHION_MNIST_DIR",
    "RESIZE_METHODS",
    "ArraySource",
    "FirstN",
    "FolderSource",
    "ImageSource",
    "Prefetcher",
    "TfdsSource",
    "TrainIterator",
    "center_crop_resize",
    "check_images",
    "global_positions",
    "open_source",
    "pad_images",
    "to_model_space",
]
