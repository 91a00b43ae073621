"""MCAP (the ROS 2 bag format) in and out, with the ``mcap`` and ``mcap-ros2-support`` packages (no ROS install).

Reading: :func:`image_topics` lists a file's ``sensor_msgs`` image topics, :func:`read_images` yields their
messages decoded, in log-time order. Writing: :class:`McapImageWriter` writes ``sensor_msgs/msg/Image``
messages under a temporary name in the destination folder and renames it into place only when complete.
Every unreadable input (not an MCAP, truncated, a damaged chunk) is a :class:`~tmanet.io.driving_logs.LogReadError`
with one line naming the file and where; ``read_images(..., skip_damaged=True)`` skips damaged chunks instead.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .driving_logs import LogReadError
from .ros_images import IMAGE, IMAGE_TYPES, LABEL_INFO, MSGDEFS, label_info_fields
from tmanet.safe_files import atomic_file

log = logging.getLogger("tmanet")


@contextmanager
def _unreadable(path):
    """Any failure of the mcap reader on this file (bad magic, truncation, bad CRCs, undecodable records,
    decompression errors) as one line: whatever a damaged file makes a parser raise means the file is damaged."""
    try:
        yield
    except LogReadError:
        raise
    except (MemoryError, RecursionError):
        raise
    except Exception as e:
        raise LogReadError(f"{path}: not a complete, readable MCAP file ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


MAGIC = b"\x89MCAP0\r\n"  # at both ends of a complete MCAP file
# A chunk holds at least one message: a 4K rgb8 image is 25 MB, so a chunk claiming more than this is damaged.
MAX_CHUNK_BYTES = 1 << 30


def _reader(f, path, **options):
    """A seeking reader over the open file ``f``, once both magics are in place (a recording cut short lacks
    the closing one). No record may claim more bytes than the file holds."""
    from mcap.reader import SeekingReader
    head = f.read(len(MAGIC))
    size = f.seek(0, os.SEEK_END)
    f.seek(-min(len(MAGIC), size), os.SEEK_END)
    tail = f.read(len(MAGIC))
    f.seek(0)
    if head != MAGIC:
        raise LogReadError(f"{path}: not an MCAP file (it does not start with the MCAP magic)")
    if tail != MAGIC or size < 2 * len(MAGIC):
        raise LogReadError(f"{path}: the MCAP file ends without its footer (truncated, or still being "
                           "recorded?): `mcap recover` rebuilds what it holds")
    with _unreadable(path):
        return SeekingReader(f, record_size_limit=size, **options)


def _summary(reader, path):
    with _unreadable(path):
        summary = reader.get_summary()
    if summary is None:
        raise LogReadError(f"{path}: the MCAP file has no summary section (no index of its topics): "
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


def read_images(path, topics, skip_damaged: bool = False, start: int | None = None, end: int | None = None
                ) -> Iterator[tuple[str, int, int, object]]:
    """``(topic, log_time, publish_time, message)`` of the image messages on ``topics``, in log-time order
    (nanoseconds), with CRCs checked; only those with ``start <= log_time < end`` where given (the chunks
    outside are not read). A damaged chunk (or message) is a :class:`LogReadError` naming its byte offset and
    log times; with ``skip_damaged`` it is skipped with a warning counting the messages lost."""
    from mcap_ros2.decoder import DecoderFactory
    topics = set(topics)
    with open(path, "rb") as f:
        reader = _reader(f, path, validate_crcs=True, decoder_factories=[DecoderFactory()])
        summary = _summary(reader, path)
        if not summary.chunk_indexes:  # an unchunked file: the library reads it linearly
            with _unreadable(path):
                for _s, channel, message, decoded in reader.iter_decoded_messages(
                        topics=sorted(topics), start_time=start, end_time=end):
                    yield channel.topic, message.log_time, message.publish_time, decoded
            return
        yield from _chunked_images(f, path, summary, topics, skip_damaged, start, end)


def _chunked_images(f, path, summary, topics, skip_damaged, start=None, end=None):
    """The chunks one by one, merged in log-time order (chunks may overlap in time), each read with every
    length bounded (by the file size and :data:`MAX_CHUNK_BYTES`) before anything is allocated."""
    import heapq
    channels = {cid for cid, ch in summary.channels.items() if ch.topic in topics}
    size = f.seek(0, os.SEEK_END)
    decoders = _Decoders(summary)
    lo, hi = (-1 if start is None else start), (float("inf") if end is None else end)
    queue = [(ci.message_start_time, ci.chunk_start_offset, -1, ci) for ci in summary.chunk_indexes
             if (not ci.message_index_offsets or channels & set(ci.message_index_offsets))
             and ci.message_end_time >= lo and ci.message_start_time < hi]
    heapq.heapify(queue)
    while queue:
        log_time, offset, index, item = heapq.heappop(queue)
        if index >= 0:
            topic, message = item
            try:
                decoded = decoders(message)
            except Exception as e:  # a message the CRC did not cover (CRCs are optional) that will not decode
                where = f"message at log time {message.log_time} ns in the chunk at byte {offset}"
                _damaged(path, where, e, 1, skip_damaged)
                continue
            yield topic, message.log_time, message.publish_time, decoded
            continue
        try:
            messages = _chunk_messages(f, size, item, channels)
        except Exception as e:
            where = (f"chunk at byte {item.chunk_start_offset} (messages logged {item.message_start_time}.."
                     f"{item.message_end_time} ns)")
            _damaged(path, where, e, _indexed_count(f, size, item, channels), skip_damaged)
            continue
        for i, message in enumerate(messages):
            if lo <= message.log_time < hi:
                heapq.heappush(queue, (message.log_time, offset, i, (summary.channels[message.channel_id].topic,
                                                                     message)))


def _damaged(path, where, error, lost, skip_damaged):
    if not skip_damaged:
        raise LogReadError(f"{path}: damaged {where}: {_first_line(error)} (--allow-truncated skips the damaged "
                           "part)")
    lost = "an unknown number of" if lost is None else lost
    log.warning("%s: skipped the damaged %s (%s): %s frames lost (--allow-truncated)", path, where,
                _first_line(error), lost)


class _Decoders:
    """CDR decoders per channel, made on first use."""

    def __init__(self, summary):
        from mcap_ros2.decoder import DecoderFactory
        self.summary, self.factory, self.decoders = summary, DecoderFactory(), {}

    def __call__(self, message):
        decoder = self.decoders.get(message.channel_id)
        if decoder is None:
            channel = self.summary.channels[message.channel_id]
            schema = self.summary.schemas.get(channel.schema_id)
            decoder = self.factory.decoder_for(channel.message_encoding, schema)
            if decoder is None:
                raise ValueError(f"no decoder for {channel.message_encoding} messages of {schema and schema.name}")
            self.decoders[message.channel_id] = decoder
        return decoder(message.data)


def _read_at(f, size, offset, length) -> bytes:
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"{length} bytes at byte {offset} lie beyond the end of the file ({size} bytes)")
    f.seek(offset)
    return f.read(length)


def _chunk_messages(f, size, chunk_index, channels) -> list:
    """The messages on ``channels`` of one chunk, its CRC checked."""
    from io import BytesIO

    from mcap.data_stream import ReadDataStream
    from mcap.records import Chunk, Message
    from mcap.stream_reader import breakup_chunk
    record = BytesIO(_read_at(f, size, chunk_index.chunk_start_offset, chunk_index.chunk_length))
    opcode = record.read(1)
    if opcode != b"\x06":  # Opcode.CHUNK
        raise ValueError(f"no chunk record there (opcode {opcode.hex() or 'none'})")
    record.seek(9)
    chunk = Chunk.read(ReadDataStream(record))
    if chunk.uncompressed_size > min(MAX_CHUNK_BYTES, size * 100_000):
        raise ValueError(f"the chunk claims {chunk.uncompressed_size} bytes uncompressed")
    data = _decompress(chunk.compression, chunk.data, chunk.uncompressed_size)
    plain = Chunk(compression="", data=data, message_end_time=chunk.message_end_time,
                  message_start_time=chunk.message_start_time, uncompressed_crc=chunk.uncompressed_crc,
                  uncompressed_size=len(data))
    return [r for r in breakup_chunk(plain, validate_crc=True)
            if isinstance(r, Message) and r.channel_id in channels]


def _decompress(compression: str, data: bytes, expected: int) -> bytes:
    """``data`` decompressed, read in 1 MB pieces up to the ``expected`` size the chunk declares (a damaged
    frame header cannot make the decompressor allocate more)."""
    from io import BytesIO
    if compression == "":
        stream = BytesIO(data)
    elif compression == "zstd":
        import zstandard
        stream = zstandard.ZstdDecompressor().stream_reader(BytesIO(data))
    elif compression == "lz4":
        import lz4.frame
        stream = lz4.frame.LZ4FrameFile(BytesIO(data), "rb")
    else:
        raise ValueError(f"unknown chunk compression {compression!r}")
    pieces, total = [], 0
    while total <= expected:
        piece = stream.read(min(1 << 20, expected + 1 - total))
        if not piece:
            break
        pieces.append(piece)
        total += len(piece)
    if total != expected:
        raise ValueError(f"the chunk decompresses to {'more than ' if total > expected else ''}{total} bytes, "
                         f"not the {expected} it declares")
    return b"".join(pieces)


def _indexed_count(f, size, chunk_index, channels) -> int | None:
    """Messages on ``channels`` in a chunk according to its message indexes (None when they are unreadable)."""
    from io import BytesIO

    from mcap.data_stream import ReadDataStream
    from mcap.records import MessageIndex
    try:
        total = 0
        for cid, offset in chunk_index.message_index_offsets.items():
            if cid in channels:
                record = BytesIO(_read_at(f, size, offset, min(chunk_index.message_index_length, size - offset)))
                if record.read(1) != b"\x07":  # Opcode.MESSAGE_INDEX
                    return None
                record.seek(9)
                total += len(MessageIndex.read(ReadDataStream(record)).records)
        return total
    except Exception:  # the index is as damaged as the chunk
        return None


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
    ``ros2 bag info/play`` read it). Use as a context manager: the file appears at ``path`` only on success.
    With ``class_names``, :meth:`write_mask` puts a ``vision_msgs/msg/LabelInfo`` naming them beside each
    camera's masks, once, before its first mask (vision_msgs' convention: ``<camera>/label_info``)."""

    def __init__(self, path, class_names=()):
        self.path = Path(path)
        self.class_names = tuple(class_names)
        self.count = 0
        self._output = None
        self._labelled: set[str] = set()

    def __enter__(self):
        from mcap_ros2.writer import Writer
        self._output = _binary_output(self.path)
        self._writer = Writer(self._output.__enter__())
        self._schema = self._writer.register_msgdef(IMAGE, MSGDEFS[IMAGE])
        self._labels = None
        return self

    def write_mask(self, topic: str, fields, log_time: int, publish_time: int | None = None):
        """A mask message on ``topic`` (``<camera>/mask``); the camera's LabelInfo first, once."""
        if self.class_names and topic not in self._labelled:
            self._labelled.add(topic)
            if self._labels is None:
                self._labels = self._writer.register_msgdef(LABEL_INFO, MSGDEFS[LABEL_INFO])
            header = fields["header"] if isinstance(fields, dict) else fields.header
            self._writer.write_message(f"{topic.rsplit('/', 1)[0]}/label_info", self._labels,
                                       label_info_fields(self.class_names, header), log_time=log_time,
                                       publish_time=log_time)
        self.write(topic, fields, log_time, publish_time)

    def write(self, topic: str, fields: dict, log_time: int, publish_time: int | None = None):
        self._writer.write_message(topic, self._schema, fields, log_time=log_time,
                                   publish_time=log_time if publish_time is None else publish_time,
                                   sequence=self.count)
        self.count += 1

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self._writer.finish()
        return self._output.__exit__(exc_type, exc, tb)
