"""Execution backends of the streaming runtime: one class per inference library, one small interface.

A backend runs the two graphs of an export directory (``frame_encoder`` and ``memory_head``) and allocates
the memory the ring buffer lives in; everything stateful (the ring, streams, slide windows) is the
segmenter's, shared by every backend. The interface (see :class:`Backend`):

- ``zeros(shape)``: float32 zeros in the backend's memory (host numpy for ORT, a torch tensor on the
  device for torch, device memory for TensorRT); the segmenter builds the :class:`MemoryRing` with it.
- ``encode(frames)``: uint8 host frames ``[b, H, W, 3]`` -> ``(query_key, query_value, memory_key,
  memory_value)`` in backend memory. They may be preallocated buffers overwritten by the next call.
- ``head(query_key, query_value, slot_keys, slot_values, return_logits)``: the T memory slots are views into the
  ring (slot i = frame t-T+i); returns host ``mask [b, H, W]`` uint8 and ``logits [b, C, H, W]`` float32
  (or None when not asked for), valid until the next call.

Backends are found by name in :data:`BACKENDS`. A module can add one with :func:`register_backend`;
``"trt"`` resolves lazily to ``tmanet.engines.trt_backend``, which registers itself when imported.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from tmanet.manifest import FRAME_ENCODER, MEMORY_HEAD, ExportSpec, head_input_names
from tmanet.onnx_session import cpu_session

from .address_cache import AddressKeyedCache

log = logging.getLogger("tmanet")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine (missing library or device)."""


class Backend:
    """Base class: what the segmenter needs from a backend. ``batch`` is the fixed engine batch or None
    when the export's batch is dynamic (any batch up to ``max_batch``)."""
    name = "base"

    def __init__(self, export_dir, spec: ExportSpec, device: str = "cpu"):
        self.export_dir = Path(export_dir)
        self.spec = spec
        self.device = device
        self.memory_frames = spec.memory_frames
        self.input_size = spec.input_size
        self.feature_size = spec.feature_size
        self.num_classes = spec.num_classes
        self.key_channels = spec.key_channels
        self.value_channels = spec.value_channels
        self.batch = spec.batch
        self.max_batch = spec.max_batch

    def zeros(self, shape):
        raise NotImplementedError

    def encode(self, frames: np.ndarray):
        raise NotImplementedError

    def head(self, query_key, query_value, slot_keys, slot_values, return_logits: bool = True):
        raise NotImplementedError

    def synchronize(self):
        """Wait for the work this backend enqueued on its device (nothing to wait for on the CPU)."""

    def close(self):
        """Release engines and buffers (the object is unusable afterwards)."""

    def describe(self) -> str:
        return f"{self.name} ({self.device})"


# -- registry ---------------------------------------------------------------------------------------------
BACKENDS: dict[str, Callable[..., Backend]] = {}
# Backends living in other modules, imported on first use; importing the module must register the name.
LAZY_BACKENDS = {"trt": ("tmanet.engines.trt_backend", "TensorRT")}


def register_backend(name: str, factory: Callable[..., Backend]):
    """Make ``factory(export_dir, spec, device, **options) -> Backend`` available as ``name``."""
    BACKENDS[name] = factory
    return factory


def get_backend(name: str) -> Callable[..., Backend]:
    if name in BACKENDS:
        return BACKENDS[name]
    if name in LAZY_BACKENDS:
        module, title = LAZY_BACKENDS[name]
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            what = "it is not part of this installation" if e.name == module else f"{e}"
            raise BackendUnavailable(f"{title} backend not available: {module} cannot be imported ({what})") from None
        except ImportError as e:
            raise BackendUnavailable(f"{title} backend not available: {e}") from None
        if name not in BACKENDS:
            raise BackendUnavailable(f"{title} backend not available: {module} did not register {name!r}")
        return BACKENDS[name]
    known = sorted(set(BACKENDS) | set(LAZY_BACKENDS))
    raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(known)}")


def available_backends() -> list[str]:
    return sorted(set(BACKENDS) | set(LAZY_BACKENDS))


# -- ONNX Runtime (CPU) -----------------------------------------------------------------------------------
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8}


