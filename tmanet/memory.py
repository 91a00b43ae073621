"""A stream's temporal memory: the ring buffer that holds it and the one stepping core (the slot rule they
follow is :mod:`tmanet.slots`).

These are model semantics, so they live in the core: the model's own ``TMANet.stream``, the exporter's
check, calibration and every runtime backend step frames through :class:`MemoryStepper` and nothing else.

Ring layout ``[position (T+1), slot (T), row (B), C, h, w]``: position p holds one frame's encodings under
all T slot weights. Memory slot i of a row's frame t reads ``ring[pos(t-T+i), i, row]``, so for rows at the
same clock the head's inputs are contiguous ``[B, C, h, w]`` blocks (views) that rotate each frame: nothing
is shifted or copied when time advances, the one copy is the new frame's encodings going in.

Each row keeps its own clock, so rows (streams) advance independently: a step names the rows it moves. Reads
are views where the stepped rows are a contiguous run at one clock (the lockstep case) and gathered copies
where their clocks differ. Warm-up: a row's first frame after a (re)start is written to every position,
which is exactly the clamp rule of :func:`~tmanet.slots.memory_frame_indices`; the restarted row also takes
the clock of the other rows of that step, so lockstep streams stay views after one of them restarts.
"""
from __future__ import annotations

from contextlib import nullcontext

from .slots import ring_positions


def zeros_like_backend(like, shape):
    """A zero array of ``shape`` from the same library, dtype and device as ``like``."""
    if type(like).__module__.startswith("torch"):
        import torch
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    import numpy as np
    return np.zeros(shape, dtype=like.dtype)


class MemoryRing:
    def __init__(self, memory_frames: int, batch: int, key_shape, value_shape, zeros):
        """``batch`` rows (streams); ``zeros(shape)`` allocates in the backend's library (and device)."""
        self.memory_frames = T = memory_frames
        self.batch = batch
        self.keys = zeros((T + 1, T, batch, *key_shape))
        self.values = zeros((T + 1, T, batch, *value_shape))
        self._zeros = zeros
        self.clock = [0] * batch         # per row: the ring phase its next frame is written at
        self.fresh = [True] * batch      # row has no frame since its (re)start

    @classmethod
    def like(cls, memory_key, memory_value):
        """A ring for frame-encoder outputs shaped like these (``[B, T, C, h, w]``), same library/device."""
        b, T = memory_key.shape[:2]
        return cls(T, b, memory_key.shape[2:], memory_value.shape[2:],
                   lambda shape: zeros_like_backend(memory_key, shape))

    def _rows(self, rows) -> list[int]:
        if rows is None:
            return list(range(self.batch))
        rows = [int(r) for r in rows]
        for r in rows:
            if not 0 <= r < self.batch:
                raise IndexError(f"row {r} out of range: this ring holds {self.batch} streams")
        return rows

    def reset(self, row: int | None = None):
        """Start a new stream at ``row`` (or all rows): its next frame fills the whole ring."""
        for r in self._rows(None if row is None else [row]):
            self.fresh[r] = True

    def _span(self, rows):
        """(first row, clock) when ``rows`` is a run r0, r0+1, ... at one clock (reads are views), else None."""
        r0, t = rows[0], self.clock[rows[0]]
        if rows == list(range(r0, r0 + len(rows))) and all(self.clock[r] == t for r in rows):
            return r0, t
        return None

    def write(self, memory_key, memory_value, rows=None):
        """Store each row's new frame (``[n, T, C, h, w]``, every slot's weights; row k of the input goes
        to ring row ``rows[k]``, all rows when None). Only the first len(rows) input rows are read."""
        rows = self._rows(rows)
        steady = [self.clock[r] for r in rows if not self.fresh[r]]
        for r in rows:
            if self.fresh[r] and steady:
                self.clock[r] = steady[0]  # a restarted row may take any phase: join the others'
        span = self._span(rows)
        if span is not None:
            pos, _ = ring_positions(span[1], self.memory_frames)
            r0, n = span[0], len(rows)
            self.keys[pos, :, r0:r0 + n] = memory_key[:n].swapaxes(0, 1)
            self.values[pos, :, r0:r0 + n] = memory_value[:n].swapaxes(0, 1)
        else:
            for k, r in enumerate(rows):
                pos, _ = ring_positions(self.clock[r], self.memory_frames)
                self.keys[pos, :, r] = memory_key[k]
                self.values[pos, :, r] = memory_value[k]
        for k, r in enumerate(rows):
            if self.fresh[r]:  # warm-up: every memory slot reads the stream's first frame
                self.keys[:, :, r] = memory_key[k]
                self.values[:, :, r] = memory_value[k]
                self.fresh[r] = False

    def _read(self, store, rows) -> list:
        rows = self._rows(rows)
        span = self._span(rows)
        if span is not None:
            r0, n = span[0], len(rows)
            _, read = ring_positions(span[1], self.memory_frames)
            return [store[p, i, r0:r0 + n] for i, p in enumerate(read)]
        reads = [ring_positions(self.clock[r], self.memory_frames)[1] for r in rows]
        return [store[[read[i] for read in reads], i, rows] for i in range(self.memory_frames)]  # gathered

    def slot_keys(self, rows=None) -> list:
        """Slots 0..T-1 (oldest first) of the frame last written to ``rows``: ``[n, Ck, h, w]`` each."""
        return self._read(self.keys, rows)

    def slot_values(self, rows=None) -> list:
        return self._read(self.values, rows)

    def grow(self, rows: int):
        """``rows`` more rows at the end, fresh; the existing rows keep their memory and clocks (the arrays
        are reallocated: views read before are stale)."""
        def grown(store):
            out = self._zeros((*store.shape[:2], self.batch + rows, *store.shape[3:]))
            out[:, :, :self.batch] = store
            return out
        self.keys, self.values = grown(self.keys), grown(self.values)
        self.batch += rows
        self.clock += [0] * rows
        self.fresh += [True] * rows

    def advance(self, rows=None):
        """The rows' frame is done: their next write goes to the following position."""
        for r in self._rows(rows):
            self.clock[r] += 1


class MemoryStepper:
    """The stepping core, the one loop every streaming path runs: frame engine -> write the ring -> head
    reads the slots -> advance.

    ``encode(frames) -> (query_key, query_value, memory_key, memory_value)`` and ``head(query_key,
    query_value, slot_keys, slot_values) -> anything`` are the caller's engines (torch modules, ONNX
    Runtime sessions, TensorRT engines, or wrappers that record or compare). The ring is made on the first
    step, shaped like the encoder's output, unless one is given."""

    def __init__(self, encode, head, ring: MemoryRing | None = None):
        self.encode, self.head, self.ring = encode, head, ring

    def step(self, frames, rows=None, stage=None):
        """One frame of each of ``rows`` (ring rows, all when None; ``frames`` row k is ``rows[k]``'s, extra
        rows are padding whose results the caller drops). ``stage(name)``: an optional timing context."""
        stage = stage or (lambda name: nullcontext())
        with stage("frame_engine"):
            qk, qv, mk, mv = self.encode(frames)
        with stage("ring"):
            if self.ring is None:
                self.ring = MemoryRing.like(mk, mv)
            self.ring.write(mk, mv, rows)
            keys, values = self.ring.slot_keys(rows), self.ring.slot_values(rows)
        with stage("head"):
            out = self.head(qk, qv, keys, values)
        self.ring.advance(rows)
        return out
