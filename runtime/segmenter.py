"""The streaming segmenter: frames in, masks out, one memory ring for every backend.

Per frame the frame engine runs once (one backbone pass), its memory encodings go into the ring once, and the
memory head reads the T slots from the ring (slot i = frame t-T+i, oldest first), all through the one stepping
core :class:`tmanet.memory.MemoryStepper`. The segmenter owns all state: streams, their frame counters and
timestamps, the slide windows and the ring; a backend (:mod:`tmanet.runtime.backends`) only runs graphs.

Streams advance independently: a push names the streams it moves (all of them by default) and only those
advance. Lanes: the engines see a batch of *lanes*, one per (stream, slide window) pair, stream-major; a lane
is one row of the ring, with its own memory and clock. The pushed streams' lanes are cut into engine calls of
the export's fixed batch (padded with idle rows, which belong to no stream) or of up to ``max_batch`` lanes
(a dynamic export). The head reads zero-copy views where a call's lanes are consecutive rows at one clock
(the lockstep case) and gathered copies where their clocks differ.

Every input is validated before any state changes: a bad frame raises ValueError and the next good frame
continues exactly as if the bad one had never been pushed.

Thread safety: a segmenter may be shared between threads; each push, reset, release, add_stream and close
holds the segmenter's lock, so pushes are serialized (in the order the threads take the lock) and every result
is one whole frame's.
"""
from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tmanet.manifest import ExportSpec, load_manifest
from tmanet.model.slide import default_stride, pair, slide_windows
from tmanet.memory import MemoryRing, MemoryStepper
from tmanet.model.tmanet import FrameResult

from .backends import Backend, get_backend

STAGES = ("pre", "frame_engine", "ring", "head", "post")
DEFAULT_MAX_GAP = 1.0  # seconds between two frames of a stream beyond which its memory is stale


@dataclass
class SegmentResult(FrameResult):
    """One segmented frame of one stream. ``index`` counts the stream's frames since it (re)started: frames
    with ``index < T`` are warm-up frames (their memory repeats the stream's first frame)."""
    stream: int = 0
    timestamp: float | None = None


class StageTimer:
    """Wall time of each stage of the last push (seconds), in ``last``. ``sync`` (e.g. a CUDA synchronize)
    runs at the end of each stage when given, so asynchronous engines are charged to the right stage."""

    def __init__(self, sync=None):
        self.sync = sync
        self.last = dict.fromkeys(STAGES, 0.0)

    def begin(self):
        self.last = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            self.last[stage] += time.perf_counter() - start


