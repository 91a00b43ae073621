"""The roofline of ``tmanet bench``: the work each engine does per frame, counted from its ONNX graph, against
the peak the same backend reaches on a large GEMM in the same run.

Work: multiply-adds of Conv (groups included), ConvTranspose, MatMul and Gemm at the export's shapes (ONNX
shape inference); GFLOP = 2 * MAC / 1e9. The exporter unrolls the chunked memory read into one MatMul pair
per query chunk, each on its slice of the queries, so counting every MatMul node counts the read once in full.
Graphs with loops (``Loop``/``Scan``) are refused: their bodies run a number of times the graph does not
state. Everything else (activations, softmax, resize, Q/DQ) is memory traffic, not counted.

Peak: the median TFLOP/s of square GEMMs on the backend's own engine, device and precision, sampled in the
same run right after the timed frames (never between them, where the probe's matrices and threads would
disturb the frames that follow): ONNX Runtime's MatMul with the same thread count for ``ort``,
torch ``matmul`` for ``torch`` and ``trt`` (on a CUDA device in fp16 when the engines are not fp32, the
tensor-core peak TensorRT's FP16/INT8 kernels are measured against; INT8 has no probe of its own).
"""
from __future__ import annotations

import time
from math import prod
from pathlib import Path

import numpy as np

from .backends.base import GemmKernel

COUNTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
LOOP_OPS = ("Loop", "Scan")


def _static_shapes(model, batch: int) -> dict[str, list[int]]:
    """Every tensor's shape after shape inference, the inputs' symbolic batch set to ``batch``."""
    import onnx
    for inp in model.graph.input:
        for d in inp.type.tensor_type.shape.dim[:1]:
            if not d.HasField("dim_value"):
                d.dim_value = int(batch)
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    g = inferred.graph
    for info in list(g.input) + list(g.value_info) + list(g.output):
        dims = info.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = [d.dim_value for d in dims]
    return shapes


def _node_macs(node, shapes) -> int:
    def shape(i):
        name = node.input[i] if i >= 0 else node.output[0]
        if name not in shapes:
            raise ValueError(f"ONNX node {node.name or node.op_type}: no static shape for {name!r}")
        return shapes[name]
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Conv":
        weight = shape(1)                                   # [M, C/groups, k...]
        return prod(shape(-1)) * prod(weight[1:])
    if node.op_type == "ConvTranspose":
        weight, x = shape(1), shape(0)                      # [C, M/groups, k...], [N, C, ...]
        return prod(x) * prod(weight[1:])
    if node.op_type == "MatMul":
        a = shape(0)
        return prod(shape(-1)) * a[-1]
    if node.op_type == "Gemm":
        a = shape(0)
        k = a[0] if attrs.get("transA") is not None and attrs["transA"].i else a[1]
        return prod(shape(-1)) * k
    return 0


def count_macs(onnx_file, batch: int = 1) -> dict:
    """Multiply-adds of one run of an ONNX graph: ``{"total": MAC, "per_op": {op_type: MAC}, "batch": B}``,
    ``B`` the batch it ran at (``batch`` for a dynamic batch dimension, else the graph's own)."""
    import onnx
    model = onnx.load(str(onnx_file))
    loops = sorted({n.op_type for n in model.graph.node if n.op_type in LOOP_OPS})
    if loops:
        raise ValueError(f"{onnx_file}: cannot count the work of {', '.join(loops)} nodes (their trip count is "
                         "not in the graph)")
    shapes = _static_shapes(model, batch)
    per_op = dict.fromkeys(COUNTED_OPS, 0)
    for node in model.graph.node:
        if node.op_type in per_op:
            per_op[node.op_type] += _node_macs(node, shapes)
    first = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value
    return {"total": sum(per_op.values()), "per_op": per_op, "batch": first}


def gflop(macs: int) -> float:
    return 2 * macs / 1e9


