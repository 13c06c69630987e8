"""One read of an evaluation input through every feature network the metrics need.

torch-fidelity's rule: each image is read and decoded once, and each batch
goes through every network (the TF-FID Inception, DINOv2, CLIP, the
clean-resize Inception) before the next is read. Outputs named in ``stats``
are folded into float64 Gaussian statistics on the fly (labelled with their
protocol, :data:`jaxgen.metrics.stats.INCEPTION_POOL3` and the like); those
named in ``keep`` are kept as rows, gathered across processes in image order.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from tqdm import tqdm

from jaxgen.data import ImageSource
from jaxgen.errors import InputError
from jaxgen.metrics.eval_parts import gather_rows, iterate_eval, largest_part
from jaxgen.metrics.features import FeatureExtractor
from jaxgen.metrics.stats import GaussianStats, MomentAccumulator


def feature_pass(
    source: ImageSource,
    extractors: Sequence[FeatureExtractor],
    stats: Mapping[str, str],
    keep: set[str] | frozenset[str] = frozenset(),
    *,
    name: str = "images",
    progress: bool = True,
) -> dict[str, np.ndarray | GaussianStats]:
    """Every image of ``source`` once, through each of ``extractors`` in turn.

    Args:
      source: the images (this process reads its part, :func:`iterate_eval`).
      extractors: feature extractors of one batch size (they step together).
      stats: ``{output: protocol}``: outputs whose statistics are accumulated.
      keep: outputs whose rows are returned.
      name: the input's name for messages and the progress bar.
      progress: show a progress bar on stderr.

    Returns:
      ``{f"{output}_stats": GaussianStats}`` for each of ``stats`` and
      ``{output: [N, D] array}`` for each of ``keep``.

    Raises:
      InputError: extractors of different batch sizes, or an output no extractor makes.
    """
    batches = {ext.local_batch for ext in extractors}
    if len(batches) != 1:
        raise InputError(f"feature_pass: extractors of different batch sizes {sorted(batches)}.")
    (local_batch,) = batches
    n, pid, count = len(source), jax.process_index(), jax.process_count()
    acc = {k: MomentAccumulator() for k in stats}
    # Sorted: every process must gather the outputs in one order, and a set's order
    # follows the process's string-hash seed (two processes gathered pool3 against logits).
    rows: dict[str, list[np.ndarray]] = {k: [] for k in sorted(keep)}
    bar = tqdm(total=n, desc=f"features {name}", unit="img", file=sys.stderr,
               disable=not progress or pid != 0, leave=False)
    steps = 0
    for images in iterate_eval(source, local_batch, process_index=pid, process_count=count):
        made: dict[str, np.ndarray] = {}
        for ext in extractors:
            made.update(ext(images, name))
        missing = sorted((set(acc) | set(rows)) - set(made))
        if missing:
            raise InputError(f"feature_pass: no extractor makes {missing} (made {sorted(made)}).")
        for k, a in acc.items():
            a.update(made[k])
        for k, parts in rows.items():
            parts.append(made[k])
        steps += 1
        bar.update(len(images) * count)
    # Every process must run the jitted steps equally often; parts differ by <= 1 image.
    for _ in range(-(-largest_part(n, count) // local_batch) - steps):
        for ext in extractors:
            ext.idle_step(source.image_shape)
    bar.close()
    out: dict[str, np.ndarray | GaussianStats] = {}
    for k, a in acc.items():
        a.allreduce()
        out[f"{k}_stats"] = a.finalize(stats[k])
    out.update({k: gather_rows(np.concatenate(v), n) for k, v in rows.items()})
    return out
