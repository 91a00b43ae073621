"""Frame sources and result sinks: shared by `tmanet run`, export checks, calibration, engine builds and the demo.

Sources (one interface, :func:`open_frames`): a video file (PyAV), a folder of images (png/jpg, sorted by
name), a ``.npy`` clip ``(F, H, W, 3)`` uint8 or one image topic of a ROS bag (``drive.mcap`` / ``.db3`` /
``.bag`` with one image topic, or ``drive.mcap:/cam/front/image_raw``). Each yields ``(frame, timestamp)``
with frame a uint8 RGB ``(H, W, 3)`` array and timestamp in seconds (video: the frame's presentation time;
ROS bag: the header stamp; others: None).

A video that ends in a decode error, a corrupt frame or fewer frames than its header announces (a file cut
short) raises :class:`TruncatedVideoError` naming the last good frame, unless ``allow_truncated`` keeps the
frames read. Source problems are :class:`FrameSourceError`: one line, naming the file.

Sinks: a video (of pictures drawn by ``tmanet.pictures``), one palette PNG per mask (pixel values
are the class ids, the palette makes them viewable), and a logits ``.npy`` written frame by frame. Each is
written under a temporary name beside its destination and renamed into place by ``close()`` (``discard()``
removes it instead), so a final name never holds a truncated file.
"""
from __future__ import annotations

import logging
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from tmanet.errors import UserError
from tmanet.safe_files import OutputError, PendingFile, atomic_file

log = logging.getLogger("tmanet")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts")
WRITABLE_VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".m4v")  # containers that take H.264 / MPEG-4


class FrameSourceError(UserError, ValueError):
    """A frame source cannot be read (missing, corrupt, mixed sizes, not frames): one line naming the file."""


class TruncatedVideoError(FrameSourceError):
    """A video ends in a decode error or holds fewer frames than announced (cut short or damaged)."""


class FrameSource:
    """Iterable of ``(frame, timestamp)``; ``count`` (frames, None if unknown), ``fps`` (None if unknown),
    ``kind`` and ``path`` describe it."""

    def __init__(self, path, kind, count, fps, iterate, read_range=None):
        self.path, self.kind, self.count, self.fps = Path(path), kind, count, fps
        self._iterate = iterate
        self._read_range = read_range

    def __iter__(self) -> Iterator[tuple[np.ndarray, float | None]]:
        return self._iterate()

    @property
    def seekable(self) -> bool:
        """Whether :meth:`range` enters the source directly (a ``.npy`` clip, an image folder)."""
        return self._read_range is not None

    def range(self, start: int, stop: int) -> Iterator[tuple[np.ndarray, float | None]]:
        """Frames ``start..stop-1``, the same as iterating and keeping those; entered directly where the source
        is :attr:`seekable` (else the frames before ``start`` are read and dropped)."""
        if self._read_range is not None:
            return self._read_range(start, stop)
        from itertools import islice
        return islice(iter(self), start, stop)

    def __len__(self):
        if self.count is None:
            raise TypeError("frame count unknown")
        return self.count


