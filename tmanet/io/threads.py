"""Reading and writing beside segmentation: ``tmanet run`` decodes the next frames and encodes the previous
results in background threads while the engines work on the current frame (PyAV, Pillow and numpy release the
GIL in their heavy parts). Order is kept, queues are bounded, and an error in a thread is raised in the caller.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


# How often a consumer waiting on a blocked input checks for a stop request, and how long close() waits for a
# reading thread stuck in a read that never returns (a pipe that stopped delivering): it is then left behind.
POLL_S = 0.1
ABANDON_AFTER_S = 1.0


def call_in_thread(fn: Callable, *args):
    """``fn(*args)`` in a daemon thread: the caller waits in ``join``, which a signal handler can interrupt by
    raising (a read blocked inside C code, e.g. FFmpeg probing a pipe, cannot be), and the thread is then left
    behind. Returns ``fn``'s result or raises its exception."""
    result: list = []

    def target():
        try:
            result.append((True, fn(*args)))
        except BaseException as e:
            result.append((False, e))
    thread = threading.Thread(target=target, name="tmanet-open", daemon=True)
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


class Prefetch:
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead of the consumer. An exception
    raised by ``items`` is re-raised by the consumer's ``next()`` at the point where it happened. ``close()``
    (or leaving a ``with`` block) stops the thread early. With ``stop_requested`` (a callable), a consumer
    waiting for the next item ends the iteration within :data:`POLL_S` once it returns True, even while the
    input blocks."""

    def __init__(self, items: Iterable, depth: int = 4, stop_requested: Callable[[], bool] | None = None):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop_requested = stop_requested
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(items),), name="tmanet-read", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator):
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(_Failure(e))
            return
        self._put(_DONE)

    def __iter__(self):
        return self

    def _get(self):
        if self._stop_requested is None:
            return self._queue.get()
        while True:
            if self._stop_requested():
                raise StopIteration
            try:
                return self._queue.get(timeout=POLL_S)
            except queue.Empty:
                continue

    def __next__(self):
        item = self._get()
        if item is _DONE:
            self._queue.put(_DONE)  # stays exhausted
            raise StopIteration
        if isinstance(item, _Failure):
            self._queue.put(_DONE)  # the source is finished: a later next() ends instead of waiting forever
            raise item.error
        return item

    def close(self):
        self._stop.set()
        self._thread.join(ABANDON_AFTER_S)  # a thread stuck in a blocked read is a daemon: left behind

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Worker:
    """Call ``fn(item)`` for each submitted item, in submission order, in one background thread.
    ``submit`` blocks while ``depth`` items wait, and raises the worker's error if it has failed (the
    remaining items are then dropped). ``close()`` waits for the queued items and raises a pending error."""

    def __init__(self, fn: Callable, depth: int = 4):
        self._fn = fn
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None   # the first failure; later items are dropped
        self._reported = False
        self._thread = threading.Thread(target=self._run, name="tmanet-write", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self._error is None:
                try:
                    self._fn(item)
                except BaseException as e:
                    self._error = e

    def _raise(self):
        if self._error is not None and not self._reported:
            self._reported = True  # raised once: the caller's cleanup may call close() again
            raise self._error

    def submit(self, item):
        self._raise()
        self._queue.put(item)

    def close(self):
        if self._thread.is_alive():
            self._queue.put(_DONE)
            self._thread.join()
        self._raise()
