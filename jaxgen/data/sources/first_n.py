"""The first ``n`` images of another source."""

from __future__ import annotations

import numpy as np

from jaxgen.data.sources.base import ImageSource
from jaxgen.errors import InputError


class FirstN(ImageSource):
    """The first ``n`` images of another source (``--num-real`` / ``--num-fake``)."""

    def __init__(self, source: ImageSource, n: int) -> None:
        if not 1 <= n <= len(source):
            raise InputError(
                f"{source.name}: asked for the first {n} images but it holds {len(source)}; "
                f"give a count between 1 and {len(source)}."
            )
        self.source, self.n = source, n
        self.name = f"{source.name} (first {n})"

    def __len__(self) -> int:
        return self.n

    @property
    def labels(self) -> np.ndarray | None:
        labels = self.source.labels
        return None if labels is None else labels[: self.n]

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        return self.source.image_shape

    def read_with_labels(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.n):
            raise IndexError(f"index out of range for {self.name}")
        return self.source.read_with_labels(indices)
