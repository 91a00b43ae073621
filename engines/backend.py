"""The TensorRT backend of the streaming runtime (``backend="trt"``, an entry point of the backend registry);
``tmanet bench --backend trt`` reads its CUDA-event timings (``profile=True``).

Design (one object per engine, buffers allocated once, addresses rotated instead of data copied):

- Device memory, streams, events and CUDA graphs come from **torch CUDA tensors**. The machines we deploy to
  have torch with CUDA (the reference backend needs it anyway); torch gives all four from one dependency,
  with a caching allocator and pinned host memory, and its tensors are what ``MemoryRing`` already handles.
  ``polygraphy.cuda`` has device arrays and streams but no events or graph capture, and pycuda does not build
  without the driver. The ring therefore lives in torch CUDA tensors (:meth:`TrtBackend.zeros`).
- Each engine has one execution context whose I/O tensors are bound by address
  (``context.set_tensor_address``). The head's ``memory_key_i`` / ``memory_value_i`` are bound to the ring's
  slot views, so the T memory slots rotate by changing T+T pointers per frame; nothing is copied.
- One CUDA stream per backend. Only the uint8 frames go up (pinned host -> device) and the uint8 mask comes
  down; the float logits come down only when asked for.
- CUDA graphs (optional, on by default): a captured graph bakes in the addresses it was captured with, and the
  head's input addresses change every frame with the ring phase. Re-capturing every frame would cost more than
  it saves, and copying the slots into fixed buffers would undo the zero-copy ring, so we keep **one graph per
  distinct set of bound addresses**: T+1 ring phases per ring (and per batch size), captured the first time
  each appears and replayed after that. Each graph is small (two engines' kernel lists) and they all share
  the context's activation memory, which is safe because they replay in order on one stream.
- Engines are loaded only after their files match their sidecar SHA256 and the sidecar matches this machine's
  TensorRT version and GPU (:func:`tmanet.engines.versioning.check_compatible`): a mismatched engine fails with
  a sentence that says what differs, instead of TensorRT's deserialization error.

The segmenter (:mod:`tmanet.runtime.segmenter`) runs torch ops on the ring (its write) on torch's current
stream; our stream waits for that stream before each enqueue and the current stream waits for ours after the
frame engine, so the two stay ordered without host synchronisation.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from tmanet.manifest import ENCODER_OUTPUTS, HEAD_OUTPUTS, head_input_names
from tmanet.runtime.address_cache import AddressKeyedCache
from tmanet.runtime.backends import Backend, BackendUnavailable, Option

from .build import TensorRTNotInstalled, require_tensorrt, trt_dtype_name
from .metadata import (ENGINE_NAMES, EngineIntegrityError, current_gpu, load_engine_metadata,
                       read_engines_manifest)
from .versioning import check_compatible

log = logging.getLogger("tmanet")


class TensorRTBackendUnavailable(TensorRTNotInstalled, BackendUnavailable):
    """TensorRT missing, seen through the runtime's backend interface (a UserError for the CLI as well)."""


class TrtBackendError(BackendUnavailable):
    """The TensorRT backend cannot run here (no CUDA device, engines that do not fit the export)."""


_TRT_LOGGER = None


def _trt_logger(trt):
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        _TRT_LOGGER = trt.Logger(trt.Logger.WARNING)
    return _TRT_LOGGER


