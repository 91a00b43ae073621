"""The one way the toolkit opens an ONNX graph on ONNX Runtime (CPU): the export check, calibration's memory
samples and the runtime's ``ort`` backend all run the graphs with the same session options."""
from __future__ import annotations


def cpu_session(path, threads: int | None = None, inter_threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` of the ONNX file at ``path`` on the CPU provider: every graph
    optimisation, sequential execution (one chain of convs: the parallelism is within the ops), ``threads``
    intra-op and ``inter_threads`` inter-op threads (ORT's defaults when None), warnings and below silenced."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        opts.intra_op_num_threads = int(threads)
    if inter_threads:
        opts.inter_op_num_threads = int(inter_threads)
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
