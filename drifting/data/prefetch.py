"""Compute the next items of a sequence in a background thread while the caller works on the current one.

    with prefetch(lambda step: load(step), range(start, steps), depth=2) as items:
        for step in range(start, steps):
            batch = next(items)

The trainer's real-sample draws are a pure function of the step (their generators are seeded by (seed, step)), so
they can be made ahead of time without changing a single value: the step's GPU work overlaps the next steps'
decoding (streamed image folders) or memory-mapped reads (latent caches). A thread suffices: the work it overlaps
releases the GIL (Pillow decoding, file reads, CUDA kernels running asynchronously).

An exception in `fn` is raised by `next` at the item that failed, in the caller's thread; leaving the `with` block
stops the thread after at most the item it is computing.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, Iterable, Iterator, TypeVar

__all__ = ["prefetch"]

T = TypeVar("T")
_DONE = object()


class prefetch(Generic[T]):
    """Iterate over fn(k) for k in `keys`, computing up to `depth` items ahead in one background thread.

    depth=0 computes each item when it is asked for (no thread), for debugging and for the exactness tests.
    """

    def __init__(self, fn: Callable[[int], T], keys: Iterable[int], *, depth: int = 2):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth: expected an integer >= 0, got {depth!r}")
        self._fn, self._keys, self._depth = fn, iter(keys), depth
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if depth:
            self._items: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._work, name="drifting-prefetch", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        for key in self._keys:
            if self._stop.is_set():
                return
            try:
                item = (self._fn(key), None)
            except BaseException as e:  # handed to the caller, who raises it at this item
                item = (None, e)
            self._put(item)
            if item[1] is not None:
                return
        self._put((_DONE, None))

    def _put(self, item) -> None:
        # A bounded wait, so that a caller who stops reading (close) never leaves this thread blocked on a full queue.
        while not self._stop.is_set():
            try:
                self._items.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._thread is None:
            return self._fn(next(self._keys))
        item, error = self._items.get()
        if error is not None:
            raise error
        if item is _DONE:
            self._items.put((_DONE, None))  # later calls stop too
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the background thread (it finishes the item it is computing, if any)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "prefetch[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