class TrtEngine:
    """One deserialized engine: its execution context, I/O tensor table, bound addresses and CUDA graphs."""

    def __init__(self, trt, torch, path: Path, name: str, device, stream):
        self.trt, self.torch, self.name, self.device, self.stream = trt, torch, name, device, stream
        runtime = trt.Runtime(_trt_logger(trt))
        with torch.cuda.device(device):
            self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise EngineIntegrityError(f"TensorRT could not deserialize {path} although its metadata matches "
                                           "this machine: rebuild with `tmanet build`")
            self.context = self.engine.create_execution_context()
        self.runtime = runtime   # the engine must not outlive its runtime
        self.inputs, self.outputs = {}, {}
        for i in range(self.engine.num_io_tensors):
            tname = self.engine.get_tensor_name(i)
            entry = {"dtype": getattr(torch, trt_dtype_name(self.engine.get_tensor_dtype(tname))),
                     "shape": tuple(int(d) for d in self.engine.get_tensor_shape(tname))}
            if self.engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT:
                if -1 in entry["shape"]:
                    entry["profile"] = [tuple(int(d) for d in s)
                                        for s in self.engine.get_tensor_profile_shape(tname, 0)]
                self.inputs[tname] = entry
            else:
                self.outputs[tname] = entry
        self._reset_run_state()

    def _reset_run_state(self):
        self.batch_shape = None
        self.shape_changed = False   # set by set_batch: the next run is eager (see run)
        self.bound = {}
        self.graphs = AddressKeyedCache()  # bound addresses -> CUDA graph
        self.graphs_ok = True

    def batch_range(self) -> tuple[int, int]:
        first = next(iter(self.inputs.values()))
        if "profile" in first:
            return first["profile"][0][0], first["profile"][2][0]
        return first["shape"][0], first["shape"][0]

    def set_batch(self, b: int):
        if self.batch_shape == b:
            return
        for tname, entry in self.inputs.items():
            if "profile" in entry:
                if not self.context.set_input_shape(tname, (b, *entry["shape"][1:])):
                    raise ValueError(f"{self.name}: batch {b} is outside the engine's profile {self.batch_range()}")
        self.batch_shape = b
        self.shape_changed = True

    def output_shape(self, tname: str, b: int) -> tuple:
        return (b, *self.outputs[tname]["shape"][1:])

    def bind(self, tensors: dict):
        """Bind each named tensor's address (a torch CUDA tensor); only changed addresses are set again.
        TensorRT needs 256-byte aligned addresses: see :func:`aligned_for_binding`."""
        for tname, t in tensors.items():
            ptr = t.data_ptr()
            if self.bound.get(tname) != ptr:
                if not self.context.set_tensor_address(tname, ptr):
                    raise RuntimeError(f"{self.name}: TensorRT refused the address of {tname}")
                self.bound[tname] = ptr

    def _enqueue(self):
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"{self.name}: TensorRT enqueue failed (see the TensorRT log above)")

    def run(self, use_graph: bool):
        """Enqueue on the stream, as a CUDA graph replay when asked (one graph per set of bound addresses).
        After a shape change the context runs once eagerly first: TensorRT finishes its per-shape setup in
        an enqueue, which a replay would skip."""
        if not (use_graph and self.graphs_ok):
            self._enqueue()
            return
        key = (self.batch_shape, tuple(sorted(self.bound.items())))
        graph = self.graphs.get(key)
        if graph is not None and not self.shape_changed:
            graph.replay()
            return
        # This frame's result, eagerly (and TensorRT's deferred per-shape setup, outside any capture).
        self._enqueue()
        self.shape_changed = False
        if graph is None:
            self._capture(key)

    def _capture(self, key):
        """Capture one enqueue as trtexec does (thread-local capture mode, so other threads' CUDA calls do not
        invalidate it). An enqueue that fails inside the capture is recorded, not raised: the graph is
        dropped, the CUDA error cleared, and this engine runs eagerly from then on."""
        torch = self.torch
        graph = torch.cuda.CUDAGraph()
        enqueued, error = False, None
        try:
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                enqueued = bool(self.context.execute_async_v3(self.stream.cuda_stream))
        except RuntimeError as e:   # the capture itself was invalidated (torch raises at its end)
            error = e
        if error is not None or not enqueued:
            _clear_cuda_error()
            reason = error or "execute_async_v3 returned False during capture"
            log.warning("%s: CUDA graph capture failed (%s): running without CUDA graphs", self.name, reason)
            self.graphs_ok = False
            return
        self.graphs.put(key, graph)

    def close(self):
        self.graphs.clear()
        self.context = self.engine = self.runtime = None


