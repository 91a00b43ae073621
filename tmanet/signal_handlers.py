"""Signal handlers for the length of a block: one place for the install-and-restore that the CLI (SIGTERM as
Ctrl-C), ``tmanet run`` (stop at a frame boundary) and ``tmanet serve`` (stop the server) each need."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


@contextmanager
def signal_handlers(handler, signals=(signal.SIGINT, signal.SIGTERM)):
    """``handler`` for ``signals`` inside the block, the previous handlers after it. Off the main thread, where
    Python cannot install handlers, the block runs with the handlers as they are.

    Installing SIGINT explicitly also matters where it arrives ignored: a script's background job inherits SIGINT
    ignored, and Python then installs no Ctrl-C handler of its own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, before in previous.items():
            signal.signal(s, before)
