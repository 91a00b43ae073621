"""The ``ort`` backend: ONNX Runtime on the CPU, the embedded default that runs anywhere (and in CI)."""
from __future__ import annotations

import numpy as np

from tmanet.manifest import FRAME_ENCODER, MEMORY_HEAD, head_input_names
from tmanet.onnx_session import cpu_session

from ..address_cache import AddressKeyedCache
from .base import THREADS, Backend, BackendUnavailable
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8}


class OrtBackend(Backend):
    """ONNX Runtime on the CPU with IOBinding: every input and output is bound by address to a numpy array
    the runtime owns (the ring's slot views, preallocated outputs), so nothing is copied per frame beyond
    the graphs' own work. A binding is kept per set of addresses: the ring has T+1 rotation states, so
    after T+1 frames every head call reuses a ready binding."""
    name = "ort"
    summary = "ONNX Runtime on the CPU (default)"
    options = (THREADS,)
    reads_onnx = True

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

    def gemm_kernel(self):
        from ..roofline import ort_gemm
        return ort_gemm(2048, self.threads)

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
