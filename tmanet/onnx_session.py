"""The one way the toolkit opens an ONNX graph on ONNX Runtime (CPU): the export check, calibration's memory
samples, the runtime's ``ort`` backend and the bench's GEMM probe all run the graphs with the same session
options.

Thread pools: each session keeps its own intra-op pool, with **spinning off**. ONNX Runtime's default lets a
pool's threads spin (busy-wait) after each parallel section for the next one; the runtime runs the frame engine
then the head, two sessions, so the idle pool's threads spun on the cores the busy one needed. On the 2-core
machine of docs/CPU.md a bare loop of the demo model's two graphs took 1.7-2.1x as long with spinning on as
with it off, and one process-wide pool (``use_per_session_threads=False``, which still spins, cannot be turned
off from Python, and forbids any per-session pool in the process afterwards) was slower than spinning off too.
"""
from __future__ import annotations

# Session config keys (onnxruntime_session_options_config_keys.h): "0" makes a pool's threads sleep as soon as
# they run out of work instead of busy-waiting for the next parallel section.
NO_SPINNING = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}


def cpu_session(path, threads: int | None = None, inter_threads: int | None = None, profile_prefix=None):
    """An ``onnxruntime.InferenceSession`` of an ONNX graph (a file path, or the serialized model as bytes) on
    the CPU provider: every graph optimisation, sequential execution (one chain of convs: the parallelism is
    within the ops), ``threads`` intra-op and ``inter_threads`` inter-op threads (ORT's defaults when None), no
    spinning between runs (see the module's docstring), warnings and below silenced. ``profile_prefix``: turn on
    ONNX Runtime's profiler, which writes ``<prefix>_<date>.json`` (Chrome trace format) at
    ``session.end_profiling()``."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        opts.intra_op_num_threads = int(threads)
    if inter_threads:
        opts.inter_op_num_threads = int(inter_threads)
    for key, value in NO_SPINNING.items():
        opts.add_session_config_entry(key, value)
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    opts.log_severity_level = 3
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