def open_frames(path, max_frames: int | None = None, allow_truncated: bool = False) -> FrameSource:
    """The frames of a video file, an image folder, a ``.npy`` clip or a ROS bag's image topic (at most
    ``max_frames``). ``allow_truncated``: a video cut short ends at its last good frame with a warning instead
    of an error; for a ROS bag, damaged chunks or records are skipped with a warning counting the frames lost."""
    from .driving_logs import is_log, split_topic
    path, topic = split_topic(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if is_log(path):
        source = _log_topic(path, topic, allow_truncated)
    elif path.is_dir():
        source = _image_folder(path)
    elif path.suffix.lower() == ".npy":
        source = _npy_clip(path)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        raise FrameSourceError(f"{path} is a single image: give the folder of frames, a video or a .npy clip")
    else:
        source = _video(path, allow_truncated)
    if max_frames is not None:
        inner = source._iterate
        source.count = max_frames if source.count is None else min(source.count, max_frames)

        def limited():
            for i, item in enumerate(inner()):
                if i >= max_frames:
                    return
                yield item
        source._iterate = limited
    return source


def read_npy(path, mmap: bool = True) -> np.ndarray:
    """A ``.npy`` array (memory-mapped by default; never unpickled), or :class:`FrameSourceError` naming the
    file when it is missing, truncated or not a ``.npy``. The header's shape x dtype is checked against the
    file's size first, so a header claiming more than the file holds is refused before anything is allocated."""
    try:
        _check_npy_header(path)
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FrameSourceError:
        raise
    except (MemoryError, RecursionError):
        raise
    except Exception as e:  # the header parser's errors (ValueError, SyntaxError, tokenize.TokenError...), I/O
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FrameSourceError(f"{path}: not a readable .npy file ({detail})") from None


def _check_npy_header(path):
    import math
    from numpy.lib import format as npy
    with open(path, "rb") as f:
        version = npy.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"unknown .npy version {version}")
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, _fortran, dtype = read_header(f)  # refuses headers over 10,000 bytes and anything but literals
        data_start = f.tell()
        size = f.seek(0, 2)
    if dtype.hasobject:
        raise FrameSourceError(f"{path}: a .npy of Python objects ({dtype}): refusing to unpickle it")
    need = math.prod(shape) * dtype.itemsize
    if need > size - data_start:
        raise FrameSourceError(f"{path}: the .npy header announces {dtype} {shape} ({need} bytes) but the file "
                               f"holds {size - data_start} bytes of data (truncated or damaged)")


def _npy_clip(path: Path) -> FrameSource:
    clip = read_npy(path)
    if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3:
        raise FrameSourceError(f"{path}: expected a uint8 RGB clip (F, H, W, 3), got {clip.dtype} {clip.shape}")

    def frames(start=0, stop=None):
        for f in clip[start:stop]:
            yield np.ascontiguousarray(f), None
    return FrameSource(path, "npy", len(clip), None, frames, read_range=frames)


def _log_topic(path: Path, topic: str | None, skip_damaged: bool = False) -> FrameSource:
    from .driving_logs import frame_topic, log_reader
    from .ros_images import field, image_to_rgb, stamp_seconds
    topic = frame_topic(path, topic)
    reader = log_reader(path)

    def frames():
        for _, log_time, _, msg in reader.read_images(path, [topic], skip_damaged=skip_damaged):
            try:
                yield image_to_rgb(msg), stamp_seconds(field(msg, "header"))
            except ValueError as e:
                raise FrameSourceError(f"{path}, {topic}, message at log time {log_time} ns: {e}") from None
    return FrameSource(f"{path}:{topic}", "rosbag", reader.count_messages(path, [topic]), None, frames)


def _image_folder(path: Path) -> FrameSource:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FrameSourceError(f"{path}: no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images in this folder")

    def frames(start=0, stop=None):
        from PIL import Image
        size = None
        for f in files[start:stop]:
            try:
                with Image.open(f) as im:
                    frame = np.array(im.convert("RGB"))  # a writable copy (asarray would be read-only)
            except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
                raise FrameSourceError(f"{f}: not a readable image ({e})") from None
            if size is None:
                size = frame.shape
            elif frame.shape != size:
                raise FrameSourceError(f"{f}: {frame.shape[1]}x{frame.shape[0]} image in a folder of "
                                       f"{size[1]}x{size[0]} frames (all frames must have one size)")
            yield frame, None
    return FrameSource(path, "images", len(files), None, frames, read_range=frames)


