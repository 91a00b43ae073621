"""ROS 2 ``.db3`` bags (a file or a rosbag2 folder) and ROS 1 ``.bag`` files as image-message sources, with the
pure-Python ``rosbags`` package (optional: ``pip install 'tmanet-trt[rosbags]'``).

Same three functions as :mod:`tmanet.runtime.mcap_io` (``image_topics``, ``count_messages``, ``read_images``);
:mod:`tmanet.runtime.driving_logs` picks the module for a path. Messages come in receive-time order; every
unreadable input is a ValueError with one line.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from .ros_images import IMAGE_TYPES

# ROS 1 bags name the types without "/msg/"; rosbags reports them in the ROS 2 form.
_ROS1_NAMES = {t.replace("/msg/", "/"): t for t in IMAGE_TYPES}


@contextmanager
def _open(path):
    """An open ``AnyReader`` over ``path``; its errors (missing type definitions, corrupt files) as one line."""
    try:
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore
    except ImportError:
        raise ValueError(f"{path}: reading .db3/.bag needs the rosbags package "
                         "(pip install 'tmanet-trt[rosbags]')") from None
    try:
        reader = AnyReader([path], default_typestore=get_typestore(Stores.LATEST))
        reader.open()
    except Exception as e:  # rosbags, sqlite and yaml errors alike: the file is not a readable bag
        raise ValueError(f"{path}: not a readable ROS bag ({_first_line(e)})") from None
    try:
        yield reader
    finally:
        reader.close()


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _image_connections(reader, topics=None) -> list:
    return [c for c in reader.connections if _ROS1_NAMES.get(c.msgtype, c.msgtype) in IMAGE_TYPES
            and (topics is None or c.topic in topics)]


def image_topics(path) -> dict[str, str]:
    """``{topic: message type}`` of the bag's image topics, sorted by topic."""
    with _open(path) as reader:
        found = {c.topic: _ROS1_NAMES.get(c.msgtype, c.msgtype) for c in _image_connections(reader)}
    return dict(sorted(found.items()))


def count_messages(path, topics) -> int | None:
    with _open(path) as reader:
        return sum(c.msgcount for c in _image_connections(reader, topics))


def read_images(path, topics, start: int | None = None, end: int | None = None
                ) -> Iterator[tuple[str, int, int, object]]:
    """``(topic, receive time, receive time, message)`` of the image messages on ``topics`` (nanoseconds);
    only those with ``start <= receive time < end`` where given."""
    with _open(path) as reader:
        connections = _image_connections(reader, topics)
        if not connections:
            return
        messages = reader.messages(connections=connections, start=start, stop=end)
        while True:
            try:
                connection, timestamp, raw = next(messages)
                msg = reader.deserialize(raw, connection.msgtype)
            except StopIteration:
                return
            except Exception as e:  # a corrupt record part-way
                raise ValueError(f"{path}: not a readable ROS bag ({_first_line(e)})") from None
            yield connection.topic, timestamp, timestamp, msg


def log_times(path, topics) -> list[tuple[int, str]]:
    """``(receive time, topic)`` of every image message on ``topics`` in time order, without deserializing."""
    with _open(path) as reader:
        connections = _image_connections(reader, topics)
        try:
            return [(timestamp, connection.topic)
                    for connection, timestamp, _ in reader.messages(connections=connections)] if connections else []
        except Exception as e:  # a corrupt record part-way
            raise ValueError(f"{path}: not a readable ROS bag ({_first_line(e)})") from None
