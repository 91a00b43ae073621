"""The ``openvino`` backend: Intel OpenVINO on the CPU, the runtime x86 in-vehicle computers run. It reads the
export's two ONNX files as they are (fp32, or the Q/DQ graphs of ``tmanet calibrate``, which it runs as integer
kernels) and can run an fp32 export in bfloat16 where the CPU has it (AVX-512 BF16 / AMX): no calibration. An
INT8 export runs in bfloat16 too, except an engine whose calibration kept float32 layers (:func:`engine_hints`).

Every input is handed to OpenVINO as a tensor sharing the array's memory (the ring's slot views included), and
every output is read back as a view, so no frame is copied beyond the graphs' own work."""
from __future__ import annotations

import numpy as np

from tmanet.manifest import ENGINE_FILES, MEMORY_HEAD, head_input_names

from .base import THREADS, Backend, BackendUnavailable, GemmKernel, Option

PRECISIONS = ("fp32", "bf16")
_HINT = {"fp32": "f32", "bf16": "bf16"}


def kept_float(spec, engine: str) -> bool:
    """Whether ``engine`` is an INT8 graph whose calibration kept layers in float32 because quantizing them
    cost accuracy (the cpu target's sensitivity sweep, or --int8-keep)."""
    info = ((spec.raw.get("calibration") or {}).get("engines") or {}).get(engine) or {}
    return spec.precision.get(engine) == "int8" and bool(info.get("kept_nodes") or info.get("kept_modules"))


def engine_hints(spec, precision: str) -> dict:
    """OpenVINO's inference precision hint per engine. With bf16, an engine whose calibration kept layers in
    float32 keeps the f32 hint (its integer layers stay integer either way): bf16 rounding in those layers
    undoes what the calibration kept them for. Measured on the demo model's cpu-int8 export: both engines bf16,
    98.77 % on the worst of 4 unseen clips; its frame engine f32, 99.15 %, as fast as OpenVINO bf16 on the fp32
    graphs (docs/CPU_INT8.md)."""
    return {engine: "f32" if precision == "fp32" or kept_float(spec, engine) else _HINT[precision]
            for engine, _ in ENGINE_FILES}


def _openvino():
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailable(f"OpenVINO is not installed ({e}): pip install 'tmanet-trt[openvino]'") from None
    return openvino


class OpenVinoBackend(Backend):
    """``backend="openvino"``: the two ONNX graphs compiled for OpenVINO's CPU plugin, latency hint."""
    name = "openvino"
    summary = "Intel OpenVINO on the CPU (x86; fp32, or bf16 where the CPU has it)"
    reads_onnx = True
    options = (
        THREADS,
        Option("--precision", "precision", "bf16 runs the graphs in bfloat16 where the CPU has it (AVX-512 "
               "BF16, AMX), except an INT8 engine's float32 layers kept by its calibration; default fp32",
               choices=PRECISIONS),
    )

    def __init__(self, export_dir, spec, device="cpu", threads: int | None = None, precision: str = "fp32"):
        super().__init__(export_dir, spec, device)
        if device != "cpu":
            raise BackendUnavailable(f"the openvino backend runs on the CPU here (got device {device!r})")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        ov = _openvino()
        self.ov, self.core = ov, ov.Core()
        if precision == "bf16" and "BF16" not in self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise BackendUnavailable("this CPU has no bfloat16 support (OpenVINO lists no BF16 capability): "
                                     "use --precision fp32")
        self.threads, self.precision = threads, precision
        self.config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": _HINT[precision]}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self.hints = engine_hints(spec, precision)
        self.encoder, self.memory_head = (
            self.core.compile_model(str(self.export_dir / file), "CPU",
                                    {**self.config, "INFERENCE_PRECISION_HINT": self.hints[engine]})
            for engine, file in ENGINE_FILES)
        self.head_inputs = head_input_names(self.memory_frames)
        got = [i.get_any_name() for i in self.memory_head.inputs]
        if got != self.head_inputs:
            raise ValueError(f"{self.export_dir / MEMORY_HEAD}: inputs {got}, expected {self.head_inputs}")
        self._encoder_request = self.encoder.create_infer_request()
        self._head_request = self.memory_head.create_infer_request()

    def gemm_kernel(self):
        ov = self.ov
        n = 2048
        a, b = (ov.opset13.parameter([n, n], np.float32, name=x) for x in "ab")
        matmul = self.core.compile_model(ov.Model([ov.opset13.matmul(a, b, False, False)], [a, b], "gemm_probe"),
                                         "CPU", self.config)
        request = matmul.create_infer_request()

        def inputs():
            return [np.full((n, n), 0.5, np.float32), np.full((n, n), 0.25, np.float32)]
        return GemmKernel(n, inputs, lambda ab: request.infer(ab, share_inputs=True), lambda: None,
                          f"openvino MatMul {self.precision} {n}^3 (cpu, {self.threads or 'default'} threads)")

    def zeros(self, shape):
        return np.zeros(shape, np.float32)

    @staticmethod
    def _run(request, inputs: dict, names) -> list[np.ndarray]:
        # share_inputs: the arrays (the ring's contiguous slot views) are read in place; share_outputs: the
        # results are views of OpenVINO's buffers, valid until the next call (as the interface allows).
        result = request.infer({k: np.ascontiguousarray(v) for k, v in inputs.items()}, share_inputs=True,
                               share_outputs=True)
        by_name = {port.get_any_name(): value for port, value in result.items()}
        return [by_name[n] for n in names]

    def encode(self, frames):
        return tuple(self._run(self._encoder_request, {"frames": frames},
                               ("query_key", "query_value", "memory_key", "memory_value")))

    def head(self, query_key, query_value, slot_keys, slot_values, return_logits=True):
        inputs = dict(zip(self.head_inputs, [query_key, query_value, *slot_keys, *slot_values]))
        mask, out = self._run(self._head_request, inputs, ("mask", "logits"))
        return mask, (out if return_logits else None)

    def close(self):
        self._encoder_request = self._head_request = None
        self.encoder = self.memory_head = None

    def describe(self):
        kept = [engine.replace("_", " ") for engine, hint in self.hints.items() if hint != _HINT[self.precision]]
        kept = f"; {', '.join(kept)} f32: its calibration kept float32 layers" if kept else ""
        return (f"openvino {self.ov.get_version().split('-')[0]} (CPU, {self.precision}{kept}, "
                f"{self.threads or 'default'} threads)")
