"""CPU INT8 side by side: ONNX Runtime and OpenVINO on the same export directories, timed in one run.

    python -m tmanet.calibration.cpu_bench FP32_DIR [--cpu-int8 DIR] [--trt-int8 DIR] [--clips N] [--json F]

For every export given (the fp32 export, ``tmanet calibrate --target cpu`` and ``--target trt`` INT8
exports of it): each engine's milliseconds on ONNX Runtime, and the whole frame's frames/s (a bare loop of the
two graphs through the memory ring, one frame at a time); with OpenVINO installed (``pip install openvino``,
imported lazily; the table says when it is not), the fp32 and cpu-int8 graphs on OpenVINO too, at f32 and at
its default precision on this CPU (bf16 where the CPU has AVX-512 BF16 / AMX; an engine whose calibration kept
float32 layers stays f32, as in the openvino backend). Every number comes from one
process run, the variants interleaved round by round (this machine's timings swing): compare the ratios. With
``--clips N`` each INT8 export is also checked on N unseen synthetic clips (worst clip reported).

ONNX Runtime sessions are made with ``session.intra_op.allow_spinning = 0``: two sessions whose idle threads
spin steal each other's cores (the runtime's own sessions get their fix elsewhere); the same setting for every
variant keeps the comparison fair.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from tmanet.manifest import ENGINE_FILES, load_manifest
from tmanet.memory import MemoryStepper
from tmanet.runtime.backends.openvino import kept_float


def ort_runner(path: Path, threads: int | None):
    """A callable ``feed -> outputs`` on an ONNX Runtime CPU session with spinning off."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return lambda feed: dict(zip(names, s.run(None, feed)))


def openvino_core():
    """OpenVINO's ``Core``, or None when it is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.Core()


def ov_runner(core, path: Path, precision: str | None, threads: int | None):
    """A callable ``feed -> outputs`` on OpenVINO's CPU plugin: ``precision`` 'f32' or None (its default)."""
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    names = [o.get_any_name() for o in compiled.outputs]

    def run(feed):
        result = request.infer(feed)
        return {n: np.asarray(result[o]) for n, o in zip(names, compiled.outputs)}
    return run


def ov_default_precision(core) -> str:
    """OpenVINO's default inference precision on this CPU ('bf16' with AVX-512 BF16 / AMX, else 'f32')."""
    hint = core.get_property("CPU", "INFERENCE_PRECISION_HINT")
    return hint.to_string() if hasattr(hint, "to_string") else str(hint)


class Variant:
    """One export on one runtime: per-engine runners and a whole-frame step through the memory ring."""

    def __init__(self, name, runners: dict, memory_frames: int):
        self.name, self.runners, self.T = name, runners, memory_frames

    def head_feed(self, qk, qv, keys, values):
        feed = {"query_key": qk, "query_value": qv}
        feed.update({f"memory_key_{i}": np.ascontiguousarray(keys[i]) for i in range(self.T)})
        feed.update({f"memory_value_{i}": np.ascontiguousarray(values[i]) for i in range(self.T)})
        return feed

    def stepper(self):
        def encode(batch):
            out = self.runners["frame_encoder"]({"frames": batch})
            return out["query_key"], out["query_value"], out["memory_key"], out["memory_value"]

        def head(qk, qv, keys, values):
            return self.runners["memory_head"](self.head_feed(qk, qv, keys, values))["mask"]
        return MemoryStepper(encode, head)