def _video(path: Path, allow_truncated: bool = False) -> FrameSource:
    import av
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise FrameSourceError(f"{path}: no video stream")
            stream = container.streams.video[0]
            count = stream.frames or None
            fps = float(stream.average_rate) if stream.average_rate else None
    except av.error.FFmpegError as e:
        raise FrameSourceError(f"{path}: cannot read as a video ({e})") from None

    def frames():
        import av.logging
        # FFmpeg reports a cut-off file only in its log ("File ended prematurely", "partial file") or as a
        # corrupt last frame: a demuxer error, or a decoder error after the last good frame, means the video
        # did not end cleanly (decoder errors before good frames, e.g. a stream cut before a keyframe, do not).
        av_level = av.logging.get_level()
        av.logging.set_level(av.logging.ERROR)
        libav_log = logging.getLogger("libav")
        level = libav_log.level
        libav_log.setLevel(logging.CRITICAL)  # FFmpeg's lines are summed up in our error instead
        try:
            yield from _decode(av)
        finally:
            libav_log.setLevel(level)
            av.logging.set_level(av_level)

    def _decode(av):
        good, problem, errors_at_last_good = 0, None, 0
        with av.logging.Capture(local=False) as logs, av.open(str(path)) as container:
            stream = container.streams.video[0]
            # Slice threads, not frame threads: with frame threading, how many frames of a cut-off file decode
            # before the error depends on thread timing, and the same file must give the same frames.
            stream.thread_type = "SLICE"
            decoded = container.decode(stream)
            while True:
                try:
                    frame = next(decoded)
                except StopIteration:
                    break
                except av.error.FFmpegError as e:
                    problem = f"decoding failed ({e})"
                    break
                if frame.is_corrupt:
                    problem = "a corrupt frame follows"
                    break
                t = frame.time if frame.time is not None else (good / fps if fps else None)
                errors_at_last_good = len(logs)
                yield frame.to_ndarray(format="rgb24"), t
                good += 1
            demuxer = [m for _, name, m in logs if name == container.format.name]
            if problem is None and (demuxer or len(logs) > errors_at_last_good):
                problem = f"FFmpeg: {(demuxer or [logs[-1][2]])[-1].strip()}"
        if problem is None and count is not None and good < count:
            problem = f"the header announces {count} frames"
        if problem is not None:
            where = f"after frame {good - 1} (the last good one; {good} frames read)" if good else "at frame 0"
            message = f"{path}: the video is truncated or damaged: it ends {where}: {problem}"
            if not allow_truncated:
                raise TruncatedVideoError(message + " (--allow-truncated keeps the frames read)")
            log.warning("%s; kept the %d frames read (--allow-truncated)", message, good)
    return FrameSource(path, "video", count, fps, frames)


# -- entering a video part-way (tmanet batch: chunks of one video decoded in parallel) --------------------
SEEKABLE_VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm")  # containers with a keyframe index


class VideoIndex:
    """The presentation timestamps of a video's frames in display order (``pts``, the stream's time base) and
    its keyframes' (``keyframes``), from one pass over the packets (demuxed, not decoded)."""

    def __init__(self, pts: list[int], keyframes: list[int], announced: int | None):
        self.pts, self.keyframes, self.announced = pts, keyframes, announced

    def why_not_seekable(self, path) -> str | None:
        """None when frame ``i`` of sequential decoding is exactly the frame with ``pts[i]`` and every frame
        can be reached from a keyframe at or before it; else the reason, in a few words."""
        if Path(path).suffix.lower() not in SEEKABLE_VIDEO_SUFFIXES:
            return f"{Path(path).suffix or 'this'} container has no keyframe index"
        if not self.pts or not self.keyframes or self.keyframes[0] != self.pts[0]:
            return "the video does not start with a keyframe"
        if len(set(self.pts)) != len(self.pts):
            return "frames without distinct timestamps"
        if self.announced is not None and self.announced != len(self.pts):
            return f"the header announces {self.announced} frames, {len(self.pts)} found (damaged?)"
        return None


def video_index(path) -> VideoIndex:
    """The :class:`VideoIndex` of the first video stream of ``path`` (FrameSourceError when unreadable)."""
    import av
    pts, keyframes = [], []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise FrameSourceError(f"{path}: no video stream")
            stream = container.streams.video[0]
            announced = stream.frames or None
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:  # the flush packet, or cut by an edit list
                    continue
                if packet.pts is None:
                    return VideoIndex([], [], announced)  # not indexable: why_not_seekable says so
                pts.append(packet.pts)
                if packet.is_keyframe:
                    keyframes.append(packet.pts)
    except av.error.FFmpegError as e:
        raise FrameSourceError(f"{path}: cannot read as a video ({e})") from None
    return VideoIndex(sorted(pts), sorted(keyframes), announced)


