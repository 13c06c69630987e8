"""TFDS datasets read through their random-access (array_record) data sources.

Images come back encoded and are decoded by
:func:`jaxgen.data.images.decode_image`, by the same mode rule as files.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from jaxgen.data.images import decode_image
from jaxgen.data.sources.base import ImageSource, stack_images, thread_map
from jaxgen.errors import InputError


class TfdsSource(ImageSource):
    """A TFDS split read through its random-access (array_record) data source."""

    def __init__(
        self,
        builder,
        split: str,
        name: str,
        resolution: int | None = None,
        resize_method: str = "lanczos",
    ):
        """Opens ``split`` of a prepared ``tfds`` builder.

        Args:
          builder: a prepared ``tfds.core.DatasetBuilder`` in array_record format.
          split: TFDS split string, slicing allowed (``train[:10%]``).
          name: what to call the source in messages.
          resolution: center-crop/resize every image to this square size;
            required when the images differ in size.
          resize_method: a key of :data:`jaxgen.data.images.RESIZE_METHODS`.
        """
        import tensorflow_datasets as tfds

        self.name = name
        self._builder = builder
        self._split = split
        self._resolution = resolution
        self._method = resize_method
        features = builder.info.features
        image_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
        if not image_keys:
            raise InputError(f"{name}: the dataset has no image feature ({list(features)}).")
        self._image_key = "image" if "image" in image_keys else image_keys[0]
        label = features["label"] if "label" in features else None
        self._label_key = "label" if isinstance(label, tfds.features.ClassLabel) else None
        h, w, c = features[self._image_key].shape
        self._channels = 3 if c in (None, 3, 4) else 1  # alpha dropped, as for files
        self._shape = (
            (resolution, resolution, self._channels)
            if resolution is not None
            else (h, w, self._channels)
            if h is not None and w is not None
            else None
        )
        try:
            num_examples = builder.info.splits[split].num_examples
        except (ValueError, KeyError) as e:
            raise InputError(f"{name}: {e}; pick one of {list(builder.info.splits)}.") from e
        if num_examples == 0:
            raise InputError(f"{name}: the split is empty; pick another split or slice.")
        # Images come back encoded and are decoded in the thread pool by the same mode
        # rule as files (TFDS itself would decode them one by one in this thread).
        self._ds = builder.as_data_source(
            split=split, decoders={self._image_key: tfds.decode.SkipDecoding()}
        )
        self._labels: np.ndarray | None = None
        self._labels_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ds)

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        return self._shape

    @property
    def has_labels(self) -> bool:
        return self._label_key is not None

    @property
    def labels(self) -> np.ndarray | None:
        """Labels of the whole split, read once on first use (a pass over the records)."""
        if self._label_key is None:
            return None
        with self._labels_lock:
            if self._labels is None:
                records = _get_items(self._ds, range(len(self._ds)))
                self._labels = np.array([r[self._label_key] for r in records], dtype=np.int32)
        return self._labels

    def read_with_labels(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        indices = [int(i) for i in indices]
        records = _get_items(self._ds, indices)
        fix = "the prepared data is corrupt; prepare the dataset again"
        decode = lambda ir: decode_image(
            ir[1][self._image_key],
            self._channels,
            self._resolution,
            self._method,
            f"{self.name} example {ir[0]}",
            fix,
        )
        decoded = thread_map(decode, list(zip(indices, records, strict=True)))
        empty = self._shape or (0, 0, self._channels)
        images = stack_images(decoded, None, self._method, self.name, empty)
        if self._label_key is None:
            return images, None
        return images, np.array([r[self._label_key] for r in records], dtype=np.int32)


def _get_items(ds, indices: Sequence[int]) -> list:
    getitems = getattr(ds, "__getitems__", None)
    return list(getitems(list(indices))) if getitems else [ds[i] for i in indices]


def open_tfds(
    name: str,
    split: str,
    data_dir: str | None,
    download: bool,
    resolution: int | None,
    method: str,
) -> TfdsSource:
    """``split`` of TFDS dataset ``name``, prepared as array_record (downloaded if allowed)."""
    spec = f"tfds:{name}:{split}"
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise InputError(
            f"{spec}: tensorflow-datasets is not installed; pip install 'jaxgen[tfds]'."
        ) from e
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise InputError(
            f"{spec}: no TFDS dataset called {name!r} (see tfds.list_builders()); for local "
            "files give a folder, .npz, .npy or IDX path instead."
        ) from e
    where = builder.data_dir
    if not builder.is_prepared():
        if not download:
            raise InputError(
                f"{spec}: not prepared in {where}; allow downloading, or prepare it with "
                f"`tfds build {name} --file_format=array_record`, or set TFDS_DATA_DIR."
            )
        try:
            builder.download_and_prepare(file_format="array_record")
        except Exception as e:  # network, disk and builder failures alike end here
            raise InputError(
                f"{spec}: could not download and prepare into {where} ({type(e).__name__}: "
                f"{e}); without network, prepare it elsewhere and copy the data dir, or use "
                "local files."
            ) from e
    file_format = str(builder.info.file_format)
    if "array_record" not in file_format.lower():
        raise InputError(
            f"{spec}: prepared in {where} as {file_format}, which has no random access; "
            f"re-prepare with `tfds build {name} --file_format=array_record` (another data_dir "
            "or after deleting this copy)."
        )
    return TfdsSource(builder, split, f"{spec} (TFDS at {where})", resolution, method)
