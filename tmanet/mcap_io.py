"""MCAP (the ROS 2 bag format) in and out, with the ``mcap`` and ``mcap-ros2-support`` packages (no ROS install).

Reading: :func:`image_topics` lists a file's ``sensor_msgs`` image topics, :func:`read_images` yields their
messages decoded, in log-time order. Writing: :class:`McapImageWriter` writes ``sensor_msgs/msg/Image``
messages under a temporary name in the destination folder and renames it into place only when complete.
Every unreadable input (not an MCAP, truncated, a corrupt chunk) is a ValueError with one line.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .ros_images import IMAGE, IMAGE_TYPES, MSGDEFS
from .safe_files import atomic_file


@contextmanager
def _unreadable(path):
    """The mcap reader's errors (bad magic, truncation, bad CRCs, undecodable records) as one-line ValueErrors."""
    from mcap.exceptions import McapError
    try:
        yield
    except (McapError, EOFError, OSError, ValueError, KeyError, IndexError, AssertionError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a complete, readable MCAP file ({detail})") from None


MAGIC = b"\x89MCAP0\r\n"  # at both ends of a complete MCAP file


def _reader(f, path, **options):
    """A seeking reader over the open file ``f``, once both magics are in place (a recording cut short lacks
    the closing one)."""
    from mcap.reader import SeekingReader
    head = f.read(len(MAGIC))
    f.seek(-min(len(MAGIC), f.seek(0, os.SEEK_END)), os.SEEK_END)
    tail = f.read(len(MAGIC))
    f.seek(0)
    if head != MAGIC:
        raise ValueError(f"{path}: not an MCAP file (it does not start with the MCAP magic)")
    if tail != MAGIC:
        raise ValueError(f"{path}: the MCAP file ends without its footer (truncated, or still being "
                         "recorded?): `mcap recover` rebuilds what it holds")
    with _unreadable(path):
        return SeekingReader(f, **options)


def _summary(reader, path):
    with _unreadable(path):
        summary = reader.get_summary()
    if summary is None:
        raise ValueError(f"{path}: the MCAP file has no summary section (no index of its topics): "
                         "`mcap recover` rewrites it with one")
    return summary


def image_topics(path) -> dict[str, str]:
    """``{topic: message type}`` of the file's image topics (Image and CompressedImage), sorted by topic."""
    with open(path, "rb") as f:
        summary = _summary(_reader(f, path), path)
    topics = {}
    for channel in summary.channels.values():
        schema = summary.schemas.get(channel.schema_id)
        if schema is not None and schema.name in IMAGE_TYPES:
            topics[channel.topic] = schema.name
    return dict(sorted(topics.items()))


def count_messages(path, topics) -> int | None:
    """Messages on ``topics`` according to the file's statistics (None when it has none)."""
    with open(path, "rb") as f:
        summary = _summary(_reader(f, path), path)
    if summary.statistics is None:
        return None
    counts = summary.statistics.channel_message_counts
    return sum(counts.get(cid, 0) for cid, ch in summary.channels.items() if ch.topic in topics)


def read_images(path, topics, start: int | None = None, end: int | None = None
                ) -> Iterator[tuple[str, int, int, object]]:
    """``(topic, log_time, publish_time, message)`` of the image messages on ``topics``, in log-time order
    (nanoseconds), with CRCs checked; only those with ``start <= log_time < end`` where given (the file's
    index skips the chunks outside)."""
    from mcap_ros2.decoder import DecoderFactory
    with open(path, "rb") as f:
        reader = _reader(f, path, validate_crcs=True, decoder_factories=[DecoderFactory()])
        with _unreadable(path):
            for _schema, channel, message, decoded in reader.iter_decoded_messages(
                    topics=list(topics), start_time=start, end_time=end):
                yield channel.topic, message.log_time, message.publish_time, decoded


def log_times(path, topics) -> list[tuple[int, str]]:
    """``(log_time, topic)`` of every message on ``topics`` in log-time order, without decoding any."""
    with open(path, "rb") as f:
        reader = _reader(f, path, validate_crcs=True)
        with _unreadable(path):
            return [(message.log_time, channel.topic)
                    for _schema, channel, message in reader.iter_messages(topics=list(topics))]


@contextmanager
def _binary_output(path):
    """An open binary file that appears at ``path`` only when the block completes (:func:`atomic_file`)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        yield f


class McapImageWriter:
    """``sensor_msgs/msg/Image`` messages into a ROS 2 MCAP (profile ros2, CDR, zstd chunks, with a summary:
    ``ros2 bag info/play`` read it). Use as a context manager: the file appears at ``path`` only on success."""

    def __init__(self, path):
        self.path = Path(path)
        self.count = 0
        self._output = None

    def __enter__(self):
        from mcap_ros2.writer import Writer
        self._output = _binary_output(self.path)
        self._writer = Writer(self._output.__enter__())
        self._schema = self._writer.register_msgdef(IMAGE, MSGDEFS[IMAGE])
        return self

    def write(self, topic: str, fields: dict, log_time: int, publish_time: int | None = None):
        self._writer.write_message(topic, self._schema, fields, log_time=log_time,
                                   publish_time=log_time if publish_time is None else publish_time,
                                   sequence=self.count)
        self.count += 1

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self._writer.finish()
        return self._output.__exit__(exc_type, exc, tb)
