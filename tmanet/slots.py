"""Which frame each memory slot reads: the rule of the streaming design, as pure functions.

TMANet semantics, so part of the core: the runtime's ring, the export check and the trainer all follow it."""
from __future__ import annotations


def memory_frame_indices(t: int, start: int, memory_frames: int) -> list[int]:
    """Frames read by memory slots 0..T-1 for frame ``t`` of a stream that began at frame ``start``.

    Slot i holds frame t-T+i (oldest first; slot T-1 is the frame just before t). During warm-up an index
    before the stream's first frame clamps to that first frame (the official author's advice: copy it).
    """
    if t < start:
        raise ValueError(f"frame {t} precedes the stream start {start}")
    return [max(t - memory_frames + i, start) for i in range(memory_frames)]


def ring_positions(t: int, memory_frames: int) -> tuple[int, list[int]]:
    """Ring of T+1 positions, frame k at position k mod (T+1): returns (position frame t is written to,
    positions slots 0..T-1 read). The extra position lets frame t be written before the head reads t-T..t-1."""
    size = memory_frames + 1
    return t % size, [(t - memory_frames + i) % size for i in range(memory_frames)]