def _clear_cuda_error():
    """Reset the CUDA runtime's last error after a failed capture (cudaGetLastError clears it), through
    Polygraphy's libcudart wrapper; if that cannot be loaded there is nothing of ours to clear."""
    try:
        from polygraphy import cuda
        cuda.wrapper().handle.cudaGetLastError()
    except Exception as e:   # no libcudart found by Polygraphy: the error stays for torch to report
        log.debug("could not clear the CUDA error: %s", e)


TRT_ALIGNMENT = 256   # bytes: set_tensor_address wants I/O addresses aligned to this


def aligned_for_binding(tensors: dict, staging: dict, warned: set, engine: str = "memory_head") -> dict:
    """``tensors`` with every one whose address is not 256-byte aligned replaced by an aligned copy (a staging
    buffer per name, allocated once), with a one-line warning per
    name. The copy runs on the current stream; ring slot views are aligned for the usual sizes, so this is a
    fallback, not the normal path."""
    out = {}
    for name, t in tensors.items():
        if t.data_ptr() % TRT_ALIGNMENT == 0:
            out[name] = t
            continue
        if name not in warned:
            warned.add(name)
            log.warning("%s input %s is not %d-byte aligned (address %#x): copying it into an aligned buffer "
                        "each frame", engine, name, TRT_ALIGNMENT, t.data_ptr())
        buf = staging.get(name)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = staging[name] = _aligned_empty(t)
        buf.copy_(t)
        out[name] = buf
    return out


def _aligned_empty(like):
    """An uninitialised tensor like ``like`` at a 256-byte aligned address, whatever the allocator's alignment."""
    pad = TRT_ALIGNMENT // like.element_size()
    raw = like.new_empty(like.numel() + pad)
    offset = (-raw.data_ptr() % TRT_ALIGNMENT) // like.element_size()
    return raw[offset:offset + like.numel()].view(like.shape)


