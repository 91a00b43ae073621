"""Unseen clips for the INT8 gates: synthetic driving clips at other seeds than any calibration used.

A gate measured on one clip says little (the issue that added this measured 98.1-99.5 % pixel agreement over
four clips of the same export), so every INT8 gate streams several clips and reports the worst
(:func:`~.compare.compare_clips`). The clips come from the trainer's renderer (``tmanet.training.synthetic``,
numpy only, imported lazily): ``calibration -> training`` is a plain arrow of the package graph (training
imports no calibration), cheaper than moving the renderer into the core.
"""
from __future__ import annotations

FIRST_GATE_SEED = 9101                    # no calibration, test or demo clip uses seeds from here on
GATE_CLIPS = 4                            # clips per gate: one clip says little, the worst of four says more
MAX_GATE_CLIPS = 32
GATE_FRAMES = 16
GATE_DEGRADATION = 0.5


def gate_seeds(count: int = GATE_CLIPS) -> tuple:
    """The seeds of the first ``count`` unseen clips (``0 <= count <= MAX_GATE_CLIPS``)."""
    if not 0 <= count <= MAX_GATE_CLIPS:
        raise ValueError(f"the number of unseen gate clips must lie in 0..{MAX_GATE_CLIPS}, got {count}")
    return tuple(FIRST_GATE_SEED + i for i in range(count))


GATE_SEEDS = gate_seeds()


def iter_unseen_clips(height: int, width: int, seeds=GATE_SEEDS, frames: int = GATE_FRAMES,
                      degradation: float = GATE_DEGRADATION):
    """``(name, clip)`` pairs, one degraded synthetic driving clip ``(frames, height, width, 3)`` uint8 per seed,
    each rendered when asked for: at 1024x2048 a clip is 100 MB and ~20 s of rendering, so a gate holds one."""
    from tmanet.training.synthetic import ClipSpec, make_street_clip
    for s in seeds:
        yield f"synthetic seed {s}", make_street_clip(ClipSpec(frames=frames, height=height, width=width,
                                                               degradation=degradation, seed=s))[0]


def unseen_clips(height: int, width: int, seeds=GATE_SEEDS, frames: int = GATE_FRAMES,
                 degradation: float = GATE_DEGRADATION) -> list[tuple[str, object]]:
    """:func:`iter_unseen_clips` as a list (to stream the same clips more than once)."""
    return list(iter_unseen_clips(height, width, seeds, frames, degradation))


__all__ = ["unseen_clips", "iter_unseen_clips", "gate_seeds", "GATE_CLIPS", "GATE_SEEDS", "MAX_GATE_CLIPS", "GATE_FRAMES",
           "GATE_DEGRADATION"]
