"""Cameras as independent streams: the one place that maps a camera (an MCAP topic, a ROS 2 frame_id) to a
stream of the segmenter.

A camera's memory advances only with its own frames, so cameras at different rates, with dropped frames or
their own time gaps (``max_gap``), stay exact: one ``StreamingSegmenter`` serves every camera, each camera
one of its streams (``push(frame, timestamp, stream=s)`` advances only stream ``s``); a new camera adds the
next stream (``add_stream``), so the memory held grows with the cameras seen.
"""
from __future__ import annotations

from typing import Callable, Hashable

from tmanet.errors import UserError
from tmanet.io import ros_images
from tmanet.io.ros_images import field, image_fields, image_to_rgb, stamp_seconds
from tmanet.io.threads import Prefetch
from tmanet.pictures import colorize

from .segmenter import FrameSizeError


class CameraStreams:
    """``open_segmenter()`` makes the segmenter (opened here, so a bad export fails before any input is
    read); ``push(camera, frame, timestamp)`` segments the camera's next frame."""

    def __init__(self, open_segmenter: Callable):
        self.segmenter = open_segmenter()
        self.palette = self.segmenter.palette
        self.class_names = self.segmenter.class_names
        self._streams: dict[Hashable, int] = {}  # camera -> stream id

    @property
    def cameras(self) -> list:
        return list(self._streams)

    def push(self, camera: Hashable, frame, timestamp: float | None = None):
        stream = self._streams.get(camera)
        if stream is None:
            stream = self._streams[camera] = self.segmenter.add_stream()
        return self.segmenter.push(frame, timestamp=timestamp, stream=stream)

    def describe(self) -> str:
        return self.segmenter.backend.describe()

    def close(self):
        self.segmenter.close()
        self._streams = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def segment_image_message(streams, camera, msg, palette=None, image=None) -> tuple[dict, dict | None]:
    """Segment one image message as the next frame of ``camera`` in ``streams`` (a
    :class:`~tmanet.runtime.camera_streams.CameraStreams`), its header stamp the frame's timestamp.
    ``image``: the message's pixels when already decoded (``image_to_rgb``, e.g. by a reading thread).
    Returns the mask Image fields (mono8 class ids) and, when ``palette`` is given, the colour mask's (rgb8)."""
    header = field(msg, "header")
    try:
        result = streams.push(camera, image_to_rgb(msg) if image is None else image, stamp_seconds(header))
    except FrameSizeError as e:  # a camera stream runs whole frames: slide mode is no way out here
        raise ValueError(e.describe(slide=False)) from None
    color = image_fields(colorize(result.mask, palette), header) if palette is not None else None
    return image_fields(result.mask, header), color


def segment_messages(streams, messages, source, palette=None):
    """Segment a log's image messages ``(topic, log_time, publish_time, message)`` in order, each topic a
    camera of ``streams``; yields ``(topic, log_time, publish_time, mask fields, colour fields or None)``.
    Parsing and pixel conversion run in a reading thread, ahead of the engines; a message that does not
    decode or segment is one :class:`UserError` naming ``source``, its topic and log time."""
    def decoded():
        for topic, log_time, publish_time, msg in messages:
            try:
                image = ros_images.image_to_rgb(msg)
            except ValueError as e:  # raised by the consumer, in order
                image = e
            yield topic, log_time, publish_time, msg, image

    with Prefetch(decoded()) as ahead:
        for topic, log_time, publish_time, msg, image in ahead:
            try:
                if isinstance(image, ValueError):
                    raise image
                mask, color = segment_image_message(streams, topic, msg, palette, image=image)
            except ValueError as e:
                raise UserError(f"{source}, {topic}, message at log time {log_time} ns: {e}") from None
            yield topic, log_time, publish_time, mask, color