class TrtBackend(Backend):
    """``backend="trt"``: the two TensorRT engines built by ``tmanet build`` (in ``engine_dir``, default the
    export directory) on a CUDA device, buffers in torch CUDA memory, optional CUDA graphs."""
    name = "trt"
    summary = "TensorRT engines built by `tmanet build` (NVIDIA GPU)"
    options = (Option("--cuda-graphs", "cuda_graphs", "replay the engines as captured CUDA graphs (on by default)",
                      needs="a CUDA backend"),)
    bench_options = {"profile": True}   # CUDA-event timings per engine
    devices = ("cuda",)

    def __init__(self, export_dir, spec, device="cuda", engine_dir=None, cuda_graphs: bool = True,
                 profile: bool = False, threads: int | None = None):
        # ``threads`` (CPU threads of the ort/torch backends) is accepted so that one option set opens any
        # backend; the work here is on the GPU.
        trt = _require_tensorrt_for_backend()
        super().__init__(export_dir, spec, _cuda_device_name(device))
        try:
            import torch
        except ImportError:
            torch = None
        if torch is None or not torch.cuda.is_available():
            raise TrtBackendError("the trt backend keeps its buffers in torch CUDA tensors, but torch sees no CUDA "
                                  "device here (torch.cuda.is_available() is False)")
        self.trt, self.torch = trt, torch
        self.device_obj = torch.device(self.device)
        self.engine_dir = Path(engine_dir) if engine_dir is not None else self.export_dir
        self.cuda_graphs = bool(cuda_graphs)
        self.profile = bool(profile)
        self.warnings = []
        self.metadata = self._checked_metadata(spec)
        self.stream = torch.cuda.Stream(device=self.device_obj)
        self.encoder = TrtEngine(trt, torch, self.engine_paths["frame_encoder"], "frame_encoder", self.device_obj,
                                 self.stream)
        self.memory_head = TrtEngine(trt, torch, self.engine_paths["memory_head"], "memory_head", self.device_obj,
                                     self.stream)
        self._check_io()
        lo, hi = self.encoder.batch_range()
        self.min_batch = lo
        self.batch, self.max_batch = (lo, lo) if lo == hi else (None, hi)
        self._buffers = {}
        self._staging, self._misaligned = {}, set()   # aligned copies of misaligned head inputs (rare)
        self._h2d_done = None       # event: the pinned frame buffer may be overwritten once it has fired
        self.last_timing = {}       # with profile=True: CUDA-event and host-enqueue milliseconds of the last frame
        self._marks, self._enqueue_s = {}, {}

    # -- loading ------------------------------------------------------------------------------------------
    def _checked_metadata(self, spec) -> dict:
        """Sidecars of both engines, checked (file SHA256, TensorRT, GPU, source ONNX) before deserialising."""
        read_engines_manifest(self.engine_dir)
        gpu_name, cc = current_gpu(self.device_obj.index or 0)
        metas, self.engine_paths = {}, {}
        for name in ENGINE_NAMES:
            path, meta = load_engine_metadata(self.engine_dir, name)
            self.warnings += check_compatible(meta, self.trt.__version__, gpu_name, cc)
            onnx_entry = spec.files.get(f"{name}.onnx")
            if onnx_entry and onnx_entry.get("sha256") != meta["source_onnx"]["sha256"]:
                raise EngineIntegrityError(f"{path} was built from another {name}.onnx than the one in "
                                           f"{self.export_dir}: rebuild with `tmanet build {self.export_dir}`")
            metas[name], self.engine_paths[name] = meta, path
        for w in self.warnings:
            log.warning("%s", w)
        return metas

    def _check_io(self):
        T = self.memory_frames
        enc, head = self.encoder, self.memory_head
        problems = []
        if list(enc.inputs) != ["frames"] or set(enc.outputs) != set(ENCODER_OUTPUTS):
            problems.append(f"frame_encoder I/O {list(enc.inputs)} -> {sorted(enc.outputs)}")
        if set(head.inputs) != set(head_input_names(T)) or set(head.outputs) != set(HEAD_OUTPUTS):
            problems.append(f"memory_head I/O {sorted(head.inputs)} -> {sorted(head.outputs)}")
        if problems:
            raise TrtBackendError("engines do not match the TMANet contract (T=%d): %s" % (T, "; ".join(problems)))
        H, W = self.input_size
        if enc.inputs["frames"]["shape"][1:] != (H, W, 3) or enc.inputs["frames"]["dtype"] != self.torch.uint8:
            raise TrtBackendError(f"frame_encoder takes {enc.inputs['frames']['dtype']} "
                                  f"{enc.inputs['frames']['shape']}, the export is uint8 [B,{H},{W},3]")
        # The ring holds what the frame engine writes and the head reads: both must agree on its dtype.
        self.memory_dtype = enc.outputs["memory_key"]["dtype"]
        for tname in head_input_names(T):
            src = tname if tname.startswith("query") else tname.rsplit("_", 1)[0]   # memory_key_i <- memory_key
            if head.inputs[tname]["dtype"] != enc.outputs[src]["dtype"]:
                raise TrtBackendError(f"memory_head input {tname} is {head.inputs[tname]['dtype']} but the "
                                      f"frame_encoder writes {enc.outputs[src]['dtype']}: build both engines from "
                                      "ONNX files of matching I/O precision")
        if enc.batch_range() != head.batch_range():
            raise TrtBackendError(f"batch ranges differ: frame_encoder {enc.batch_range()}, memory_head "
                                  f"{head.batch_range()}")

    # -- buffers --------------------------------------------------------------------------------------------
    def zeros(self, shape):
        """Ring memory: zeros on the device, in the dtype the engines exchange memory encodings in."""
        return self.torch.zeros(shape, dtype=self.memory_dtype, device=self.device_obj)

    def _bufs(self, b: int) -> dict:
        if b not in self._buffers:
            torch, dev = self.torch, self.device_obj
            H, W = self.input_size
            bufs = {"frames": torch.empty((b, H, W, 3), dtype=torch.uint8, device=dev),
                    "frames_host": torch.empty((b, H, W, 3), dtype=torch.uint8, pin_memory=True)}
            for tname in ENCODER_OUTPUTS:
                bufs[tname] = torch.empty(self.encoder.output_shape(tname, b),
                                          dtype=self.encoder.outputs[tname]["dtype"], device=dev)
            for tname in HEAD_OUTPUTS:
                shape, dtype = self.memory_head.output_shape(tname, b), self.memory_head.outputs[tname]["dtype"]
                bufs[tname] = torch.empty(shape, dtype=dtype, device=dev)
                bufs[tname + "_host"] = torch.empty(shape, dtype=dtype, pin_memory=True)
            self._buffers[b] = bufs
        return self._buffers[b]

    def _check_batch(self, b: int):
        lo = self.min_batch
        hi = self.batch or self.max_batch
        if not lo <= b <= hi:
            raise ValueError(f"batch {b} is outside the engines' batch range {lo}..{hi}")

    def _mark(self, label: str):
        """With ``profile``: a timing event recorded on the stream now (read after the head's synchronize)."""
        if self.profile:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record(self.stream)
            self._marks[label] = event

    def _collect_timing(self):
        m = self._marks
        span = (lambda a, b: m[a].elapsed_time(m[b]) if a in m and b in m else None)
        encoder, head = span("encoder", "encoder_end"), span("head", "head_end")
        enqueue = [self._enqueue_s.get(k) for k in ("encoder", "head")]
        self.last_timing = {"h2d_ms": span("h2d", "encoder"), "frame_encoder_ms": encoder, "memory_head_ms": head,
                            "d2h_ms": span("head_end", "d2h_end"),
                            "gpu_compute_ms": encoder + head if None not in (encoder, head) else None,
                            "enqueue_ms": sum(enqueue) * 1e3 if None not in enqueue else None}
        self._marks = {}

    # -- the interface ------------------------------------------------------------------------------------
    def encode(self, frames: np.ndarray):
        torch = self.torch
        frames = np.asarray(frames)
        H, W = self.input_size
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (H, W, 3):
            raise ValueError(f"frames must be uint8 [B,{H},{W},3], got {frames.dtype} {frames.shape}")
        b = frames.shape[0]
        self._check_batch(b)
        bufs = self._bufs(b)
        if self._h2d_done is not None:
            self._h2d_done.synchronize()   # the previous upload has left the pinned buffer
        bufs["frames_host"].numpy()[...] = frames
        current = torch.cuda.current_stream(self.device_obj)
        with torch.cuda.device(self.device_obj), torch.cuda.stream(self.stream):
            self.stream.wait_stream(current)
            self._mark("h2d")
            bufs["frames"].copy_(bufs["frames_host"], non_blocking=True)
            self._h2d_done = self.stream.record_event()
            self._mark("encoder")
            self.encoder.set_batch(b)
            self.encoder.bind({"frames": bufs["frames"], **{n: bufs[n] for n in ENCODER_OUTPUTS}})
            t0 = time.perf_counter()
            self.encoder.run(self.cuda_graphs)
            self._enqueue_s["encoder"] = time.perf_counter() - t0
            self._mark("encoder_end")
        current.wait_stream(self.stream)   # the segmenter's ring write (torch, current stream) comes next
        return tuple(bufs[n] for n in ENCODER_OUTPUTS)

    def head(self, query_key, query_value, slot_keys, slot_values, return_logits: bool = True):
        torch = self.torch
        T = self.memory_frames
        if len(slot_keys) != T or len(slot_values) != T:
            raise ValueError(f"expected {T} memory slots, got {len(slot_keys)} keys and {len(slot_values)} values")
        b = query_key.shape[0]
        self._check_batch(b)
        bufs = self._bufs(b)
        inputs = dict(zip(head_input_names(T), [query_key, query_value, *slot_keys, *slot_values]))
        for tname, t in inputs.items():
            want = self.memory_head.inputs[tname]
            if not (isinstance(t, torch.Tensor) and t.device == self.device_obj and t.is_contiguous()
                    and t.dtype == want["dtype"] and tuple(t.shape) == (b, *want["shape"][1:])):
                raise ValueError(f"memory_head input {tname} must be a contiguous {want['dtype']} tensor "
                                 f"[{b}, {', '.join(map(str, want['shape'][1:]))}] on {self.device_obj}")
        current = torch.cuda.current_stream(self.device_obj)
        with torch.cuda.device(self.device_obj), torch.cuda.stream(self.stream):
            self.stream.wait_stream(current)    # the ring write on the current stream must have landed
            self._mark("head")
            self.memory_head.set_batch(b)
            inputs = aligned_for_binding(inputs, self._staging, self._misaligned)
            self.memory_head.bind({**inputs, "mask": bufs["mask"], "logits": bufs["logits"]})
            t0 = time.perf_counter()
            self.memory_head.run(self.cuda_graphs)
            self._enqueue_s["head"] = time.perf_counter() - t0
            self._mark("head_end")
            bufs["mask_host"].copy_(bufs["mask"], non_blocking=True)
            if return_logits:
                bufs["logits_host"].copy_(bufs["logits"], non_blocking=True)
            self._mark("d2h_end")
        self.stream.synchronize()
        if self.profile:
            self._collect_timing()
        mask = bufs["mask_host"].numpy()
        out = None
        if return_logits:
            out = bufs["logits_host"].numpy()
            if out.dtype != np.float32:   # an FP16-I/O engine: the interface promises float32 logits
                out = out.astype(np.float32)
        return mask, out

    def synchronize(self):
        """The whole device: our stream, and the segmenter's ring write on torch's current stream."""
        self.torch.cuda.synchronize(self.device_obj)

    def close(self):
        if getattr(self, "stream", None) is not None:
            self.stream.synchronize()
        for engine in (getattr(self, "encoder", None), getattr(self, "memory_head", None)):
            if engine is not None:
                engine.close()
        self._buffers = {}

    def gemm_kernel(self):
        from tmanet.runtime.roofline import torch_gemm
        built = {v["precision"] for v in self.metadata.values()}   # the engines' build precisions
        return torch_gemm(self.device, "fp32" if built == {"fp32"} else "fp16", None)

    def describe(self):
        meta = self.metadata["frame_encoder"]
        precision = "/".join(dict.fromkeys(m["precision"] for m in self.metadata.values()))
        return (f"trt {self.trt.__version__} ({meta['gpu']['name']} {meta['gpu']['compute_capability']}, "
                f"{precision}, CUDA graphs {'on' if self.cuda_graphs else 'off'})")


def _cuda_device_name(device) -> str:
    """The trt backend always runs on a CUDA device: 'cpu' (the segmenter's default) and None mean cuda:0."""
    if device in (None, "cpu", "cuda", "gpu"):
        return "cuda:0"
    device = str(device)
    if device.isdigit():
        return f"cuda:{device}"
    if not device.startswith("cuda"):
        raise TrtBackendError(f"the trt backend runs on a CUDA device, got device {device!r}")
    return device


def _require_tensorrt_for_backend():
    try:
        return require_tensorrt()
    except TensorRTNotInstalled as e:
        raise TensorRTBackendUnavailable(str(e)) from None

