"""ROS 2 ``.db3`` bags (a file or a rosbag2 folder) and ROS 1 ``.bag`` files as image-message sources, with the
pure-Python ``rosbags`` package (optional: ``pip install 'tmanet-trt[rosbags]'``).

Same three functions as :mod:`tmanet.io.mcap` (``image_topics``, ``count_messages``, ``read_images``);
:mod:`tmanet.io.driving_logs` picks the module for a path. Messages come in receive-time order; every
unreadable input is a :class:`~tmanet.io.driving_logs.LogReadError` with one line naming the file and where.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

from .driving_logs import LogReadError
from .ros_images import IMAGE_TYPES

log = logging.getLogger("tmanet")

# ROS 1 bags name the types without "/msg/"; rosbags reports them in the ROS 2 form.
_ROS1_NAMES = {t.replace("/msg/", "/"): t for t in IMAGE_TYPES}


@contextmanager
def _open(path):
    """An open ``AnyReader`` over ``path``; its errors (missing type definitions, corrupt files) as one line."""
    try:
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore
    except ImportError:
        raise LogReadError(f"{path}: reading .db3/.bag needs the rosbags package "
                         "(pip install 'tmanet-trt[rosbags]')") from None
    try:
        reader = AnyReader([path], default_typestore=get_typestore(Stores.LATEST))
        reader.open()
    except (MemoryError, RecursionError):
        raise
    except Exception as e:  # rosbags, sqlite and yaml errors alike: the file is not a readable bag
        raise LogReadError(f"{path}: not a readable ROS bag ({_first_line(e)})") from None
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


def read_images(path, topics, skip_damaged: bool = False, start: int | None = None, end: int | None = None
                ) -> Iterator[tuple[str, int, int, object]]:
    """``(topic, receive time, receive time, message)`` of the image messages on ``topics`` (nanoseconds);
    only those with ``start <= receive time < end`` where given.
    A damaged record is a :class:`LogReadError` naming the message and its log time; with ``skip_damaged`` a
    message that does not deserialize is skipped, and a damaged stretch that ends the reading (a ROS 1 chunk,
    an sqlite page) ends it, each with a warning counting the frames lost."""
    with _open(path) as reader:
        connections = _image_connections(reader, topics)
        if not connections:
            return
        expected = sum(c.msgcount for c in connections)
        messages = reader.messages(connections=connections, start=start, stop=end)
        read, last = 0, None
        while True:
            try:
                connection, timestamp, raw = next(messages)
            except StopIteration:
                return
            except (MemoryError, RecursionError):
                raise
            except Exception as e:  # a damaged chunk or page: the reader cannot go on past it
                where = f"after message {read} (log time {last} ns)" if read else "at its first message"
                if not skip_damaged:
                    raise LogReadError(f"{path}: damaged {where}: {_first_line(e)} (--allow-truncated keeps the "
                                       "messages read)") from None
                log.warning("%s: damaged %s (%s): stopped there, %d frames lost (--allow-truncated)", path,
                            where, _first_line(e), max(0, expected - read))
                return
            read += 1
            try:
                msg = reader.deserialize(raw, connection.msgtype)
            except (MemoryError, RecursionError):
                raise
            except Exception as e:  # a damaged record
                where = f"message {read - 1} on {connection.topic} (log time {timestamp} ns)"
                if not skip_damaged:
                    raise LogReadError(f"{path}: damaged {where}: {_first_line(e)} (--allow-truncated skips "
                                       "it)") from None
                log.warning("%s: skipped the damaged %s (%s): 1 frame lost (--allow-truncated)", path, where,
                            _first_line(e))
                continue
            last = timestamp
            yield connection.topic, timestamp, timestamp, msg


def log_times(path, topics) -> list[tuple[int, str]]:
    """``(receive time, topic)`` of every image message on ``topics`` in time order, without deserializing."""
    with _open(path) as reader:
        connections = _image_connections(reader, topics)
        try:
            return [(timestamp, connection.topic)
                    for connection, timestamp, _ in reader.messages(connections=connections)] if connections else []
        except Exception as e:  # a damaged record part-way
            raise LogReadError(f"{path}: not a readable ROS bag ({_first_line(e)})") from None
