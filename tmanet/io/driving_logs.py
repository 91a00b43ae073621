"""Driving logs (ROS bags) as sources of camera images: MCAP through :mod:`tmanet.io.mcap`, ROS 2
``.db3`` (a file or a rosbag2 folder) and ROS 1 ``.bag`` through :mod:`tmanet.io.rosbag`. Both offer
``image_topics(path)``, ``count_messages(path, topics)``, ``read_images(path, topics, skip_damaged, start,
end)`` and ``log_times(path, topics)``.

A path may name one topic after a colon, ``drive.mcap:/cam/front/image_raw`` (ROS topics start with '/').
"""
from __future__ import annotations

from pathlib import Path

from tmanet.errors import UserError

LOG_SUFFIXES = (".mcap", ".db3", ".bag")


class LogReadError(UserError, ValueError):
    """A driving log cannot be read (not a log, cut short, a damaged chunk or record): one line naming the file
    and where in it (byte offset, log time). A ValueError too, as the readers' callers catch those."""


def split_topic(source) -> tuple[Path, str | None]:
    """``drive.mcap:/cam/front`` -> (``drive.mcap``, ``/cam/front``) when ``drive.mcap`` exists; else
    (the path, None)."""
    text = str(source)
    head, sep, tail = text.partition(":/")
    if sep and Path(head).exists():
        return Path(head), "/" + tail
    return Path(text), None


def is_log(path) -> bool:
    path = Path(path)
    return path.suffix.lower() in LOG_SUFFIXES or (path.is_dir() and (path / "metadata.yaml").is_file())


def log_reader(path):
    """The module that reads the log at ``path``."""
    if Path(path).suffix.lower() == ".mcap":
        from . import mcap
        return mcap
    from . import rosbag
    return rosbag


def frame_topic(path, topic: str | None) -> str:
    """The image topic to read frames from: ``topic`` if the log has it, else its only image topic."""
    found = log_reader(path).image_topics(path)
    listing = ", ".join(found) or "none"
    if topic is not None and topic not in found:
        raise LogReadError(f"{path} has no image topic {topic}; its image topics: {listing}")
    if topic is None and len(found) != 1:
        raise LogReadError(f"{path} has {len(found) or 'no'} image topics ({listing}): name one as "
                           f"{path}:/TOPIC")
    return topic or next(iter(found))
