"""INT8 in the ONNX graph (explicit Q/DQ from ModelOpt's ONNX PTQ) and the calibration data of both engines.

Calibration data are real: frames from a video, an image folder or a ``.npy`` clip for the frame engine, and
for the memory head the memory encodings those frames produce when streamed *in order* through the float32
frame graph into the runtime's :class:`~tmanet.memory.MemoryRing` (slot i = frame t-T+i, oldest
first; during warm-up the slots clamp to the stream's first frame). So the head is calibrated on exactly the
inputs it sees in deployment, warm-up frames included.

Frames larger than the export size are cut into the runtime's slide windows; each window position is its own
stream with its own memory, as in the runtime's slide mode. The samples live in ``.npy`` memory maps in a work
folder (at 1024x2048 a head sample is ~130 MB), read batch by batch by a ``CalibrationDataReader``.
"""
from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tmanet.manifest import FRAME_ENCODER, ExportSpec, head_input_names
from tmanet.memory import MemoryStepper
from tmanet.onnx_session import cpu_session
from tmanet.io.driving_logs import split_topic
from tmanet.io.video import open_frames
from tmanet.model.slide import default_stride, slide_windows

from .precision import (PrecisionError, attention_nodes, check_io_kept, in_module, module_names, module_of,
                        name_unnamed_nodes, quiet, read_unquantized_adds, require_modelopt, summarize, tools_log_level)

log = logging.getLogger("tmanet")

CALIBRATION_METHODS = ("entropy", "max")  # ModelOpt int8: entropy (its default) or max (min/max ranges)
DEFAULT_CALIBRATION_FRAMES = 64


class CalibrationDataError(ValueError):
    """The frames given for calibration cannot be used with this export."""


# -- frames -------------------------------------------------------------------------------------------------
@dataclass
class FrameStreams:
    """The calibration frames as streams of export-size crops: ``streams[s]`` is ``(F, H, W, 3)`` uint8, the
    crops at window ``windows[s]`` of every frame (one stream, the whole frame, when sizes match)."""
    streams: list
    windows: list
    clip: np.ndarray
    source: str
    kind: str
    frame_size: tuple

    @property
    def frames(self) -> int:
        return len(self.streams[0])

    def describe(self) -> dict:
        return {"source": self.source, "kind": self.kind, "frames": self.frames,
                "frame_size": list(self.frame_size), "streams": len(self.streams),
                "windows": [list(w) for w in self.windows], "samples": self.frames * len(self.streams)}


def read_clip(source, num: int | None = None) -> tuple[np.ndarray, str]:
    """The first ``num`` frames of a video / image folder / ``.npy`` clip (or an array) as ``(F, H, W, 3)``
    uint8, and what kind of source it was."""
    if isinstance(source, np.ndarray):
        clip = source if num is None else source[:num]
        kind = "array"
    else:
        path = Path(source)
        if not split_topic(path)[0].exists():  # a ROS bag may name a topic: drive.mcap:/cam/front
            raise FileNotFoundError(f"frames source not found: {path}")
        frames_source = open_frames(path, max_frames=num)
        frames = [f for f, _ in frames_source]
        if not frames:
            raise CalibrationDataError(f"{path}: no frames")
        clip, kind = np.stack(frames), frames_source.kind
    if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3:
        raise CalibrationDataError(f"frames must be uint8 RGB (F, H, W, 3), got {clip.dtype} {clip.shape}")
    if len(clip) == 0:
        raise CalibrationDataError("no frames")
    return clip, kind


def frame_streams(source, input_size, spec: ExportSpec | None = None, num: int | None = None) -> FrameStreams:
    """Calibration streams for an export of ``input_size`` (H, W): whole frames at the export size, slide
    windows (the runtime's default stride, from ``spec``'s slide crop and stride) for larger frames; smaller
    frames are an error."""
    clip, kind = read_clip(source, num)
    H, W = (int(s) for s in input_size)
    fh, fw = clip.shape[1:3]
    if fh < H or fw < W:
        raise CalibrationDataError(f"frames are {fh}x{fw} (HxW), smaller than the export size {H}x{W}: give "
                                   "frames of at least the export size")
    if (fh, fw) == (H, W):
        windows = [(0, H, 0, W)]
    else:
        stride = default_stride((H, W), *((spec.slide_crop, spec.slide_stride) if spec else ()))
        windows = slide_windows(fh, fw, (H, W), stride)
    streams = [clip[:, y1:y2, x1:x2] for y1, y2, x1, x2 in windows]
    name = "<array>" if isinstance(source, np.ndarray) else str(Path(source).resolve())
    return FrameStreams(streams, windows, clip, name, kind, (fh, fw))