def read_video_frames(path, index: VideoIndex, start: int, stop: int) -> Iterator[tuple[np.ndarray, float]]:
    """Frames ``start..stop-1`` of a video as sequential decoding yields them (``open_frames``), entered by
    seeking to a keyframe at or before frame ``start`` and decoding forward. Each decoded frame is checked
    against the index (a seek that landed too late tries the keyframe before, finally the file's start), so a
    frame is never mistaken for another; a frame missing or corrupt is a FrameSourceError."""
    import av
    want = index.pts[start:stop]
    if not want:
        return
    candidates = [k for k in reversed(index.keyframes) if k <= want[0]]
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"  # as open_frames: the same frames whatever the thread timing
        for target in candidates:
            container.seek(target, stream=stream, backward=True, any_frame=False)
            decoded = container.decode(stream)
            first = None
            for frame in decoded:
                if frame.pts is not None and frame.pts >= want[0]:
                    first = frame
                    break
            if first is not None and first.pts == want[0]:
                break
        else:
            raise FrameSourceError(f"{path}: frame {start} (pts {want[0]}) cannot be reached by seeking")
        frame, k = first, 0
        while True:
            if frame.pts != want[k] or frame.is_corrupt:
                raise FrameSourceError(f"{path}: frame {start + k} decoded as pts {frame.pts}, expected "
                                       f"{want[k]}{' (corrupt)' if frame.is_corrupt else ''}")
            yield frame.to_ndarray(format="rgb24"), frame.time
            k += 1
            if k == len(want):
                return
            try:
                frame = next(decoded)
            except (StopIteration, av.error.FFmpegError) as e:
                raise FrameSourceError(f"{path}: the video ends after frame {start + k - 1} ({e or 'end'}), "
                                       f"{len(index.pts)} frames indexed") from None


# -- sinks ------------------------------------------------------------------------------------------------
@contextmanager
def _writing(path):
    """A failed write (a full disk, a quota, an I/O error) as one line naming the destination; the caller's
    temporary file is discarded by its own error path, so the final name keeps what it held."""
    try:
        yield
    except OSError as e:
        detail = e.strerror or str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OutputError(f"{path}: cannot write it ({detail}); an older file there is left as it was") from None


def pick_codec(preferred=("libx264", "mpeg4")) -> str:
    import av
    for name in preferred:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # not compiled into this FFmpeg build
            continue
    raise RuntimeError(f"none of the video encoders {preferred} is available in this PyAV/FFmpeg build")


