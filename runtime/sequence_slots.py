"""Which segmenter stream serves which Triton sequence (correlation id): the server-side bookkeeping, and the
server's admission control.

Why the model, not Triton, decides who gets in: Triton's sequence batcher queues a START that finds every
candidate slot taken in its backlog, but its reaper measures a sequence's idleness from the time its last
request *arrived*. A sequence that waited in the backlog longer than ``max_sequence_idle_microseconds`` is
therefore force-ended right after it gets a slot: its START is answered, its next frame refused ("must specify
the START flag"), a sequence accepted and then dropped. So the repository gives Triton more candidate slots than
the model has streams (no backlog in practice) and this class refuses a START when every stream is held:
``ServerFull``, an error at START that the client can retry.

Triton does not tell a Python model when it drops an idle sequence, so a held stream counts as free once its
sequence has been idle longer than Triton's timeout (plus a margin for the reaper's own lag: measured from our
last sight of the sequence, which is never earlier than Triton's arrival time, so we release it after Triton).
"""
from __future__ import annotations

import time
from collections import OrderedDict

# Triton's reaper wakes on its own schedule (a low-priority thread): allow it this long beyond the timeout.
REAPER_MARGIN_S = 1.0


class UnknownSequence(KeyError):
    """A request without START for a sequence that holds no stream."""


class ServerFull(RuntimeError):
    """A START while every stream is held by a live sequence."""


class SequenceSlots:
    def __init__(self, streams: int, idle_timeout_s: float, clock=time.monotonic):
        self.streams, self.idle_timeout_s, self.clock = streams, idle_timeout_s, clock
        self._held: OrderedDict = OrderedDict()  # sequence id -> (stream, last seen), least recently seen first

    def stream_for(self, sequence_id, start: bool) -> tuple[int, bool]:
        """(stream, restart): the stream of this request's sequence, and whether the segmenter must restart
        it (a START, or a stream taken over from a timed-out sequence)."""
        now = self.clock()
        if sequence_id in self._held:
            stream = self._held.pop(sequence_id)[0]
            self._held[sequence_id] = (stream, now)
            return stream, start
        if not start:
            raise UnknownSequence(f"sequence {sequence_id!r} is not running (ended, timed out or never "
                                  "started): send its first request with sequence_start")
        free = sorted(set(range(self.streams)) - {s for s, _ in self._held.values()})
        if free:
            stream = free[0]
        else:
            oldest_id, (stream, seen) = next(iter(self._held.items()))
            idle = now - seen
            if idle <= self.idle_timeout_s + REAPER_MARGIN_S:
                raise ServerFull(f"server full: all {self.streams} sequences of this model instance are "
                                 f"running; retry the START of sequence {sequence_id!r} later (a stream frees "
                                 f"when a sequence ends, or {self.idle_timeout_s + REAPER_MARGIN_S - idle:.1f} s "
                                 "from now if the least recently active one stays idle)")
            del self._held[oldest_id]  # Triton has timed it out: its stream is ours
        self._held[sequence_id] = (stream, now)
        return stream, True

    def release(self, sequence_id):
        """The sequence ended: its stream is free."""
        held = self._held.pop(sequence_id, None)
        return None if held is None else held[0]

    def __len__(self):
        return len(self._held)
