"""INT8 made for ONNX Runtime's CPU kernels (``tmanet calibrate --target cpu``).

ModelOpt's Q/DQ placement is made for TensorRT, which fuses it into its own INT8 kernels; on ONNX Runtime's CPU
provider the same graph runs *slower* than float32 (its Q/DQ pairs around residual additions and fp16 casts
are not fused). Here ONNX Runtime's own static quantizer writes the Q/DQ nodes, in the form its graph
optimizer fuses into integer kernels (``QLinearConv`` / ``QLinearMatMul``, VNNI / AVX-512 on x86, dot-product
instructions on Arm):

- activations **uint8** (asymmetric), weights **int8 per output channel** (symmetric): the U8S8 pair that
  ONNX Runtime's x86 and Arm integer GEMMs take;
- ranges from the same calibration samples as the TensorRT target (frames for the frame engine, the streamed
  memory encodings for the head), computed **once** per engine (ONNX Runtime's calibration cache), so the
  sensitivity sweep (:mod:`.cpu_sweep`) can write many placements cheaply;
- **float32 where int8 hurts**: the memory read's MatMul/Softmax and the place read's reductions
  (:func:`~.precision.attention_nodes`), the logits' convolution, resize and argmax (uint8 logits tie), the nodes of
  ``keep_modules`` (torch module paths, e.g. what the sweep found sensitive).
"""
from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

from .precision import (PrecisionError, attention_nodes, check_io_kept, in_module, module_of, name_unnamed_nodes,
                        quiet, summarize)

log = logging.getLogger("tmanet")

# What ONNX Runtime turns into integer kernels on the CPU (Conv -> QLinearConv, MatMul -> QLinearMatMul) and
# the ops that pass a quantized tensor through (their Q/DQ pairs fold away). Additions (the residual stream)
# and the rest stay float32: a float32 residual stream does not accumulate rounding from block to block.
CPU_QUANTIZED_OPS = ("Conv", "MatMul", "Relu", "MaxPool")
# Ops whose outputs are the logits or what follows them: rounding these flips argmax ties, for no speed.
_OUTPUT_OPS = ("Resize", "ArgMax", "Softmax", "ReduceSum")
# Range calibration: percentile (the default for this target) clips the rare outliers that min/max ranges
# spend most of uint8's 256 steps on; ONNX Runtime's entropy ranges measured like min/max on our graphs.
METHODS = {"percentile": "Percentile", "entropy": "Entropy", "max": "MinMax"}
PERCENTILE = 99.99


def require_ort_quantization():
    try:
        from onnxruntime import quantization  # noqa: F401
    except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
        raise PrecisionError(f"onnxruntime.quantization is not importable ({e})") from None


def cpu_plan(model, keep_modules=(), keep_nodes=()) -> dict:
    """Which nodes of ``model`` stay float32: the attention read, the output ops, ``keep_modules``' nodes and
    ``keep_nodes``. Returns ``{"exclude": [...], "attention": [...], "kept": {module: [nodes]}}``."""
    attention = attention_nodes(model)
    node_modules = {n.name: module_of(n) for n in model.graph.node}
    kept = {m: [n for n, module in node_modules.items() if in_module(module, m)] for m in keep_modules}
    output = [n.name for n in model.graph.node if n.op_type in _OUTPUT_OPS]
    producer = {o: n for n in model.graph.node for o in n.output}
    # the convolution writing the logits: its uint8 output would be what the resize and argmax read
    output += [producer[i].name for n in model.graph.node if n.op_type in ("Resize", "ArgMax")
               for i in n.input[:1] if i in producer and producer[i].op_type == "Conv"]
    exclude = sorted(set(attention) | set(output) | {n for nodes in kept.values() for n in nodes} | set(keep_nodes))
    return {"exclude": exclude, "attention": attention, "kept": kept}


def quantizable_nodes(model) -> list:
    """Nodes that ONNX Runtime runs as integer kernels when quantized (Conv, MatMul), minus what always stays
    float32 (:func:`cpu_plan`)."""
    skip = set(cpu_plan(model)["exclude"])
    return [n for n in model.graph.node if n.op_type in ("Conv", "MatMul") and n.name not in skip]


class RangeCache:
    """Activation ranges of one graph, calibrated once on ``reader``'s batches (ONNX Runtime's calibration
    cache file), reused by every :func:`quantize_cpu_int8` call on that graph."""

    def __init__(self, path, method: str = "percentile"):
        if method not in METHODS:
            raise ValueError(f"calibration method must be one of {tuple(METHODS)}, got {method!r}")
        self.path = Path(path)
        self.method = method


def named_copy(src, workdir) -> Path:
    """``src`` with every node named (exclusions and the sweep match names), saved in ``workdir``."""
    import onnx
    model = onnx.load(str(src))
    if not name_unnamed_nodes(model):
        return Path(src)
    path = Path(workdir) / Path(src).name
    onnx.save(model, str(path))
    return path