class VideoWriter:
    """RGB frames into a video file (libx264 if available, else mpeg4; yuv420p). Odd frame sizes are padded
    by one edge row/column, since yuv420p needs even dimensions. The file appears under ``path`` only when
    :meth:`close` finishes it; :meth:`discard` (or an exception in a ``with`` block) leaves no file."""

    def __init__(self, path, fps: float = 25.0, codec: str | None = None):
        import av
        from fractions import Fraction
        self.path = Path(path)
        self.codec = codec or pick_codec()
        self._pending = PendingFile(self.path)
        try:
            self._container = av.open(str(self._pending.tmp), mode="w")
        except BaseException:
            self._pending.discard()
            raise
        self._rate = Fraction(fps).limit_denominator(1001) if fps else Fraction(25)
        self._stream = None
        self.frames = 0

    def write(self, rgb: np.ndarray):
        import av
        h, w = rgb.shape[:2]
        if h % 2 or w % 2:
            rgb = np.pad(rgb, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if self._stream is None:
            self._stream = self._container.add_stream(self.codec, rate=self._rate)
            self._stream.width, self._stream.height = rgb.shape[1], rgb.shape[0]
            self._stream.pix_fmt = "yuv420p"
            if self.codec == "libx264":
                self._stream.options = {"crf": "20", "preset": "veryfast"}
            else:
                self._stream.bit_rate = 8_000_000
        elif (rgb.shape[1], rgb.shape[0]) != (self._stream.width, self._stream.height):
            raise ValueError(f"frame {rgb.shape[1]}x{rgb.shape[0]} in a {self._stream.width}x"
                             f"{self._stream.height} video")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        with _writing(self.path):
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        self.frames += 1

    def close(self):
        """Finish the video and move it to its final name (a video without frames is not written)."""
        if self._container is None:
            return
        try:
            with _writing(self.path):
                if self._stream is not None:
                    for packet in self._stream.encode():  # flush the encoder
                        self._container.mux(packet)
                self._container.close()
        except BaseException:
            self.discard()
            raise
        self._container = None
        if self.frames:
            self._pending.commit()
        else:
            self._pending.discard()

    def discard(self):
        """Drop the video: nothing is left under its final or temporary name."""
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # an unfinished stream may not close cleanly: it is deleted anyway
                pass
            self._container = None
        self._pending.discard()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.discard() if exc_type is not None else self.close()


def save_mask_png(mask: np.ndarray, path, palette=None):
    """A palette ('P') PNG: pixel values are the class ids; the palette shows them in the preset colours."""
    from PIL import Image
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"mask must be uint8 (H, W), got {mask.dtype} {mask.shape}")
    im = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask).tobytes())
    if palette is not None:
        flat = np.zeros((256, 3), np.uint8)
        pal = np.asarray(palette, np.uint8).reshape(-1, 3)[:256]
        flat[:len(pal)] = pal
        im.putpalette(flat.reshape(-1).tolist())
    with _writing(path), atomic_file(path) as tmp:
        im.save(tmp)


class NpyWriter:
    """Arrays of one shape appended to a ``.npy`` file as they come (the frame count need not be known,
    nothing is held in memory): the header reserves room for the shape and is rewritten on close, which then
    moves the complete file to ``path`` (:meth:`discard` or an exception in a ``with`` block leaves none)."""
    HEADER_BYTES = 256  # a multiple of 64, as the format asks

    def __init__(self, path):
        self.path = Path(path)
        self._pending = PendingFile(self.path)
        self._file = open(self._pending.tmp, "wb")
        self._file.write(b"\0" * self.HEADER_BYTES)
        self.shape = None
        self.dtype = None
        self.count = 0

    def append(self, array: np.ndarray):
        array = np.ascontiguousarray(array)
        if self.shape is None:
            self.shape, self.dtype = array.shape, array.dtype
        elif array.shape != self.shape or array.dtype != self.dtype:
            raise ValueError(f"array {array.dtype} {array.shape} differs from the first {self.dtype} {self.shape}")
        with _writing(self.path):
            self._file.write(array.tobytes())
        self.count += 1

    def _header(self) -> bytes:
        shape = (self.count, *(self.shape or ()))
        descr = np.lib.format.dtype_to_descr(self.dtype or np.dtype(np.float32))
        text = repr({"descr": descr, "fortran_order": False, "shape": shape})
        body_len = self.HEADER_BYTES - 10  # magic (6) + version (2) + header length (2)
        if len(text) + 1 > body_len:
            raise ValueError(f"shape {shape} does not fit the reserved .npy header")
        text = text.ljust(body_len - 1) + "\n"
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", body_len) + text.encode("latin1")

    def close(self):
        if self._file is None:
            return
        try:
            with _writing(self.path):
                self._file.seek(0)
                self._file.write(self._header())
                self._file.close()
        except BaseException:
            self.discard()
            raise
        self._file = None
        self._pending.commit()

    def discard(self):
        if self._file is not None:
            try:
                self._file.close()  # flushing the buffer may fail again on a full disk: the file goes anyway
            except OSError:
                pass
            self._file = None
        self._pending.discard()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.discard() if exc_type is not None else self.close()