# -- peak probes ----------------------------------------------------------------------------------------------
class GemmProbe:
    """Square GEMMs on the backend's own engine, device and precision, one per :meth:`sample`: the bench
    samples right after its timed frames, in the same run, and the peak is the median of those samples (at
    least ``min_samples``). The matrices exist only during a sample,
    so the runtime's memory figures do not include them."""

    def __init__(self, kernel, min_samples: int = 5):
        self.min_samples, self.rates = min_samples, []
        self.kernel, self.description = kernel, kernel.description
        kernel.run(kernel.make())
        kernel.sync()   # warm-up: kernel selection, thread pools

    def sample(self):
        k = self.kernel
        inputs = k.make()
        k.sync()
        t0 = time.perf_counter()
        k.run(inputs)
        k.sync()
        self.rates.append(2 * k.n ** 3 / (time.perf_counter() - t0) / 1e12)

    def peak(self) -> dict:
        """``{"tflops": median TFLOP/s, "best_tflops": the fastest sample, "probe": what was measured,
        "samples": count}``."""
        while len(self.rates) < self.min_samples:
            self.sample()
        return {"tflops": float(np.median(self.rates)), "best_tflops": float(max(self.rates)),
                "probe": self.description, "samples": len(self.rates)}


def ort_gemm(n: int, threads: int | None) -> GemmKernel:
    """ONNX Runtime's fp32 MatMul on the CPU, with the backend's session settings."""
    from onnx import TensorProto, helper

    from tmanet.onnx_session import cpu_session
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm_probe", [a, b], [c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = cpu_session(model.SerializeToString(), threads)

    def inputs():
        return {"a": np.full((n, n), 0.5, np.float32), "b": np.full((n, n), 0.25, np.float32)}
    return GemmKernel(n, inputs, lambda feeds: session.run(None, feeds), lambda: None,
                      f"onnxruntime MatMul fp32 {n}^3 (cpu, {threads or 'default'} threads)")


def torch_gemm(device: str, precision: str, threads: int | None) -> GemmKernel:
    """torch ``matmul`` on ``device`` (fp32, or fp16 for any reduced precision), under the process's TF32
    settings."""
    import torch
    on_cuda = str(device).startswith("cuda")
    if threads and not on_cuda:
        torch.set_num_threads(int(threads))
    n = 8192 if on_cuda else 2048
    dtype = "fp32" if precision in (None, "fp32") else "fp16"
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]

    def inputs():
        return [torch.full((n, n), value, device=device, dtype=torch_dtype) for value in (0.5, 0.25)]

    def run(ab):
        with torch.inference_mode():
            torch.matmul(*ab)
    return GemmKernel(n, inputs, run, (lambda: torch.cuda.synchronize(device)) if on_cuda else (lambda: None),
                      f"torch matmul {dtype} {n}^3 ({device})")


def roofline(work_gflop: dict[str, float], stage_ms: dict[str, float], streams: int, peak: dict) -> dict:
    """``{peak_tflops, probe, <engine>: {gflop, tflops, fraction_of_peak}}``: ``work_gflop`` per frame of one
    stream, ``stage_ms`` the engine's p50 time per push of ``streams`` frames."""
    report = {"peak_tflops": peak["tflops"], "probe": peak["probe"], "probe_samples": peak.get("samples"),
              "probe_best_tflops": peak.get("best_tflops")}
    for name, work in work_gflop.items():
        ms = stage_ms[name]
        tflops = work * streams / ms if ms else float("nan")   # GFLOP / ms = TFLOP / s
        report[name] = {"gflop": work, "tflops": tflops, "fraction_of_peak": tflops / peak["tflops"]}
    return report


def export_work_gflop(export_dir, engines: dict[str, str]) -> dict[str, float]:
    """GFLOP per frame (one batch row) of each engine's ONNX graph in an export: ``engines`` maps the
    report's name to the file name."""
    counts = {name: count_macs(Path(export_dir) / file) for name, file in engines.items()}
    return {name: gflop(c["total"]) / c["batch"] for name, c in counts.items()}