def quantize_cpu_int8(src, dst, reader, ranges: RangeCache, keep_modules=(), keep_nodes=(), save: bool = True):
    """Write ``src`` (float32 ONNX, nodes named) with ONNX Runtime QDQ INT8 (uint8 activations, int8
    per-channel weights) to ``dst``; ``reader`` feeds the range calibration unless ``ranges`` already holds
    it. Returns (the quantized model, what was done for the manifest)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    require_ort_quantization()
    src, dst = Path(src), Path(dst)
    source = onnx.load(str(src), load_external_data=False)
    plan = cpu_plan(source, keep_modules, keep_nodes)
    if reader is not None:
        reader.rewind()
    with quiet(), _ort_quant_logs_quiet(), ort_unpatched():
        quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(CPU_QUANTIZED_OPS), per_channel=True, reduce_range=False,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=plan["exclude"],
                        calibrate_method=getattr(CalibrationMethod, METHODS[ranges.method]),
                        calibration_providers=["CPUExecutionProvider"],
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                       "CalibPercentile": PERCENTILE},
                        calibration_cache_path=str(ranges.path))
    quantized = onnx.load(str(dst))
    check_io_kept(source, quantized, f"ONNX Runtime quantize_static on {dst.name}")
    info = summarize(quantized)
    if not info["quantize_linear"]:
        raise PrecisionError(f"ONNX Runtime inserted no Q/DQ nodes into {src.name}: nothing was quantized")
    if not save:
        dst.unlink()
    int8 = [n.name for n in quantizable_nodes(source) if n.name not in set(plan["exclude"])]
    info.update({"tool": "onnxruntime.quantization.quantize_static", "target": "cpu", "mode": "int8",
                 "format": "QDQ", "activations": "uint8 (asymmetric)", "weights": "int8 per channel (symmetric)",
                 "calibration_method": ranges.method, "attention_nodes": plan["attention"],
                 "kept_modules": plan["kept"], "kept_nodes": sorted(keep_nodes),
                 "int8_nodes": int8, "high_precision": "fp32"})
    return quantized, info


SWEEP_FRAMES = 8  # per stream: the sweep streams this many calibration frames per placement


def quantize_cpu_engines(src: Path, stage: Path, work: Path, samples, streams, engines, conversion,
                         progress: bool = True) -> dict:
    """The CPU INT8 graphs of ``engines`` (file names as exported) into ``stage``: ranges calibrated once per
    engine on ``samples``, the float32 layers chosen by the sensitivity sweep on the calibration streams
    (unless ``conversion.sweep`` is off), plus ``conversion.int8_keep``'s modules. Returns what was done per
    engine for the manifest."""
    from .cpu_sweep import sweep
    from .quantize import SampleReader
    files = {e: f"{e}.onnx" for e in ("frame_encoder", "memory_head")}
    graphs = {e: named_copy(src / f, work) for e, f in files.items()}
    readers = {e: SampleReader(samples.graph_inputs(e), conversion.batch) for e in engines}
    ranges = {e: RangeCache(work / f"{e}.ranges.json", conversion.method) for e in engines}
    kept = {e: [] for e in engines}
    found = None
    if conversion.sweep:
        log.info("int8 (cpu): sensitivity sweep over the layers of %s", ", ".join(files[e] for e in engines))
        sweep_streams = [s[:SWEEP_FRAMES] for s in streams.streams[:2]]
        found = sweep({e: graphs[e] for e in engines}, graphs, readers, ranges, sweep_streams, conversion.batch,
                      work, conversion.int8_keep, threads=conversion.threads, progress=progress)
        kept = found.kept
    done = {}
    for e in engines:
        log.info("%s: int8 for ONNX Runtime's CPU kernels (%s ranges on %d batches), %d layers float32 by the "
                 "sweep", files[e], conversion.method, len(readers[e]), len(kept[e]))
        _, info = quantize_cpu_int8(graphs[e], stage / files[e], readers[e], ranges[e],
                                    keep_modules=conversion.int8_keep.get(e, ()), keep_nodes=kept[e])
        info["calibration_batches"] = len(readers[e])
        info["sweep"] = None if found is None else found.to_dict()
        done[e] = info
    return done


# ONNX Runtime quantization classes whose methods ModelOpt replaces for its own PTQ, process-wide and for good,
# once it has quantized anything (modelopt.onnx.quantization.ort_patching): module -> class names.
_PATCHED = {"calibrate": ("CalibraterBase", "MinMaxCalibrater", "HistogramCalibrater", "HistogramCollector"),
            "qdq_quantizer": ("QDQQuantizer",), "base_quantizer": ("BaseQuantizer",)}


@contextlib.contextmanager
def ort_unpatched():
    """ONNX Runtime's own quantization code for the duration of the block, where ModelOpt patched it in this
    process (its per-batch histogram collection breaks percentile and entropy ranges: "Histogram has not been
    collected"); ModelOpt's patches are put back afterwards. The originals come from a private copy of each module."""
    import importlib
    import importlib.util
    restore = []
    for module_name, classes in _PATCHED.items():
        module = importlib.import_module(f"onnxruntime.quantization.{module_name}")
        patched = [(module, name) for name, v in vars(module).items()
                   if callable(v) and getattr(v, "__module__", "").startswith("modelopt")]
        patched += [(getattr(module, c), name) for c in classes for name, v in vars(getattr(module, c)).items()
                    if callable(v) and getattr(v, "__module__", "").startswith("modelopt")]
        if not patched:
            continue
        spec = importlib.util.find_spec(module.__name__)
        fresh = importlib.util.module_from_spec(spec)
        fresh.__package__ = module.__package__
        spec.loader.exec_module(fresh)
        for owner, name in patched:
            source = fresh if owner is module else getattr(fresh, owner.__name__)
            restore.append((owner, name, vars(owner)[name]))
            if name in vars(source):
                setattr(owner, name, vars(source)[name])
            else:  # ModelOpt added it over an inherited method
                delattr(owner, name)
    try:
        yield
    finally:
        for owner, name, value in restore:
            setattr(owner, name, value)


class _ort_quant_logs_quiet:
    """ONNX Runtime's quantizer logs a pre-processing advice per call on the root logger."""

    def __enter__(self):
        self.root = logging.getLogger()
        self.level = self.root.level
        self.root.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.root.setLevel(self.level)


__all__ = ["quantize_cpu_engines", "quantize_cpu_int8", "cpu_plan", "quantizable_nodes", "RangeCache", "named_copy", "CPU_QUANTIZED_OPS",
           "METHODS"]
