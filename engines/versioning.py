"""Which TensorRT build recipe applies, and whether an engine can run here: pure functions, no TensorRT needed.

TensorRT 11 removed weak typing (BuilderFlag.FP16/INT8, calibrators): an engine's precision comes from the ONNX
graph (FP16 from AutoCast, INT8 from explicit Q/DQ nodes) built as a strongly typed network. TensorRT 10.x
(what JetPack 6 ships on Jetson Orin) builds strongly typed networks too, and still accepts the weak builder
flags on an FP32 graph when asked. We build strongly typed by default on both, so one ONNX file gives the same
engine precision on 10 and 11.

A serialized engine runs only on the TensorRT version that built it and on GPUs of the same compute capability
(we build neither version- nor hardware-compatible engines): :func:`check_compatible` says which one differs.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from tmanet.errors import UserError

MIN_TENSORRT_MAJOR = 10
WEAK_TYPING_LAST_MAJOR = 10           # TensorRT 11 removed BuilderFlag.FP16/INT8 and the INT8 calibrators

# Precision names an ONNX manifest may carry -> canonical name of the graph's precision.
ONNX_PRECISIONS = {
    "fp32": "fp32", "float32": "fp32",
    "fp16": "fp16", "float16": "fp16", "mixed": "fp16", "fp16-mixed": "fp16",
    "int8": "int8", "int8-qdq": "int8", "qdq": "int8",
}
WEAK_REQUESTS = ("fp16", "int8")


class EngineCompatibilityError(UserError):
    """A serialized engine cannot run on this machine (TensorRT version or GPU differ)."""


@dataclass(frozen=True)
class BuildPlan:
    strongly_typed: bool
    fp16_flag: bool
    int8_flag: bool
    precision: str        # what the engine computes in: fp32 | fp16 | int8 (from the graph), fp16-weak | int8-weak
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def parse_trt_version(version) -> tuple[int, int, int]:
    """'10.3.0.26', '11.0.1', '10.0.0b6', '10.3' -> (major, minor, patch); the build number is dropped because
    engine compatibility follows the release, not the build."""
    if isinstance(version, (tuple, list)):
        parts = [int(p) for p in version][:3]
    else:
        m = re.match(r"^\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(version))
        if not m:
            raise ValueError(f"not a TensorRT version: {version!r}")
        parts = [int(p) for p in m.groups() if p is not None]
    if not parts:
        raise ValueError(f"not a TensorRT version: {version!r}")
    return tuple(parts + [0] * (3 - len(parts)))


def format_version(version) -> str:
    return ".".join(str(p) for p in parse_trt_version(version))


def normalize_precision(precision: str) -> str:
    key = str(precision).lower().strip()
    if key not in ONNX_PRECISIONS:
        raise UserError(f"unknown ONNX precision {precision!r}: expected one of fp32, fp16, int8 (Q/DQ)")
    return ONNX_PRECISIONS[key]


def build_plan(trt_version, onnx_precision: str, requested: str | None = None) -> BuildPlan:
    """How to build an engine from an ONNX graph of ``onnx_precision`` with TensorRT ``trt_version``.

    ``requested`` = None (precision from the graph, strongly typed) or 'fp16' / 'int8': weakly typed builder
    flags on an FP32 graph, TensorRT 10.x only.
    """
    version = parse_trt_version(trt_version)
    vs = format_version(version)
    graph = normalize_precision(onnx_precision)
    if version[0] < MIN_TENSORRT_MAJOR:
        raise UserError(f"TensorRT {vs} is not supported: tmanet needs TensorRT {MIN_TENSORRT_MAJOR} or newer "
                        "(named I/O tensors, strongly typed networks)")
    if requested is not None:
        requested = str(requested).lower()
        if requested not in WEAK_REQUESTS:
            raise UserError(f"unknown weak precision {requested!r}: expected fp16 or int8")
        if version[0] > WEAK_TYPING_LAST_MAJOR:
            how = ("an FP16 ONNX (ModelOpt AutoCast)" if requested == "fp16"
                   else "an INT8 Q/DQ ONNX (ModelOpt PTQ, `tmanet calibrate`)")
            raise UserError(f"--weak-{requested} needs TensorRT 10.x: TensorRT {vs} removed weakly typed "
                            f"precision flags, so build from {how} instead (strongly typed)")
        if graph != "fp32":
            raise UserError(f"--weak-{requested} applies to an FP32 graph, but this ONNX is {graph}: its "
                            "precision already lives in the graph, so build it without a weak flag")
        # Weak INT8 keeps FP16 enabled too: layers without an INT8 kernel or range fall back to FP16, not FP32.
        return BuildPlan(False, True, requested == "int8", f"{requested}-weak",
                         f"TensorRT {vs}: weakly typed FP32 graph with builder flag(s) "
                         + ("FP16" if requested == "fp16" else "INT8+FP16 (implicit quantization, calibrated)"))
    return BuildPlan(True, False, False, graph,
                     f"TensorRT {vs}: strongly typed, precision {graph} taken from the ONNX graph")


def format_compute_capability(cc) -> str:
    """(8, 7) / '8.7' / 'sm_87' / 87 -> 'sm_87'."""
    if isinstance(cc, (tuple, list)):
        major, minor = (int(c) for c in cc[:2])
        return f"sm_{major}{minor}"
    text = str(cc).strip().lower()
    m = re.fullmatch(r"(?:sm_?)?(\d+)\.(\d+)", text)
    if m:
        return f"sm_{int(m.group(1))}{int(m.group(2))}"
    m = re.fullmatch(r"(?:sm_?)?(\d{2,3})", text)
    if m:
        return f"sm_{m.group(1)}"
    raise ValueError(f"not a compute capability: {cc!r}")


def check_compatible(engine_meta: dict, runtime_trt_version, gpu_name: str, compute_capability) -> list[str]:
    """Raise :class:`EngineCompatibilityError` when the engine described by ``engine_meta`` (its sidecar) cannot
    run with this TensorRT on this GPU; return warnings for differences that still run (another GPU model of
    the same compute capability: it runs, but the tactics were timed on the other model)."""
    built_trt = parse_trt_version(engine_meta["tensorrt_version"])
    here_trt = parse_trt_version(runtime_trt_version)
    gpu = engine_meta.get("gpu", {})
    built_cc = format_compute_capability(gpu["compute_capability"])
    here_cc = format_compute_capability(compute_capability)
    built_name = gpu.get("name", "unknown GPU")

    differ = []
    if built_trt != here_trt:
        differ.append("TensorRT version")
    if built_cc != here_cc:
        differ.append("GPU")
    if differ:
        what = " and ".join(differ)
        name = engine_meta.get("engine", "engine")
        raise EngineCompatibilityError(
            f"{what} differ{'s' if len(differ) == 1 else ''} for {name}: engine built with TensorRT "
            f"{format_version(built_trt)} on {built_name} ({built_cc}); this machine has TensorRT "
            f"{format_version(here_trt)} on {gpu_name} ({here_cc}): rebuild with `tmanet build`")
    warnings = []
    if built_name != gpu_name:
        warnings.append(f"engine was built on {built_name} and runs on {gpu_name} (both {here_cc}): it works, "
                        "but rebuilding here may pick faster kernels")
    return warnings
