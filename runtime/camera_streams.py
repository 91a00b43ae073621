"""Cameras as independent streams: the one place that maps a camera (an MCAP topic, a ROS 2 frame_id) to a
stream of the segmenter.

A camera's memory advances only with its own frames, so cameras at different rates, with dropped frames or
their own time gaps (``max_gap``), stay exact. Today each camera gets its own ``StreamingSegmenter`` (one
stream each); with a segmenter whose ``push(frame, timestamp, stream=s)`` advances only stream ``s``, this
class keeps one segmenter and numbers the cameras instead: ``push`` is the only method that changes.
"""
from __future__ import annotations

from typing import Callable, Hashable

from tmanet.ros_images import field, image_fields, image_to_rgb, stamp_seconds
from tmanet.video_io import colorize


class CameraStreams:
    """``open_segmenter()`` makes a segmenter (opened once here, so a bad export fails before any input is
    read); ``push(camera, frame, timestamp)`` segments the camera's next frame."""

    def __init__(self, open_segmenter: Callable):
        self._open = open_segmenter
        self._spare = open_segmenter()
        self.palette = self._spare.palette
        self._segmenters: dict[Hashable, object] = {}

    @property
    def cameras(self) -> list:
        return list(self._segmenters)

    def push(self, camera: Hashable, frame, timestamp: float | None = None):
        seg = self._segmenters.get(camera)
        if seg is None:
            seg, self._spare = (self._spare or self._open()), None
            self._segmenters[camera] = seg
        return seg.push(frame, timestamp=timestamp)

    def describe(self) -> str:
        seg = self._spare or next(iter(self._segmenters.values()))
        return seg.backend.describe()

    def close(self):
        for seg in [self._spare, *self._segmenters.values()]:
            if seg is not None:
                seg.close()
        self._spare, self._segmenters = None, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def segment_image_message(streams, camera, msg, palette=None) -> tuple[dict, dict | None]:
    """Segment one image message as the next frame of ``camera`` in ``streams`` (a
    :class:`~tmanet.runtime.camera_streams.CameraStreams`), its header stamp the frame's timestamp.
    Returns the mask Image fields (mono8 class ids) and, when ``palette`` is given, the colour mask's (rgb8)."""
    header = field(msg, "header")
    result = streams.push(camera, image_to_rgb(msg), stamp_seconds(header))
    color = image_fields(colorize(result.mask, palette), header) if palette is not None else None
    return image_fields(result.mask, header), color
