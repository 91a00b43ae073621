"""Which low-precision arithmetic the CPU has natively, and what that means for the CPU paths.

ONNX Runtime's integer convolutions pay off only where the CPU multiplies 8-bit integers natively (x86 VNNI /
AMX, Arm dot-product), and OpenVINO's bf16 only where it has AVX-512 BF16 or AMX (docs/CPU_INT8.md). Read from
``/proc/cpuinfo`` (Linux); elsewhere nothing is known and nothing is said.
"""
from __future__ import annotations

import functools
from pathlib import Path

INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")  # x86 VNNI / AMX, Arm v8.2 dot-product
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def parse_flags(cpuinfo: str) -> frozenset:
    """The feature flags of the first processor in a ``/proc/cpuinfo`` text (x86 ``flags``, Arm ``Features``)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """This machine's CPU feature flags; empty where they cannot be read."""
    try:
        return parse_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()


def cpu_hints(backend: str, precision: dict, target: str, flags: frozenset, openvino: bool) -> list[str]:
    """One sentence per thing a user of ``backend`` on this CPU should know about the export's precision
    (``precision``: engine -> fp32|fp16|int8, ``target``: its INT8 placement) and the faster paths."""
    if backend != "ort" or not flags:
        return []
    hints = []
    int8 = "int8" in precision.values()
    if int8 and target == "trt":
        hints.append("this INT8 export is placed for TensorRT (--target trt): ONNX Runtime's CPU kernels run it "
                     "slower than fp32; for the CPU, calibrate with --target cpu")
    elif int8 and not flags & set(INT8_DOT_FLAGS):
        hints.append("this CPU has no VNNI / AMX / dot-product instructions: ONNX Runtime's INT8 gains little "
                     "over fp32 here (docs/CPU_INT8.md)")
    if openvino and flags & set(BF16_FLAGS):
        hints.append("this CPU has AVX-512 BF16 / AMX: --backend openvino --precision bf16 runs the fp32 graphs "
                     "in bfloat16, often 2x faster or more than ONNX Runtime (its agreement with fp32: tmanet "
                     "compare DIR --backends ort,openvino:bf16 --clips 4)")
    return hints


__all__ = ["cpu_flags", "cpu_hints", "parse_flags", "INT8_DOT_FLAGS", "BF16_FLAGS"]
