"""The streaming segmenter: frames in, masks out, one memory ring for every backend.

Per frame the frame engine runs once (one backbone pass), its memory encodings go into the ring once, and the
memory head reads the T slots as views into the ring (slot i = frame t-T+i, oldest first); see
:mod:`tmanet.runtime.ring_buffer`. The segmenter owns all state: streams, their frame counters and timestamps,
the slide windows and the rings; a backend (:mod:`tmanet.runtime.backends`) only runs graphs.

Lanes: the engines see a batch of *lanes*, one per (stream, slide window) pair, stream-major. A lane has its
own memory (its own ring stream). The lanes are cut into chunks of the engine batch (a fixed-batch export) or
one chunk of up to ``max_batch`` lanes (a dynamic export); each chunk has its own ring, padded with idle
lanes when the lanes do not fill it. All rings rotate together, once per push.

Every input is validated before any state changes: a bad frame raises ValueError and the next good frame
continues exactly as if the bad one had never been pushed.

Thread safety: a segmenter may be shared between threads; each push, reset and close holds the segmenter's
lock, so pushes are serialized (in the order the threads take the lock) and every result is one whole frame's.
"""
from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tmanet.model.slide import pair, slide_windows
from tmanet.model.tmanet import FrameResult

from .backends import Backend, get_backend
from .ring_buffer import MemoryRing

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


def default_stride(input_size, slide_crop, slide_stride) -> tuple[int, int]:
    """Slide stride for crops of the export size: the preset's stride where the export size is the preset's
    crop (the official protocol), else the same overlap ratio (e.g. 513/769 of the crop), rounded."""
    out = []
    for size, crop, stride in zip(input_size, pair(slide_crop), pair(slide_stride)):
        out.append(stride if size == crop else max(1, min(size, round(size * stride / crop))))
    return out[0], out[1]


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


class _Chunk:
    """One engine batch: a ring for its lanes and the input buffer its crops are gathered into."""

    def __init__(self, lanes, size, ring, frames):
        self.lanes = lanes        # global lane ids of the first len(lanes) batch rows; the rest are idle
        self.size = size
        self.ring = ring
        self.frames = frames      # uint8 [size, h, w, 3]


