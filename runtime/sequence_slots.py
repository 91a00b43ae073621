"""Which segmenter stream serves which Triton sequence (correlation id): the server-side bookkeeping.

Triton's sequence batcher admits at most ``max_candidate_sequences`` (= the number of streams) live
sequences and sends their START/END flags, but it does not tell a Python model when it drops a sequence for
being idle. So a START that finds every stream taken reclaims the least recently used one: Triton admitted
the new sequence, hence one of the held ones has ended or timed out on its side.
"""
from __future__ import annotations

from collections import OrderedDict


class UnknownSequence(KeyError):
    """A request without START for a sequence that holds no stream."""


class SequenceSlots:
    def __init__(self, streams: int):
        self.streams = streams
        self._held: OrderedDict = OrderedDict()  # sequence id -> stream, least recently used first

    def stream_for(self, sequence_id, start: bool) -> tuple[int, bool]:
        """(stream, restart): the stream of this request's sequence, and whether the segmenter must restart
        it (a START, or a stream taken over from another sequence)."""
        if sequence_id in self._held:
            self._held.move_to_end(sequence_id)
            return self._held[sequence_id], start
        if not start:
            raise UnknownSequence(f"sequence {sequence_id!r} is not running (ended, timed out or never "
                                  "started): send its first request with sequence_start")
        free = sorted(set(range(self.streams)) - set(self._held.values()))
        stream = free[0] if free else self._held.popitem(last=False)[1]
        self._held[sequence_id] = stream
        return stream, True

    def release(self, sequence_id):
        """The sequence ended: its stream is free."""
        return self._held.pop(sequence_id, None)

    def __len__(self):
        return len(self._held)
