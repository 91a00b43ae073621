"""The memory ring buffer shared by every backend, generic over the array library (numpy, torch CPU/CUDA).

Layout ``[position (T+1), slot (T), stream (B), C, h, w]``: position p holds one frame's encodings under
all T slot weights. Memory slot i of frame t reads ``ring[pos(t-T+i), i]``, a contiguous ``[B, C, h, w]``
block, so the head's inputs are addresses into the ring that rotate each frame: nothing is shifted or copied
when time advances. The only copy per frame is the new frame's encodings going in once.

Warm-up: when a stream (batch index) starts, its first frame is written to every position, so reads of
frames before the start return the first frame, which is exactly the clamp rule of
:func:`~tmanet.slots.memory_frame_indices`. All streams of a batch rotate together.
"""
from __future__ import annotations

from tmanet.slots import ring_positions


def zeros_like_backend(like, shape):
    """A zero array of ``shape`` from the same library, dtype and device as ``like``."""
    if type(like).__module__.startswith("torch"):
        import torch
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    import numpy as np
    return np.zeros(shape, dtype=like.dtype)


class MemoryRing:
    def __init__(self, sequence_num: int, batch: int, key_shape, value_shape, zeros):
        """``zeros(shape)`` allocates in the backend's library (and on its device)."""
        self.sequence_num = T = sequence_num
        self.batch = batch
        self.keys = zeros((T + 1, T, batch, *key_shape))
        self.values = zeros((T + 1, T, batch, *value_shape))
        self.t = 0                       # global frame counter; all streams rotate together
        self.fresh = [True] * batch      # stream has no frame since its (re)start

    @classmethod
    def like(cls, memory_key, memory_value):
        """A ring for frame-encoder outputs shaped like these (``[B, T, C, h, w]``), same library/device."""
        b, T = memory_key.shape[:2]
        return cls(T, b, memory_key.shape[2:], memory_value.shape[2:],
                   lambda shape: zeros_like_backend(memory_key, shape))

    def reset(self, stream: int | None = None):
        """Start a new stream at batch index ``stream`` (or all): its next frame fills the whole ring."""
        for b in range(self.batch) if stream is None else [self._check_stream(stream)]:
            self.fresh[b] = True

    def _check_stream(self, stream):
        if not 0 <= stream < self.batch:
            raise IndexError(f"stream {stream} out of range: this ring holds {self.batch} streams")
        return stream

    def write(self, memory_key, memory_value):
        """Store frame t's encodings (``[B, T, C, h, w]``, every slot's weights) for all streams."""
        pos, _ = ring_positions(self.t, self.sequence_num)
        self.keys[pos] = memory_key.swapaxes(0, 1)
        self.values[pos] = memory_value.swapaxes(0, 1)
        for b, fresh in enumerate(self.fresh):
            if fresh:  # warm-up: every memory slot reads the stream's first frame
                self.keys[:, :, b] = memory_key[b]
                self.values[:, :, b] = memory_value[b]
                self.fresh[b] = False

    def slot_keys(self) -> list:
        """Views ``[B, Ck, h, w]`` for memory slots 0..T-1 of the frame last written (oldest first)."""
        _, read = ring_positions(self.t, self.sequence_num)
        return [self.keys[p, i] for i, p in enumerate(read)]

    def slot_values(self) -> list:
        _, read = ring_positions(self.t, self.sequence_num)
        return [self.values[p, i] for i, p in enumerate(read)]

    def advance(self):
        """Frame t is done: the next write goes to the following position."""
        self.t += 1