class StreamingSegmenter:
    def __init__(self, backend: Backend, manifest: dict, mode: str = "whole", stride=None,
                 return_logits: bool = False, max_gap: float | None = DEFAULT_MAX_GAP, resize: bool = False):
        if mode not in ("whole", "slide"):
            raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
        if resize and mode != "whole":
            raise ValueError("resize applies to whole mode (slide mode runs crops of the export size)")
        if max_gap is not None and not (isinstance(max_gap, (int, float)) and max_gap > 0):
            raise ValueError(f"max_gap must be a positive number of seconds or None, got {max_gap!r}")
        self.backend = backend
        self.manifest = manifest
        self.mode = mode
        self.return_logits = bool(return_logits)
        self.max_gap = max_gap
        self.resize = bool(resize)
        self.align_corners = bool(manifest.get("align_corners", False))
        self.sequence_num = int(manifest["sequence_num"])
        self.input_size = tuple(int(s) for s in manifest["input_size"])
        self.num_classes = int(manifest["num_classes"])
        self.class_names = list(manifest.get("class_names") or [])
        self.palette = [tuple(c) for c in manifest.get("palette") or []]
        if stride is None:
            stride = default_stride(self.input_size, manifest.get("slide_crop", self.input_size),
                                    manifest.get("slide_stride", self.input_size))
        self.stride = pair(stride)
        if mode == "slide" and not all(0 < s <= c for s, c in zip(self.stride, self.input_size)):
            raise ValueError(f"slide stride {self.stride} must be positive and at most the crop (the export "
                             f"size {self.input_size}), otherwise some pixels are in no window")
        self.timer = StageTimer()
        self._lock = threading.RLock()  # one push (or reset/close) at a time: see the module docstring
        self._closed = False
        self._clear()

    @classmethod
    def open(cls, directory, backend: str = "ort", device: str = "cpu", mode: str = "whole", stride=None,
             return_logits: bool = False, max_gap: float | None = DEFAULT_MAX_GAP, verify: bool = True,
             resize: bool = False, **backend_options) -> "StreamingSegmenter":
        """A segmenter over the export directory ``directory`` (manifest.json + the two ONNX files).
        ``resize``: whole mode takes frames of any size (see :func:`resize_frames`, :func:`rescale_logits`).
        ``backend_options`` go to the backend (e.g. ``threads=`` for ort)."""
        from tmanet.export.manifest import load_manifest
        manifest = load_manifest(directory, verify=verify)
        engine = get_backend(backend)(Path(directory), manifest, device, **backend_options)
        return cls(engine, manifest, mode=mode, stride=stride, return_logits=return_logits, max_gap=max_gap,
                   resize=resize)

    # -- state --------------------------------------------------------------------------------------------
    def _clear(self):
        self.api = None             # "push" or "push_batch": a segmenter serves one of them
        self.streams = None         # number of streams, fixed at the first push
        self.frame_size = None      # (H, W), fixed at the first push
        self.windows = None         # [(y1, y2, x1, x2)] per frame (one in whole mode)
        self.chunks: list[_Chunk] = []
        self._index: list[int] = []
        self._last_time: list[float | None] = []
        self._canvas = self._count = None

    @property
    def rings(self) -> list[MemoryRing]:
        return [c.ring for c in self.chunks]

    def reset(self, stream: int | None = None):
        """Start stream ``stream`` afresh (its next frame is a first frame), or forget everything: with
        ``None`` the next push may use another stream count, frame size or push method."""
        with self._lock:
            self._check_open()
            self._reset(stream)

    def _reset(self, stream):
        if stream is None:
            self._clear()
            return
        if not isinstance(stream, (int, np.integer)) or isinstance(stream, bool) or stream < 0:
            raise ValueError(f"stream must be a non-negative int, got {stream!r}")
        if self.streams is None:
            return  # nothing pushed yet: every stream starts fresh anyway
        if stream >= self.streams:
            raise ValueError(f"stream {stream} out of range: this segmenter serves {self.streams} stream(s)")
        self._restart(int(stream))

    def _restart(self, s: int):
        self._index[s] = 0
        self._last_time[s] = None
        nwin = len(self.windows)
        for lane in range(s * nwin, (s + 1) * nwin):
            chunk, row = self._lane_home(lane)
            chunk.ring.reset(row)

    def _lane_home(self, lane: int):
        size = self.chunks[0].size
        return self.chunks[lane // size], lane % size

    # -- validation (touches nothing) ---------------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise RuntimeError("this StreamingSegmenter is closed: open a new one")

    def _check_frames(self, frames, api: str) -> np.ndarray:
        frames = np.asarray(frames)
        what = "frame" if api == "push" else "frames"
        want = "(H, W, 3)" if api == "push" else "(N, H, W, 3)"
        if frames.dtype != np.uint8:
            raise ValueError(f"{what} must be uint8 RGB {want}, got dtype {frames.dtype}")
        if frames.ndim != (3 if api == "push" else 4) or frames.shape[-1] != 3:
            raise ValueError(f"{what} must be uint8 RGB {want}, got shape {frames.shape}")
        if api == "push":
            frames = frames[None]
        n, H, W = frames.shape[:3]
        eh, ew = self.input_size
        if H == 0 or W == 0:
            raise ValueError(f"empty {what}: {H}x{W} pixels")
        if self.api is not None and api != self.api:
            raise ValueError(f"this segmenter serves {self.api}(); {api}() would mix single and batched "
                             "streams (call reset() first, or use one segmenter per use)")
        if n < 1:
            raise ValueError("push_batch needs at least one frame")
        if self.streams is not None and n != self.streams:
            raise ValueError(f"got {n} frames, but this segmenter serves {self.streams} streams "
                             "(the stream count is fixed at the first push; reset() to change it)")
        b = self.backend.batch
        if self.mode == "whole":
            if (H, W) != (eh, ew) and not self.resize:
                hint = ("use slide mode (mode='slide', `--mode slide`) to run crops of the export size, "
                        if H >= eh and W >= ew else "")
                raise ValueError(f"frame size {H}x{W} differs from the export size {eh}x{ew}: {hint}resize "
                                 f"them with `--resize` (resize=True), or export at {H}x{W}")
            if b is not None and n != b:
                hint = ("push() needs a batch-1 or dynamic-batch export" if api == "push" else
                        f"push_batch() needs exactly {b} frames")
                raise ValueError(f"got {n} stream(s), but this export has a fixed batch of {b}: {hint}")
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
    def _setup(self, api: str, n: int, H: int, W: int):
        eh, ew = self.input_size
        windows = [(0, H, 0, W)] if self.mode == "whole" else slide_windows(H, W, (eh, ew), self.stride)
        lanes = n * len(windows)
        size = self.backend.batch or min(lanes, self.backend.max_batch)
        T = self.sequence_num
        h, w = (int(s) for s in self.manifest["feature_size"])
        key_shape = (int(self.manifest["key_channels"]), h, w)
        value_shape = (int(self.manifest["value_channels"]), h, w)
        chunks = []
        for start in range(0, lanes, size):
            ring = MemoryRing(T, size, key_shape, value_shape, self.backend.zeros)
            chunks.append(_Chunk(list(range(start, min(start + size, lanes))), size, ring,
                                 np.zeros((size, eh, ew, 3), np.uint8)))
        self.api, self.streams, self.frame_size, self.windows, self.chunks = api, n, (H, W), windows, chunks
        self._index = [0] * n
        self._last_time = [None] * n
        if self.mode == "slide":
            self._canvas = np.zeros((n, self.num_classes, H, W), np.float32)
            count = np.zeros((H, W), np.float32)
            for y1, y2, x1, x2 in windows:
                count[y1:y2, x1:x2] += 1
            self._count = count

    # -- pushing ------------------------------------------------------------------------------------------
    def push(self, frame, timestamp: float | None = None) -> SegmentResult:
        """Segment the next frame (uint8 RGB ``(H, W, 3)``) of the single stream."""
        with self._lock:
            self._check_open()
            return self._push(frame, None if timestamp is None else [timestamp], "push")[0]

    def push_batch(self, frames, timestamps=None) -> list[SegmentResult]:
        """Segment the next frame of each of N synchronized streams (``(N, H, W, 3)``) in one engine batch.
        ``timestamps``: one per stream, or one for all."""
        with self._lock:
            self._check_open()
            return self._push(frames, timestamps, "push_batch")

    def _push(self, frames, timestamps, api) -> list[SegmentResult]:
        timer = self.timer
        timer.begin()
        with timer("pre"):
            frames = self._check_frames(frames, api)
            times = self._check_times(timestamps, frames.shape[0])
            camera_size = frames.shape[1:3]
            rescale = self.resize and camera_size != self.input_size
            if rescale:
                frames = resize_frames(frames, self.input_size)
            n, H, W = frames.shape[:3]
            # -- valid: from here on state changes --
            if self.streams is None:
                self._setup(api, n, H, W)
            for s, t in enumerate(times):
                last = self._last_time[s]
                if self.max_gap is not None and t is not None and last is not None and \
                        not 0 <= t - last <= self.max_gap:
                    self._restart(s)  # a gap (or time going back): the memory no longer shows this scene
        need_logits = self.return_logits or self.mode == "slide" or rescale
        nwin = len(self.windows)
        masks = [None] * n
        logits_out = [None] * n
        if self.mode == "slide":
            self._canvas[:] = 0
        for chunk in self.chunks:
            with timer("pre"):
                batch = self._gather(chunk, frames)
            with timer("frame_engine"):
                qk, qv, mk, mv = self.backend.encode(batch)
            with timer("ring"):
                chunk.ring.write(mk, mv)
            with timer("head"):
                mask, logits = self.backend.head(qk, qv, chunk.ring.slot_keys(), chunk.ring.slot_values(),
                                                 logits=need_logits)
            with timer("post"):
                chunk.ring.advance()
                for row, lane in enumerate(chunk.lanes):
                    s, wi = divmod(lane, nwin)
                    if self.mode == "whole":
                        masks[s] = mask[row].copy()
                        if self.return_logits or rescale:
                            logits_out[s] = logits[row].copy()
                    else:
                        y1, y2, x1, x2 = self.windows[wi]
                        self._canvas[s, :, y1:y2, x1:x2] += logits[row]
        with timer("post"):
            if self.mode == "slide":
                for s in range(n):
                    merged = self._canvas[s] / self._count  # the official merge: mean over windows
                    masks[s] = merged.argmax(0).astype(np.uint8)
                    if self.return_logits:
                        logits_out[s] = merged
            if rescale:
                masks, logits_out = self._to_camera_size(logits_out, camera_size)
            results = []
            for s in range(n):
                results.append(SegmentResult(self._index[s], masks[s], logits_out[s], s, times[s]))
                self._index[s] += 1
                self._last_time[s] = times[s]
        return results

    def _to_camera_size(self, logits: list, size) -> tuple[list, list]:
        """Masks (and logits, when asked) at the camera size from the export-size logits of each stream."""
        full = rescale_logits(np.stack(logits), size, self.align_corners)
        masks = list(full.argmax(1).astype(np.uint8))
        return masks, list(full) if self.return_logits else [None] * len(masks)

    def _gather(self, chunk: _Chunk, frames: np.ndarray) -> np.ndarray:
        """The chunk's engine input: its lanes' crops, idle rows left as they are."""
        if self.mode == "whole" and len(chunk.lanes) == chunk.size and chunk.lanes[0] == 0 \
                and frames.shape[0] == chunk.size and frames.flags.c_contiguous:
            return frames  # the frames are the batch already: bind them as they are
        nwin = len(self.windows)
        for row, lane in enumerate(chunk.lanes):
            s, wi = divmod(lane, nwin)
            y1, y2, x1, x2 = self.windows[wi]
            chunk.frames[row] = frames[s, y1:y2, x1:x2]
        return chunk.frames

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
                f"{self.input_size[1]}, T={self.sequence_num}, streams={self.streams})")
