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

import math
import os
from contextlib import nullcontext

from .errors import UserError
from .slots import ring_positions


class RingTooLarge(UserError, ValueError):
    """The memory ring would not fit in the memory it is allocated in: refused before allocating."""


def available_bytes(probe) -> int | None:
    """Memory free for new arrays where ``probe`` (an array of the ring's library and device) lives: the
    GPU's free memory for a CUDA tensor, else the host's MemAvailable (None where unknown)."""
    device = getattr(probe, "device", None)
    if type(probe).__module__.startswith("torch") and getattr(device, "type", "cpu") == "cuda":
        import torch
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_ring_fits(memory_frames: int, batch: int, key_shape, value_shape, zeros):
    """Refuse, in one line and before any allocation, a ring larger than the memory available for it."""
    probe = zeros((0,))
    itemsize = getattr(probe, "itemsize", None) or probe.element_size()
    per_row = (memory_frames + 1) * memory_frames * (math.prod(key_shape) + math.prod(value_shape)) * itemsize
    need, free = per_row * batch, available_bytes(probe)
    if free is not None and need > free:
        raise RingTooLarge(f"the memory ring needs {need / 2**30:.2f} GiB ({batch} rows x {memory_frames + 1} "
                           f"positions x {memory_frames} slots, keys {list(key_shape)}, values {list(value_shape)}) but "
                           f"only {free / 2**30:.2f} GiB is available: use fewer streams or a smaller export")


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
        check_ring_fits(memory_frames, batch, key_shape, value_shape, zeros)
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
        check_ring_fits(self.memory_frames, self.batch + rows, self.keys.shape[3:], self.values.shape[3:],
                        self._zeros)

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