class OrtBackend(Backend):
    """ONNX Runtime on the CPU with IOBinding: every input and output is bound by address to a numpy array
    the runtime owns (the ring's slot views, preallocated outputs), so nothing is copied per frame beyond
    the graphs' own work. A binding is kept per set of addresses: the ring has T+1 rotation states, so
    after T+1 frames every head call reuses a ready binding."""
    name = "ort"

    def __init__(self, export_dir, spec, device="cpu", threads: int | None = None,
                 inter_threads: int | None = None):
        super().__init__(export_dir, spec, device)
        if device != "cpu":
            raise BackendUnavailable(f"the ort backend runs on the CPU only (got device {device!r}); "
                                     "use backend 'torch' or 'trt' on a GPU")
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailable(f"onnxruntime is not installed: {e}") from None
        self.ort = ort
        self.threads = threads
        self.encoder = cpu_session(self.export_dir / FRAME_ENCODER, threads, inter_threads)
        self.memory_head = cpu_session(self.export_dir / MEMORY_HEAD, threads, inter_threads)
        T = self.memory_frames
        self.head_inputs = head_input_names(T)
        got = [i.name for i in self.memory_head.get_inputs()]
        if got != self.head_inputs:
            raise ValueError(f"{self.export_dir / MEMORY_HEAD}: inputs {got}, expected {self.head_inputs}")
        self._out_types = {o.name: _ORT_TYPES[o.type] for o in
                           self.encoder.get_outputs() + self.memory_head.get_outputs()}
        self._buffers: dict[tuple, dict[str, np.ndarray]] = {}
        self._bindings = AddressKeyedCache()
        self.last_head_binding = None  # for inspection: the binding the last head call ran

    def zeros(self, shape):
        return np.zeros(shape, np.float32)

    def _outputs(self, kind: str, b: int) -> dict[str, np.ndarray]:
        """Preallocated outputs of one graph for batch ``b``."""
        key = (kind, b)
        if key not in self._buffers:
            h, w = self.feature_size
            H, W = self.input_size
            T, ck, cv = self.memory_frames, self.key_channels, self.value_channels
            shapes = ({"query_key": (b, ck, h, w), "query_value": (b, cv, h, w), "memory_key": (b, T, ck, h, w),
                       "memory_value": (b, T, cv, h, w)} if kind == "encoder" else
                      {"mask": (b, H, W), "logits": (b, self.num_classes, H, W)})
            self._buffers[key] = {n: np.empty(s, self._out_types[n]) for n, s in shapes.items()}
        return self._buffers[key]

    def _binding(self, session, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]):
        """An IOBinding of these exact arrays, by address, reused while the addresses are the same."""
        arrays = list(inputs.items()) + list(outputs.items())
        key = (id(session),) + tuple((n, a.ctypes.data, a.shape, a.dtype.str) for n, a in arrays)
        return self._bindings.get_or_make(key, lambda: self._bind(session, inputs, outputs))

    @staticmethod
    def _bind(session, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]):
        binding = session.io_binding()
        for name, a in inputs.items():
            if not a.flags.c_contiguous:
                raise ValueError(f"input {name} must be C-contiguous to be bound by address")
            binding.bind_input(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        for name, a in outputs.items():
            binding.bind_output(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        return binding

    def encode(self, frames):
        out = self._outputs("encoder", frames.shape[0])
        self.encoder.run_with_iobinding(self._binding(self.encoder, {"frames": frames}, out))
        return out["query_key"], out["query_value"], out["memory_key"], out["memory_value"]

    def head(self, query_key, query_value, slot_keys, slot_values, return_logits=True):
        out = self._outputs("head", query_key.shape[0])
        inputs = dict(zip(self.head_inputs, [query_key, query_value, *slot_keys, *slot_values]))
        binding = self._binding(self.memory_head, inputs, out)
        self.memory_head.run_with_iobinding(binding)
        self.last_head_binding = binding
        return out["mask"], (out["logits"] if return_logits else None)

    def close(self):
        self._bindings.clear()
        self._buffers.clear()
        self.encoder = self.memory_head = None

    def describe(self):
        threads = self.threads or "default"
        return f"ort {self.ort.__version__} (CPUExecutionProvider, {threads} threads)"


# -- PyTorch (reference) ----------------------------------------------------------------------------------
def resolve_checkpoint(export_dir: Path, spec: ExportSpec) -> Path:
    path = spec.checkpoint
    if not path:
        raise BackendUnavailable(f"the torch backend rebuilds the model from the checkpoint, but "
                                 f"{export_dir}/manifest.json records none (export with a checkpoint path)")
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = export_dir / p
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {path} named in {export_dir}/manifest.json does not exist")
    return p


TORCH_PRECISIONS = ("fp32", "fp16")


class TorchBackend(Backend):
    """The PyTorch split (``model.split`` at the export size) rebuilt from the manifest's checkpoint: the
    reference for the other backends, on the CPU or a CUDA device.

    Speed options (each equals eager fp32 within the fp16 tolerance; see the tests):

    - ``precision="fp16"``: true half weights and activations (the BN-folded graphs cast once at open, no
      autocast re-casting weights per call); the memory ring is float16 too, halving its traffic. The
      chunked memory read takes its softmax in float32; logits are returned as float32. On the CPU too,
      where torch has half kernels (slow there: for checking, not for speed).
    - ``channels_last``: weights (and so activations) in NHWC memory format, the layout tensor cores and
      oneDNN prefer. CPU and CUDA.
    - ``cudnn_benchmark`` (CUDA): ``torch.backends.cudnn.benchmark = True`` (process-wide): cuDNN times its
      convolution algorithms for each shape on first use and keeps the fastest.
    - ``compile``: both graphs through ``torch.compile`` (Inductor; needs a C++ compiler on the CPU and
      Triton on CUDA; the first frames compile, which can take minutes).
    - ``cuda_graphs=True`` (CUDA): the frame encoder is captured into a ``torch.cuda.CUDAGraph`` per batch size
      (the host frame is copied into a static input, the graph replayed, the static outputs returned). The
      head is captured lazily once per set of input addresses: its memory inputs are the ring's slot views,
      which rotate over T+1 phases but are fixed tensors within a phase, and its queries are the encoder
      graph's static outputs, so after T+1 frames every call replays a ready graph.
    - ``fused_attention`` (default: on with CUDA): the head's memory read runs as one fused attention kernel
      (``scaled_dot_product_attention``, scale 1) instead of chunked matmul + softmax + matmul, so the
      (h*w) x (T*h*w) score matrix never reaches device memory. Checked at open on the real channel widths
      and dtype; where no fused kernel takes them the head reads in chunks and ``describe()`` says so.
    """
    name = "torch"

    def __init__(self, export_dir, spec, device="cpu", model=None, threads: int | None = None,
                 precision: str = "fp32", cuda_graphs: bool = False, fused_attention: bool | None = None,
                 channels_last: bool = False, cudnn_benchmark: bool = False, compile: bool = False):
        super().__init__(export_dir, spec, device)
        on_cuda = str(device).startswith("cuda")
        self._check_options(precision, on_cuda, cuda_graphs=cuda_graphs, fused_attention=fused_attention,
                            cudnn_benchmark=cudnn_benchmark)
        import torch

        from tmanet.checkpoints import load_model
        from tmanet.presets import ModelConfig
        self.torch = torch
        if on_cuda and not torch.cuda.is_available():
            raise BackendUnavailable(f"device {device!r} asked for, but torch sees no CUDA device")
        if threads:
            torch.set_num_threads(int(threads))
        if cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        if model is None:
            model = load_model(resolve_checkpoint(self.export_dir, spec), ModelConfig.from_dict(spec.config))
        self.device_obj = torch.device(device)
        self.precision, self.dtype = precision, {"fp32": torch.float32, "fp16": torch.float16}[precision]
        self.cuda_graphs, self.channels_last, self.compiled = bool(cuda_graphs), bool(channels_last), bool(compile)
        encoder, head = model.eval().split(self.input_size, query_chunk=spec.query_chunk)
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        self.encoder = encoder.to(self.device_obj, self.dtype, memory_format=memory_format)
        self.memory_head = head.to(self.device_obj, self.dtype, memory_format=memory_format)
        self.memory_head.fused_attention = on_cuda and fused_attention is not False and self._fused_kernel_fits()
        if on_cuda and fused_attention is not False and not self.memory_head.fused_attention:
            log.warning("no fused attention kernel takes this head's inputs (%d key, %d value channels, %s): "
                        "the memory read runs in chunks", self.key_channels, self.value_channels, precision)
        self._encoder_fn, self._head_fn = self.encoder, self.memory_head
        if compile:
            self._encoder_fn = torch.compile(self.encoder, dynamic=False)
            self._head_fn = torch.compile(self.memory_head, dynamic=False)
        self._encoder_graphs: dict[int, tuple] = {}   # batch -> (graph, static input, static outputs)
        self._head_graphs = AddressKeyedCache()      # input addresses -> (graph, static outputs)

    @staticmethod
    def _check_options(precision, on_cuda, **cuda_only):
        """Bad options fail before any loading, in one sentence."""
        if precision not in TORCH_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(TORCH_PRECISIONS)}, got {precision!r}")
        if on_cuda:
            return
        why = {"cuda_graphs": "CUDA graphs capture GPU kernels only",
               "fused_attention": "torch has no fused CPU kernel for the memory read",
               "cudnn_benchmark": "it selects cuDNN convolution algorithms"}
        for name, value in cuda_only.items():
            if value:
                raise ValueError(f"{name} needs device='cuda' (got a CPU device); {why[name]}")

    def zeros(self, shape):
        return self.torch.zeros(shape, dtype=self.dtype, device=self.device_obj)

    def _fused_kernel_fits(self) -> bool:
        """Whether a fused attention kernel takes the head's channel widths in its precision: which kernel
        applies depends on widths, dtype and alignment, not on the number of positions, so a few suffice."""
        from tmanet.model.tma_head import fused_read
        torch = self.torch
        q = torch.zeros(1, 8, self.key_channels, device=self.device_obj, dtype=self.dtype)
        k = torch.zeros(1, self.key_channels, 16, device=self.device_obj, dtype=self.dtype)
        v = torch.zeros(1, 16, self.value_channels, device=self.device_obj, dtype=self.dtype)
        with torch.inference_mode():
            return fused_read(q, k, v) is not None

    def synchronize(self):
        if self.device_obj.type == "cuda":
            self.torch.cuda.synchronize(self.device_obj)

    def _run_encoder(self, x):
        return self._encoder_fn(x)   # in the backend's dtype: the ring is too

    def _run_head(self, inputs):
        mask, logits = self._head_fn(*inputs)
        return mask, logits.float()   # the interface promises float32 logits (a no-op in fp32)

    def _capture(self, fn, *args):
        """``fn(*args)`` captured into a CUDA graph -> (graph, static outputs). Warm-up runs go on a side
        stream first (lazy cuBLAS/cuDNN initialisation must not happen inside the capture)."""
        torch = self.torch
        side = torch.cuda.Stream(self.device_obj)
        side.wait_stream(torch.cuda.current_stream(self.device_obj))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn(*args)
        torch.cuda.current_stream(self.device_obj).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = fn(*args)
        return graph, outputs

    def encode(self, frames):
        if not frames.flags.writeable:  # torch wants writable memory even for inputs it only reads
            frames = frames.copy()
        torch = self.torch
        with torch.inference_mode():
            host = torch.from_numpy(frames)
            if not self.cuda_graphs:
                return self._run_encoder(host.to(self.device_obj, non_blocking=True))
            b = frames.shape[0]
            entry = self._encoder_graphs.get(b)
            if entry is None:
                static_in = torch.empty(frames.shape, dtype=torch.uint8, device=self.device_obj)
                static_in.copy_(host)
                graph, outputs = self._capture(self._run_encoder, static_in)
                entry = self._encoder_graphs[b] = (graph, static_in, outputs)
            graph, static_in, outputs = entry
            static_in.copy_(host)
            graph.replay()
            return outputs  # static buffers, overwritten by the next call (as the interface allows)

    def head(self, query_key, query_value, slot_keys, slot_values, return_logits=True):
        inputs = (query_key, query_value, *slot_keys, *slot_values)
        with self.torch.inference_mode():
            if self.cuda_graphs:
                key = tuple((t.data_ptr(), tuple(t.shape), tuple(t.stride())) for t in inputs)
                # The graph reads these exact addresses: valid for every later call with the same key.
                graph, (mask, out) = self._head_graphs.get_or_make(key, lambda: self._capture(self._run_head, inputs))
                graph.replay()
            else:
                mask, out = self._run_head(inputs)
            return mask.cpu().numpy(), (out.cpu().numpy() if return_logits else None)

    def close(self):
        self._encoder_graphs.clear()
        self._head_graphs.clear()

    def describe(self):
        on = {True: "on", False: "off"}
        extras = [name for name, used in (("channels_last", self.channels_last), ("torch.compile", self.compiled),
                                          ("cudnn.benchmark", self.torch.backends.cudnn.benchmark
                                           and self.device_obj.type == "cuda")) if used]
        return (f"torch {self.torch.__version__} ({self.device_obj}, {self.precision}, CUDA graphs "
                f"{on[self.cuda_graphs]}, fused attention {on[self.memory_head.fused_attention]}, "
                + "".join(f"{e}, " for e in extras) + f"{self.torch.get_num_threads()} threads)")


register_backend("ort", OrtBackend)
register_backend("torch", TorchBackend)