# -- calibration samples ------------------------------------------------------------------------------------
@dataclass
class CalibrationSamples:
    """One sample per (stream, frame): ``frames`` for the frame graph and the memory head's inputs, each a
    ``(S, ...)`` array (memory-mapped) whose rows are single-batch samples. ``index[k] = (stream, frame)``."""
    frames: np.ndarray
    head: dict | None
    index: list
    directory: Path | None = None
    memory_frames: int = 0

    def __len__(self):
        return len(self.index)

    def graph_inputs(self, graph: str) -> dict:
        return {"frames": self.frames} if graph == "frame_encoder" else self.head


def engine_batch(spec: ExportSpec) -> int:
    """Batch the graphs are run with: the fixed export batch, or 1 for a dynamic-batch export."""
    return 1 if spec.dynamic_batch else spec.batch


def build_samples(export_dir, spec: ExportSpec, streams: FrameStreams, workdir=None, with_head: bool = True,
                  progress: bool = True) -> CalibrationSamples:
    """Stream every calibration stream in order through the float32 frame graph of ``export_dir``; record
    each frame and, with ``with_head``, the memory head's inputs for it (the ring's slots: frame t-T+i for
    slot i, clamped to the stream's first frame). Arrays are memory maps in ``workdir`` when given.

    Streams run as lanes of the engine batch (a fixed batch of B runs B streams at once, idle lanes repeat
    a real stream and are dropped), like the runtime."""
    from tqdm import tqdm

    T = spec.memory_frames
    H, W = spec.input_size
    h, w = spec.feature_size
    ck, cv = spec.key_channels, spec.value_channels
    nstreams, F = len(streams.streams), streams.frames
    S = nstreams * F
    workdir = Path(workdir) if workdir is not None else None

    def array(name, shape, dtype):
        if workdir is None:
            return np.empty(shape, dtype)
        return np.lib.format.open_memmap(workdir / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)

    frames_out = array("frames", (S, H, W, 3), np.uint8)
    head = None
    if with_head:
        shapes = {"query_key": (ck, h, w), "query_value": (cv, h, w)}
        shapes.update({f"memory_key_{i}": (ck, h, w) for i in range(T)})
        shapes.update({f"memory_value_{i}": (cv, h, w) for i in range(T)})
        head = {n: array(n, (S, *shapes[n]), np.float32) for n in head_input_names(T)}
    index = [(s, t) for s in range(nstreams) for t in range(F)]
    B = engine_batch(spec)
    session = cpu_session(Path(export_dir) / FRAME_ENCODER) if with_head else None
    bar = tqdm(total=S, desc="calibration samples", unit="sample", disable=not progress or not with_head)
    encode = None if session is None else (
        lambda batch: session.run(["query_key", "query_value", "memory_key", "memory_value"], {"frames": batch}))
    for first in range(0, nstreams, B):
        lanes = list(range(first, min(first + B, nstreams)))
        padded = lanes + [lanes[0]] * (B - len(lanes))  # idle lanes: any real stream, outputs dropped

        def record(qk, qv, keys, values):  # the head's inputs of frame t, one sample per real lane
            for row, s in enumerate(lanes):
                k = s * F + t
                head["query_key"][k] = qk[row]
                head["query_value"][k] = qv[row]
                for i in range(T):
                    head[f"memory_key_{i}"][k] = keys[i][row]
                    head[f"memory_value_{i}"][k] = values[i][row]

        stepper = MemoryStepper(encode, record)  # a fresh ring per group: the first write is the warm-up
        for t in range(F):
            batch = np.ascontiguousarray(np.stack([streams.streams[s][t] for s in padded]))
            for row, s in enumerate(lanes):
                frames_out[s * F + t] = batch[row]
            if with_head:
                stepper.step(batch)
                bar.update(len(lanes))
    bar.close()
    return CalibrationSamples(frames_out, head, index, workdir, T)


