"""A background thread that keeps a host iterator a few items ahead of its consumer."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

_DONE = object()


class Prefetcher(Iterator):
    """Iterate ``make()`` in a daemon thread, up to ``size`` items ahead.

    An exception raised by the producer is re-raised by ``next``; ``close()``
    (also called when the iterator is garbage-collected) stops the thread.
    """

    def __init__(self, make: Callable[[], Iterator], size: int = 2):
        """Starts the thread.

        Args:
          make: returns the iterator to run in the thread.
          size: how many items may wait, produced but not consumed.
        """
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._finished = False
        # The thread holds the queue and event, never `self`, so that dropping
        # the iterator lets __del__ stop it.
        self._thread = threading.Thread(
            target=_produce,
            args=(make, self._queue, self._stop),
            daemon=True,
            name="jaxgen-prefetch",
        )
        self._thread.start()

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        item, error = self._queue.get()
        if error is not None or item is _DONE:
            self._finished = True
            self.close()
            if error is not None:
                raise error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the producer thread (it exits at its next item)."""
        self._stop.set()

    def __del__(self) -> None:
        self._stop.set()


def _produce(make: Callable[[], Iterator], q: queue.Queue, stop: threading.Event) -> None:
    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in make():
            if not put((item, None)):
                return
        put((_DONE, None))
    except BaseException as e:  # handed to the consumer, which re-raises it
        put((_DONE, e))