def resize_frames(frames: np.ndarray, size) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` -> uint8 ``(N, h, w, 3)`` at ``size`` = (h, w): bilinear, half-pixel centres
    (``align_corners=False``, as the OpenCV resize of the official test pipeline), rounded."""
    import torch
    import torch.nn.functional as F
    x = torch.from_numpy(np.require(frames, requirements=["C", "W"])).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def rescale_logits(logits: np.ndarray, size, align_corners: bool) -> np.ndarray:
    """float ``(N, C, h, w)`` -> ``(N, C, H, W)``: bilinear with the preset's ``align_corners``, the official
    test protocol's rescale of the logits to the original image before the argmax."""
    import torch
    import torch.nn.functional as F
    x = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners).numpy()


class FrameSizeError(ValueError):
    """A whole-mode frame of another size than the export's, without ``resize``. The message names the ways
    out; ``slide`` says whether slide mode is one of them (frames at least the export size, and a caller that
    offers it: a camera stream of a ROS bag does not)."""

    def __init__(self, size, export_size, slide: bool):
        self.size, self.export_size = size, export_size
        super().__init__(self.describe(slide))

    def describe(self, slide: bool) -> str:
        (H, W), (eh, ew) = self.size, self.export_size
        hint = "use slide mode (mode='slide', `--mode slide`) to run crops of the export size, " if slide else ""
        return (f"frame size {H}x{W} differs from the export size {eh}x{ew}: {hint}resize them with `--resize` "
                f"(resize=True), or export at {H}x{W}")


class StreamingSegmenter:
    def __init__(self, backend: Backend, spec: ExportSpec, mode: str = "whole", stride=None,
                 return_logits: bool = False, max_gap: float | None = DEFAULT_MAX_GAP,
                 num_streams: int | None = None, resize: bool = False):
        if mode not in ("whole", "slide"):
            raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
        if resize and mode != "whole":
            raise ValueError("resize applies to whole mode (slide mode runs crops of the export size)")
        if max_gap is not None and not (isinstance(max_gap, (int, float)) and max_gap > 0):
            raise ValueError(f"max_gap must be a positive number of seconds or None, got {max_gap!r}")
        if num_streams is not None and not (_is_int(num_streams) and num_streams > 0):
            raise ValueError(f"num_streams must be a positive int or None, got {num_streams!r}")
        self.backend = backend
        self.spec = spec
        self.mode = mode
        self.return_logits = bool(return_logits)
        self.max_gap = max_gap
        self.num_streams = None if num_streams is None else int(num_streams)
        self.resize = bool(resize)
        self.align_corners = spec.align_corners
        self.memory_frames = spec.memory_frames
        self.input_size = spec.input_size
        self.num_classes = spec.num_classes
        self.class_names = list(spec.class_names)
        self.palette = list(spec.palette)
        if stride is None:
            stride = default_stride(self.input_size, spec.slide_crop, spec.slide_stride)
        self.stride = pair(stride)
        if mode == "slide" and not all(0 < s <= c for s, c in zip(self.stride, self.input_size)):
            raise ValueError(f"slide stride {self.stride} must be positive and at most the crop (the export "
                             f"size {self.input_size}), otherwise some pixels are in no window")
        self.timer = StageTimer()
        self._lock = threading.RLock()  # one push (or reset/release/close) at a time: see the module docstring
        self._closed = False
        self._rescale = False  # this push's frames were resized: the head returns logits to rescale
        self._clear()

    @classmethod
    def open(cls, directory, backend: str = "ort", device: str = "cpu", mode: str = "whole", stride=None,
             return_logits: bool = False, max_gap: float | None = DEFAULT_MAX_GAP, verify: bool = True,
             num_streams: int | None = None, resize: bool = False, **backend_options) -> "StreamingSegmenter":
        """A segmenter over the export directory ``directory`` (manifest.json + the two ONNX files).
        ``num_streams`` fixes the number of streams up front (else the first push does).
        ``resize``: whole mode takes frames of any size (see :func:`resize_frames`, :func:`rescale_logits`).
        ``backend_options`` go to the backend (e.g. ``threads=`` for ort)."""
        spec = load_manifest(directory, verify=verify)
        backend_obj = get_backend(backend)(Path(directory), spec, device, **backend_options)
        return cls(backend_obj, spec, mode=mode, stride=stride, return_logits=return_logits, max_gap=max_gap,
                   num_streams=num_streams, resize=resize)

    # -- state --------------------------------------------------------------------------------------------
    def _clear(self):
        self.streams = self.num_streams  # number of streams: fixed by open(), else at the first push
        self.frame_size = None      # (H, W), fixed at the first push
        self.windows = None         # [(y1, y2, x1, x2)] per frame (one in whole mode)
        self.stepper: MemoryStepper | None = None
        self.last_calls: list[list[int]] = []  # ring rows of each engine call of the last push (padding included)
        self.in_use: list[bool] = []  # per stream: a frame pushed since its start or release()
        self._index: list[int] = []
        self._last_time: list[float | None] = []
        self._canvas = self._count = self._inputs = None

    @property
    def ring(self) -> MemoryRing | None:
        return None if self.stepper is None else self.stepper.ring

    def reset(self, stream: int | None = None):
        """Start stream ``stream`` afresh (its next frame is a first frame), or forget everything: with
        ``None`` the next push may use another frame size (and stream count, unless open() fixed it)."""
        with self._lock:
            self._check_open()
            if stream is None:
                self._clear()
                return
            s = self._check_stream_id(stream)
            if self.stepper is not None:
                self._restart(s)

    def release(self, stream: int):
        """Free stream ``stream``: its memory is forgotten and its next frame is a first frame; it counts
        as unused (``in_use``) until then."""
        with self._lock:
            self._check_open()
            s = self._check_stream_id(stream)
            if self.stepper is not None:
                self._restart(s)
                self.in_use[s] = False

    def add_stream(self) -> int:
        """One more stream, fresh; returns its id. The other streams keep their memory (the ring grows)."""
        with self._lock:
            self._check_open()
            s = self.streams or 0
            fixed = self.num_streams
            self.num_streams = self.streams = s + 1
            if self.stepper is not None:
                try:
                    self._grow(s)
                except BaseException:  # e.g. the larger ring would not fit (RingTooLarge): nothing changed
                    self.num_streams, self.streams = fixed, s
                    raise
            return s

    def _restart(self, s: int):
        self._index[s] = 0
        self._last_time[s] = None
        nwin = len(self.windows)
        for row in range(s * nwin, (s + 1) * nwin):
            self.ring.reset(row)

    # -- validation (touches nothing) ---------------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise RuntimeError("this StreamingSegmenter is closed: open a new one")

    def _check_stream_id(self, stream) -> int:
        if not _is_int(stream) or stream < 0:
            raise ValueError(f"stream must be a non-negative int, got {stream!r}")
        if self.streams is not None and stream >= self.streams:
            raise ValueError(f"stream {stream} out of range: this segmenter serves {self.streams} stream(s)")
        return int(stream)

    def _check_streams(self, streams, n: int) -> list[int]:
        """The stream id of each of the n frames."""
        if streams is None:
            if self.streams is None or n == self.streams:
                return list(range(n))
            hint = (" (the stream count is fixed at the first push; reset() to change it)"
                    if self.num_streams is None else "")
            raise ValueError(f"got {n} frame(s), but this segmenter serves {self.streams} streams: push all of "
                             f"them, or name the streams to advance (stream= / streams=){hint}")
        if self.streams is None:
            raise ValueError("stream ids need a known stream count: open(..., num_streams=N), or push all "
                             "streams once first")
        if isinstance(streams, (str, bytes)) or np.ndim(streams) != 1:
            raise ValueError(f"streams must be a list of stream ids, got {streams!r}")
        ids = [self._check_stream_id(s) for s in streams]
        if len(ids) != n:
            raise ValueError(f"{len(ids)} stream ids for {n} frames")
        if len(set(ids)) != len(ids):
            raise ValueError(f"stream ids must be distinct (one frame per stream per push), got {ids}")
        return ids

    def _check_frames(self, frames, single: bool) -> np.ndarray:
        frames = np.asarray(frames)
        what, want = ("frame", "(H, W, 3)") if single else ("frames", "(N, H, W, 3)")
        if frames.dtype != np.uint8:
            raise ValueError(f"{what} must be uint8 RGB {want}, got dtype {frames.dtype}")
        if frames.ndim != (3 if single else 4) or frames.shape[-1] != 3:
            raise ValueError(f"{what} must be uint8 RGB {want}, got shape {frames.shape}")
        if single:
            frames = frames[None]
        n, H, W = frames.shape[:3]
        eh, ew = self.input_size
        if n < 1:
            raise ValueError("push_batch needs at least one frame")
        if H == 0 or W == 0:
            raise ValueError(f"empty {what}: {H}x{W} pixels")
        if self.mode == "whole":
            if (H, W) != (eh, ew) and not self.resize:
                raise FrameSizeError((H, W), (eh, ew), slide=H >= eh and W >= ew)
        else:
            if H < eh or W < ew:
                raise ValueError(f"frame size {H}x{W} is smaller than the export size {eh}x{ew}: slide mode "
                                 "runs crops of the export size; export at a smaller size for these frames")
            if self.frame_size is not None and (H, W) != self.frame_size:
                raise ValueError(f"frame size {H}x{W} differs from this segmenter's {self.frame_size[0]}x"
                                 f"{self.frame_size[1]} (the slide windows are fixed; reset() to change)")
        return frames

    @staticmethod
    def _check_times(timestamps, n: int):
        if timestamps is None:
            return [None] * n
        if np.ndim(timestamps) == 0:
            timestamps = [timestamps] * n
        timestamps = list(timestamps)
        if len(timestamps) != n:
            raise ValueError(f"{len(timestamps)} timestamps for {n} frames")
        out = []
        for t in timestamps:
            if t is None:
                out.append(None)
                continue
            try:
                t = float(t)
            except (TypeError, ValueError):
                raise ValueError(f"timestamp must be a number of seconds, got {t!r}") from None
            if not math.isfinite(t):
                raise ValueError(f"timestamp must be finite, got {t}")
            out.append(t)
        return out

    # -- setup at the first push --------------------------------------------------------------------------
    def _setup(self, n: int, H: int, W: int):
        eh, ew = self.input_size
        windows = [(0, H, 0, W)] if self.mode == "whole" else slide_windows(H, W, (eh, ew), self.stride)
        lanes = n * len(windows)
        b = self.backend.batch
        idle = b - 1 if b else 0  # a fixed batch pads a partial call with rows of no stream
        h, w = self.spec.feature_size
        ring = MemoryRing(self.memory_frames, lanes + idle, (self.spec.key_channels, h, w),
                          (self.spec.value_channels, h, w), self.backend.zeros)
        self.stepper = MemoryStepper(self.backend.encode, self._head, ring)
        self.streams, self.frame_size, self.windows = n, (H, W), windows
        self._inputs = np.zeros((b or min(lanes, self.backend.max_batch), eh, ew, 3), np.uint8)
        self._index = [0] * n
        self._last_time = [None] * n
        self.in_use = [False] * n
        if self.mode == "slide":
            self._canvas = np.zeros((n, self.num_classes, H, W), np.float32)
            count = np.zeros((H, W), np.float32)
            for y1, y2, x1, x2 in windows:
                count[y1:y2, x1:x2] += 1
            self._count = count

    def _grow(self, s: int):
        """Room for the new stream ``s`` (= the old stream count): its lanes take the rows after the old
        lanes, the idle padding rows move to the end."""
        nwin = len(self.windows)
        self.ring.grow(nwin)
        self._index.append(0)
        self._last_time.append(None)
        self.in_use.append(False)
        self._restart(s)
        if self.backend.batch is None:
            lanes = self.streams * nwin
            self._inputs = np.zeros((min(lanes, self.backend.max_batch), *self._inputs.shape[1:]), np.uint8)
        if self.mode == "slide":
            self._canvas = np.concatenate([self._canvas, np.zeros_like(self._canvas[:1])])

    def _head(self, query_key, query_value, slot_keys, slot_values):
        logits = self.return_logits or self.mode == "slide" or self._rescale
        return self.backend.head(query_key, query_value, slot_keys, slot_values, return_logits=logits)

    def _calls(self, ids: list[int]) -> list[tuple[list[int], list[int]]]:
        """(lane rows, rows with padding) of each engine call for the pushed streams, in stream order."""
        nwin = len(self.windows)
        lanes = [s * nwin + w for s in sorted(ids) for w in range(nwin)]
        b = self.backend.batch
        size = b or self.backend.max_batch
        idle = list(range(self.streams * nwin, self.ring.batch))
        calls = []
        for start in range(0, len(lanes), size):
            rows = lanes[start:start + size]
            calls.append((rows, rows + idle[:b - len(rows)] if b else rows))
        return calls

    # -- pushing ------------------------------------------------------------------------------------------
    def push(self, frame, timestamp: float | None = None, stream: int | None = None) -> SegmentResult:
        """Segment the next frame (uint8 RGB ``(H, W, 3)``) of stream ``stream`` (the single stream when
        None); no other stream moves."""
        streams = None if stream is None else [stream]
        with self._lock:
            self._check_open()
            return self._push(frame, None if timestamp is None else [timestamp], streams, single=True)[0]

    def push_batch(self, frames, timestamps=None, streams=None) -> list[SegmentResult]:
        """Segment the next frame of several streams in one engine batch: ``frames[k]`` (``(N, H, W, 3)``)
        is the next frame of stream ``streams[k]`` (distinct ids; all streams in order when None). Only
        those streams advance. ``timestamps``: one per frame, or one for all."""
        with self._lock:
            self._check_open()
            return self._push(frames, timestamps, streams, single=False)

    def _push(self, frames, timestamps, streams, single: bool) -> list[SegmentResult]:
        timer = self.timer
        timer.begin()
        with timer("pre"):
            frames = self._check_frames(frames, single)
            n = frames.shape[0]
            ids = self._check_streams(streams, n)
            times = self._check_times(timestamps, n)
            camera_size = frames.shape[1:3]
            self._rescale = self.resize and camera_size != self.input_size
            if self._rescale:
                frames = resize_frames(frames, self.input_size)
            H, W = frames.shape[1:3]
            # -- valid: from here on state changes --
            if self.stepper is None:
                self._setup(self.streams or n, H, W)
            for s, t in zip(ids, times):
                last = self._last_time[s]
                if self.max_gap is not None and t is not None and last is not None and \
                        not 0 <= t - last <= self.max_gap:
                    self._restart(s)  # a gap (or time going back): the memory no longer shows this scene
        frame_of = {s: k for k, s in enumerate(ids)}
        nwin = len(self.windows)
        masks, logits_out = {}, {}
        if self.mode == "slide":
            self._canvas[ids] = 0
        self.last_calls = []
        for lanes, rows in self._calls(ids):
            with timer("pre"):
                batch = self._gather(frames, ids, lanes, frame_of, len(rows))
            mask, logits = self.stepper.step(batch, rows, stage=timer)
            self.last_calls.append(rows)
            with timer("post"):
                for k, lane in enumerate(lanes):
                    s, wi = divmod(lane, nwin)
                    if self.mode == "whole":
                        masks[s] = mask[k].copy()
                        logits_out[s] = logits[k].copy() if self.return_logits or self._rescale else None
                    else:
                        y1, y2, x1, x2 = self.windows[wi]
                        self._canvas[s, :, y1:y2, x1:x2] += logits[k]
        with timer("post"):
            if self._rescale:
                self._to_camera_size(ids, masks, logits_out, camera_size)
            results = []
            for s, t in zip(ids, times):
                if self.mode == "slide":
                    merged = self._canvas[s] / self._count  # the official merge: mean over windows
                    masks[s] = merged.argmax(0).astype(np.uint8)
                    logits_out[s] = merged if self.return_logits else None
                results.append(SegmentResult(self._index[s], masks[s], logits_out[s], s, t))
                self._index[s] += 1
                self._last_time[s] = t
                self.in_use[s] = True
        return results

    def _to_camera_size(self, ids, masks: dict, logits: dict, size):
        """Masks (and logits, when asked) at the camera size from the export-size logits of each stream."""
        full = rescale_logits(np.stack([logits[s] for s in ids]), size, self.align_corners)
        for s, stream_logits in zip(ids, full):
            masks[s] = stream_logits.argmax(0).astype(np.uint8)
            logits[s] = stream_logits if self.return_logits else None

    def _gather(self, frames, ids, lanes, frame_of, size) -> np.ndarray:
        """One engine call's input: its lanes' crops, padding rows left as they are."""
        if self.mode == "whole" and size == len(lanes) == len(ids) and ids == sorted(ids) \
                and frames.flags.c_contiguous:
            return frames  # the frames are the batch already: bind them as they are
        nwin = len(self.windows)
        for k, lane in enumerate(lanes):
            s, wi = divmod(lane, nwin)
            y1, y2, x1, x2 = self.windows[wi]
            self._inputs[k] = frames[frame_of[s], y1:y2, x1:x2]
        return self._inputs[:size]

    # -- conveniences -------------------------------------------------------------------------------------
    def close(self):
        """Release the engines; later pushes raise. Closing twice is harmless."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._clear()
            self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"StreamingSegmenter({self.backend.describe()}, mode={self.mode}, input {self.input_size[0]}x"
                f"{self.input_size[1]}, T={self.memory_frames}, streams={self.streams})")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