class SampleReader:
    """ONNX Runtime ``CalibrationDataReader`` over sample arrays: batches of ``batch`` consecutive samples
    (the last batch wraps around to the first samples when ``batch`` does not divide the count). Read
    lazily, so memory-mapped samples stay on disk."""

    def __init__(self, arrays: dict, batch: int = 1, limit: int | None = None):
        self.arrays = arrays
        self.batch = int(batch)
        count = len(next(iter(arrays.values())))
        self.count = count if limit is None else min(count, limit)
        self.batches = -(-self.count // self.batch)
        self._next = 0

    def __len__(self):
        return self.batches

    def batch_at(self, i: int) -> dict:
        rows = [(i * self.batch + r) % self.count for r in range(self.batch)]
        out = {}
        for name, a in self.arrays.items():
            start = rows[0]
            block = a[start:start + self.batch] if rows[-1] == start + self.batch - 1 else a[rows]
            out[name] = np.ascontiguousarray(block)
        return out

    def get_next(self):
        if self._next >= self.batches:
            return None
        self._next += 1
        return self.batch_at(self._next - 1)

    def get_first(self):
        return self.batch_at(0)

    def rewind(self):
        self._next = 0

    def set_range(self, start_index: int, end_index: int):
        raise NotImplementedError("SampleReader reads all batches in order")


def write_reference_npz(arrays: dict, directory, batch: int, count: int) -> Path:
    """``count`` batches spread evenly over the samples as ``.npz`` files in ``directory`` (AutoCast's
    reference inputs; it keeps every intermediate tensor of every batch in memory, so a few suffice)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    reader = SampleReader(arrays, batch)
    picks = np.unique(np.linspace(0, len(reader) - 1, num=min(count, len(reader))).round().astype(int))
    for j, i in enumerate(picks):
        np.savez(directory / f"batch_{j:04d}.npz", **reader.batch_at(int(i)))
    return directory


# -- INT8 ---------------------------------------------------------------------------------------------------
def quantize_int8(src, dst, reader: SampleReader, method: str = "entropy", high_precision: str = "fp16",
                  keep_attention_fp32: bool = True, quantize_residual: bool = False, keep_modules=(),
                  workdir=None) -> dict:
    """Write the INT8 (explicit Q/DQ) version of the float32 graph ``src`` to ``dst`` with ModelOpt's ONNX
    PTQ, calibrated on ``reader``'s batches. Unquantized parts run in ``high_precision`` (fp16: ModelOpt's
    default and TensorRT's usual pairing; fp32). ``keep_attention_fp32`` keeps the memory read's
    MatMul/Softmax out of quantization and, with float16, in float32. Unless ``quantize_residual`` (ModelOpt's
    default placement), the residual shortcuts stay high precision: additions read unquantized inputs (see
    :func:`read_unquantized_adds`) and ``downsample`` modules are not quantized. ``keep_modules``: more torch
    module paths ('backbone.layer1') whose nodes stay unquantized. I/O names, types and shapes are kept."""
    import onnx
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    if high_precision not in ("fp16", "fp32"):
        raise ValueError(f"high_precision must be 'fp16' or 'fp32', got {high_precision!r}")
    require_modelopt()
    src, dst = Path(src), Path(dst)
    source = onnx.load(str(src))
    renamed = name_unnamed_nodes(source)  # exclusions match node names
    plan = _int8_plan(source, src.name, high_precision, keep_attention_fp32, quantize_residual, keep_modules)
    quantized = _modelopt_ptq(source if renamed else src, src.name, reader, method, high_precision, plan,
                              quantize_residual, workdir)
    attention, shortcuts, kept = plan["attention"], plan["shortcuts"], plan["kept"]
    rewired = 0 if quantize_residual else read_unquantized_adds(quantized)
    check_io_kept(source, quantized, f"ModelOpt PTQ on {dst.name}")
    info = summarize(quantized)
    if not info["quantize_linear"]:
        raise PrecisionError(f"ModelOpt inserted no Q/DQ nodes into {src.name}: nothing was quantized")
    onnx.save(quantized, str(dst))
    info.update({"tool": "modelopt.onnx.quantization.quantize", "mode": "int8", "calibration_method": method,
                 "calibration_batches": len(reader), "high_precision": high_precision,
                 "keep_attention_fp32": keep_attention_fp32 and bool(attention), "attention_nodes": attention,
                 "residual": ({"precision": "int8"} if quantize_residual else
                              {"precision": high_precision, "addition_inputs": rewired, "shortcut_modules": shortcuts}),
                 "kept_modules": kept,
                 "quantized_nodes": _quantized_nodes(quantized)})
    log.info("%s: int8 Q/DQ on %d nodes (%d batches, %s calibration), rest %s%s", dst.name,
             len(info["quantized_nodes"]), len(reader), method, high_precision,
             "" if quantize_residual or not (rewired or shortcuts) else
             f" (residual shortcuts too: {rewired} addition inputs, {len(shortcuts)} downsample modules)")
    return info


# What the trt recipe keeps at the high precision unless --int8-keep says otherwise: the high-resolution,
# few-channel layers, where int8 rounding weighs most against the signal. Demo model at 256x512, calibrated on
# four varied clips, worst of four unseen clips: 98.90 % without, 99.06 % with (docs/CPU_INT8.md).
TRT_DEFAULT_KEEP = ("backbone.stem", "backbone.layer1")


def _int8_plan(source, name: str, high_precision: str, keep_attention_fp32: bool, quantize_residual: bool,
               keep_modules) -> dict:
    """What stays out of INT8 in ``source``: ``exclude`` (node-name patterns for ModelOpt), ``keep_fp32_ops``
    (op types kept float32 in a float16 graph), and for the report the ``attention`` nodes, the residual
    ``shortcuts`` modules and the nodes of each ``kept`` module."""
    attention = attention_nodes(source)
    keep_fp32_ops = None
    # The residual shortcuts carry every block's output to the next: their rounding accumulates through the
    # network, while their convolutions (1x1 downsamples) are a few percent of the work.
    shortcuts = [] if quantize_residual else [m for m in module_names(source) if m.split(".")[-1] == "downsample"]
    node_modules = {n.name: module_of(n) for n in source.graph.node}
    kept = {m: [n for n, module in node_modules.items() if in_module(module, m)] for m in keep_modules}
    unquantized = {n for n, module in node_modules.items()
                   if any(in_module(module, m) for m in [*keep_modules, *shortcuts])}
    exclude = [f"^{re.escape(n)}$" for n in node_modules if n in unquantized]
    if keep_attention_fp32 and attention:
        # Not quantized (an int8 softmax has 1/127 resolution; ModelOpt only skips attention MatMuls beyond
        # 512 positions) and, in a float16 graph, kept float32: by op type, ModelOpt's option, which in our
        # exports are the attention read's only MatMul/Softmax nodes (and, with the place read, its only
        # ReduceSums: its q.k sums and weighted sum).
        exclude += [f"^{re.escape(n)}$" for n in attention]  # ModelOpt reads them as regular expressions
        if high_precision == "fp16":
            keep_fp32_ops = ["MatMul", "Softmax"] + (["ReduceSum"] if any(
                n.op_type == "ReduceSum" and n.name in attention for n in source.graph.node) else [])
            other = [n.name for n in source.graph.node if n.op_type in keep_fp32_ops and n.name not in attention]
            if other:
                log.warning("%s: %s outside the attention read also stay float32: %s", name, "/".join(keep_fp32_ops),
                            other)
    return {"exclude": exclude, "keep_fp32_ops": keep_fp32_ops, "attention": attention, "shortcuts": shortcuts,
            "kept": kept}


def _modelopt_ptq(source, name: str, reader: SampleReader, method: str, high_precision: str, plan: dict,
                  quantize_residual: bool, workdir):
    """ModelOpt's ONNX PTQ of ``source`` (an ONNX model, or the path of an unchanged file) as a loaded model."""
    import tempfile

    import onnx
    from modelopt.onnx.quantization import quantize
    with tempfile.TemporaryDirectory(dir=workdir, prefix="ptq-") as tmp:
        # quantize() rewrites its input file and leaves intermediates beside it: give it a private copy.
        work = Path(tmp) / name
        if isinstance(source, Path):
            shutil.copyfile(source, work)
        else:
            onnx.save(source, str(work))
        reader.rewind()
        with quiet():
            quantize(onnx_path=str(work), quantize_mode="int8", calibration_data_reader=reader,
                     calibration_method=method, calibration_eps=["cpu"], output_path=str(Path(tmp) / "out.onnx"),
                     high_precision_dtype=high_precision, op_types_to_exclude_fp16=plan["keep_fp32_ops"],
                     op_types_to_exclude=None if quantize_residual else ["Add"],
                     nodes_to_exclude=plan["exclude"] or None,
                     log_level=tools_log_level())
        return onnx.load(str(Path(tmp) / "out.onnx"))

def _quantized_nodes(model) -> list[str]:
    """Compute nodes fed by a DequantizeLinear (through Casts): what TensorRT runs in INT8."""
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found = set()
    frontier = [o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output]
    while frontier:
        for n in consumers.get(frontier.pop(), []):
            if n.op_type == "Cast":
                frontier.extend(n.output)
            elif n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                found.add(n.name)
    return sorted(found)


__all__ = ["FrameStreams", "CalibrationSamples", "SampleReader", "read_clip", "frame_streams", "build_samples",
           "write_reference_npz", "quantize_int8", "engine_batch", "CALIBRATION_METHODS"]
