"""tmanet.runtime: the streaming runtime (``StreamingSegmenter``), its backends, ``tmanet run`` / ``bench``, cameras
as streams (ROS bags, the ROS 2 node) and Triton serving. The frame sources and sinks are in :mod:`tmanet.io`.

Kept light: ``StreamingSegmenter`` and friends are imported on first access, and the backends import
onnxruntime / torch only when one is created.
"""
from __future__ import annotations

from tmanet.lazy_exports import lazy_getattr

_LAZY = {
    "StreamingSegmenter": "segmenter",
    "SegmentResult": "segmenter",
    "Backend": "backends",
    "BACKENDS": "backends",
    "register_backend": "backends",
    "get_backend": "backends",
    "BackendUnavailable": "backends",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
