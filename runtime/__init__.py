"""tmanet.runtime: the streaming runtime (``StreamingSegmenter``), its backends, video I/O and benchmarks.

Kept light: ``StreamingSegmenter`` and friends are imported on first access, and the backends import
onnxruntime / torch only when one is created.
"""
from __future__ import annotations

_LAZY = {
    "StreamingSegmenter": "segmenter",
    "SegmentResult": "segmenter",
    "Backend": "backends",
    "BACKENDS": "backends",
    "register_backend": "backends",
    "get_backend": "backends",
    "BackendUnavailable": "backends",
    "MemoryRing": "ring_buffer",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
