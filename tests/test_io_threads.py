"""Background reading and writing of ``tmanet run``: order, bounded read-ahead, errors raised where they belong."""
from __future__ import annotations

import itertools
import threading
import time

import pytest

from tmanet.io.threads import Prefetch, Worker


def test_prefetch_yields_every_item_in_order_then_stays_exhausted():
    items = list(range(50))
    with Prefetch(iter(items), depth=3) as p:
        assert list(p) == items
        assert list(p) == []


def test_prefetch_raises_the_source_error_after_the_items_before_it():
    def source():
        yield from (0, 1, 2)
        raise OSError("corrupt packet at frame 3")

    got = []
    with Prefetch(source(), depth=2) as p:
        with pytest.raises(OSError, match="corrupt packet at frame 3"):
            for item in p:
                got.append(item)
    assert got == [0, 1, 2]
    assert list(p) == []  # finished after the error: no wait for items that will never come


def test_prefetch_reads_at_most_depth_ahead_and_close_stops_an_endless_source():
    produced = []

    def source():
        for i in itertools.count():
            produced.append(i)
            yield i

    p = Prefetch(source(), depth=3)
    assert next(p) == 0
    time.sleep(0.3)  # ample time to run ahead if it were unbounded
    # one handed out, 3 queued, one produced and waiting for room
    assert len(produced) <= 1 + 3 + 1
    p.close()
    assert not p._thread.is_alive()


def test_worker_runs_items_in_order_in_another_thread():
    seen, threads = [], set()

    def fn(item):
        time.sleep(0.001 * (item % 3))
        seen.append(item)
        threads.add(threading.get_ident())

    w = Worker(fn, depth=2)
    for i in range(20):
        w.submit(i)
    w.close()
    assert seen == list(range(20))
    assert threads and threading.get_ident() not in threads
    w.close()  # closing twice is harmless


def test_worker_error_is_raised_once_and_later_items_are_dropped():
    seen = []

    def fn(item):
        if item == 2:
            raise OSError("disk full")
        seen.append(item)

    w = Worker(fn, depth=1)
    with pytest.raises(OSError, match="disk full"):
        for i in range(100):
            w.submit(i)
            time.sleep(0.005)
    w.close()  # already reported: cleanup after the error does not raise it again
    assert seen == [0, 1]


def test_worker_error_on_the_last_items_is_raised_by_close():
    w = Worker(lambda item: 1 / 0)
    w.submit(0)
    with pytest.raises(ZeroDivisionError):
        w.close()


def test_a_stop_request_ends_a_wait_on_a_blocked_input():
    """A source stuck in a read that never returns (a pipe that stopped sending): the consumer's wait ends once a
    stop is requested, and close() leaves the stuck thread behind instead of waiting for it."""
    release, asked = threading.Event(), threading.Event()

    def stuck():
        yield 0
        asked.set()
        release.wait()  # the read that never returns
        yield 1

    stop = [False]
    p = Prefetch(stuck(), stop_requested=lambda: stop[0])
    assert next(p) == 0
    asked.wait()
    stop[0] = True
    assert list(p) == []  # ended by the request, not by the source
    p.close()
    assert p._thread.is_alive()  # left behind, still stuck
    release.set()


def test_call_in_thread_returns_or_raises_what_the_call_does():
    from tmanet.io.threads import call_in_thread
    assert call_in_thread(sum, [1, 2, 3]) == 6
    with pytest.raises(ValueError, match="bad input"):
        call_in_thread(lambda: (_ for _ in ()).throw(ValueError("bad input")))
