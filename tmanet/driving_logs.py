"""Driving logs (ROS bags) as sources of camera images: MCAP through :mod:`tmanet.runtime.mcap_io`, ROS 2
``.db3`` (a file or a rosbag2 folder) and ROS 1 ``.bag`` through :mod:`tmanet.runtime.rosbag_io`. Both offer
``image_topics(path)``, ``count_messages(path, topics)``, ``read_images(path, topics, start, end)`` and
``log_times(path, topics)``.

A path may name one topic after a colon, ``drive.mcap:/cam/front/image_raw`` (ROS topics start with '/').
"""
from __future__ import annotations

from pathlib import Path

LOG_SUFFIXES = (".mcap", ".db3", ".bag")


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
        from . import mcap_io
        return mcap_io
    from . import rosbag_io
    return rosbag_io


def frame_topic(path, topic: str | None) -> str:
    """The image topic to read frames from: ``topic`` if the log has it, else its only image topic."""
    found = log_reader(path).image_topics(path)
    listing = ", ".join(found) or "none"
    if topic is not None and topic not in found:
        raise ValueError(f"{path} has no image topic {topic}; its image topics: {listing}")
    if topic is None and len(found) != 1:
        raise ValueError(f"{path} has {len(found) or 'no'} image topics ({listing}): name one as "
                         f"{path}:/TOPIC")
    return topic or next(iter(found))