def time_call(fn, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def measure(variants: list, frames: np.ndarray, rounds: int, repeats: int) -> dict:
    """Per variant: each engine's ms and the whole frame's ms, the variants interleaved per round; the
    median over rounds of each round's median."""
    results = {v.name: {"frame_encoder": [], "memory_head": [], "frame": []} for v in variants}
    batch = np.ascontiguousarray(frames[:1])
    for _ in range(rounds):
        for v in variants:
            enc = v.runners["frame_encoder"]({"frames": batch})
            head_feed = v.head_feed(enc["query_key"], enc["query_value"],
                                    [enc["memory_key"][:, i] for i in range(v.T)],
                                    [enc["memory_value"][:, i] for i in range(v.T)])
            r = results[v.name]
            r["frame_encoder"].append(time_call(lambda: v.runners["frame_encoder"]({"frames": batch}), repeats))
            r["memory_head"].append(time_call(lambda: v.runners["memory_head"](head_feed), repeats))
            stepper = v.stepper()
            clip = iter(np.concatenate([frames] * (repeats // len(frames) + 2)))
            r["frame"].append(time_call(lambda: stepper.step(np.ascontiguousarray(next(clip)[None])), repeats))
    return {name: {k: float(np.median(v)) for k, v in r.items()} for name, r in results.items()}


def _variants(exports: dict, threads, with_openvino: bool):
    """(variants, openvino note): each export on ONNX Runtime; fp32 and cpu-int8 also on OpenVINO f32 and
    its default precision."""
    variants, note = [], None
    specs = {k: load_manifest(d) for k, d in exports.items()}
    for kind, d in exports.items():
        variants.append(Variant(f"ort {kind}", {e: ort_runner(Path(d) / f, threads) for e, f in ENGINE_FILES},
                                specs[kind].memory_frames))
    if not with_openvino:
        return variants, "OpenVINO: skipped (--no-openvino)"
    core = openvino_core()
    if core is None:
        return variants, "OpenVINO: not installed (pip install openvino) - its columns are missing"
    default = ov_default_precision(core)
    note = f"OpenVINO {__import__('openvino').__version__}: default CPU inference precision {default}"
    for kind in [k for k in ("fp32", "cpu-int8") if k in exports]:
        # its default is a second variant only where it is not f32 (bf16 on CPUs with AVX-512 BF16 / AMX); as
        # in the openvino backend, an engine whose calibration kept float32 layers stays f32 there
        for precision, label in (("f32", "f32"), *(((None, default),) if default != "f32" else ())):
            hint = {e: "f32" if precision or kept_float(specs[kind], e) else None for e, _ in ENGINE_FILES}
            variants.append(Variant(f"openvino {kind} {label}",
                                    {e: ov_runner(core, Path(exports[kind]) / f, hint[e], threads)
                                     for e, f in ENGINE_FILES}, specs[kind].memory_frames))
    return variants, note


def format_table(times: dict, baseline: str = "ort fp32") -> str:
    base = times[baseline]["frame"]
    rows = [f"{'variant':<28} {'frame engine ms':>15} {'head ms':>8} {'frame ms':>9} {'frames/s':>9} {'vs fp32':>8}"]
    for name, t in times.items():
        rows.append(f"{name:<28} {t['frame_encoder']:>15.1f} {t['memory_head']:>8.1f} {t['frame']:>9.1f} "
                    f"{1e3 / t['frame']:>9.1f} {base / t['frame']:>7.2f}x")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tmanet.calibration.cpu_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("fp32", metavar="FP32_DIR", help="fp32 export directory (tmanet export)")
    p.add_argument("--cpu-int8", metavar="DIR", help="tmanet calibrate --target cpu --precision int8 output")
    p.add_argument("--trt-int8", metavar="DIR", help="tmanet calibrate --target trt --precision int8 output")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per round and measurement (default 10)")
    p.add_argument("--threads", type=int, help="threads per session (default: the runtime's)")
    p.add_argument("--clips", type=int, default=0, metavar="N",
                   help="also gate each INT8 export on N unseen synthetic clips (worst clip reported)")
    p.add_argument("--no-openvino", action="store_true", help="ONNX Runtime only")
    p.add_argument("--json", metavar="F", help="write the results as JSON")
    a = p.parse_args(argv)
    from .gate_clips import MAX_GATE_CLIPS, gate_seeds, unseen_clips
    if a.rounds < 1 or a.repeats < 1 or not 0 <= a.clips <= MAX_GATE_CLIPS:
        p.error(f"--rounds and --repeats must be >= 1, --clips in 0..{MAX_GATE_CLIPS}")
    exports = {"fp32": a.fp32, **({"cpu-int8": a.cpu_int8} if a.cpu_int8 else {}),
               **({"trt-int8": a.trt_int8} if a.trt_int8 else {})}
    spec = load_manifest(a.fp32)
    H, W = spec.input_size
    frames = unseen_clips(H, W, seeds=(2026,), frames=8)[0][1]
    variants, note = _variants(exports, a.threads, not a.no_openvino)
    times = measure(variants, frames, a.rounds, a.repeats)
    print(f"{H}x{W}, T={spec.memory_frames}, batch 1, {a.rounds} rounds x {a.repeats} calls, ORT spinning off")
    print(note)
    print(format_table(times))
    out = {"input_size": [H, W], "times_ms": times, "openvino": note, "gates": {}}
    if a.clips:
        from .compare import compare_clips, format_clips
        clips = unseen_clips(H, W, seeds=gate_seeds(a.clips))
        for kind in [k for k in ("cpu-int8", "trt-int8") if k in exports]:
            g = compare_clips(a.fp32, exports[kind], clips, threads=a.threads, progress=False)
            print(f"\n{kind} against fp32 on {a.clips} unseen clips:\n{format_clips(g)}")
            out["gates"][kind] = g
        # OpenVINO's bf16 is a lower precision too: judged on the same clips against ORT fp32
        for kind in [k for k in ("fp32", "cpu-int8") if f"openvino {k} bf16" in times]:
            g = compare_clips(a.fp32, exports[kind], clips, threads=a.threads, progress=False,
                              backends=(("ort", {}), ("openvino", {"precision": "bf16"})))
            print(f"\nopenvino {kind} bf16 against ORT fp32 on {a.clips} unseen clips:\n{format_clips(g)}")
            out["gates"][f"openvino {kind} bf16"] = g
    if a.json:
        from tmanet.safe_files import write_json
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
