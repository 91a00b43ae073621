"""tmanet.calibration: FP16 / INT8 precision written into the ONNX graphs, and the accuracy gate.

TensorRT 11 builds strongly typed networks, so precision lives in the ONNX files: FP16 through ModelOpt
AutoCast (:mod:`.precision`), INT8 as explicit Q/DQ nodes from ModelOpt's ONNX PTQ calibrated on real frames
and on the memory encodings they produce when streamed in order (:mod:`.quantize`). :func:`calibrate` turns a
float32 export directory into a new one with the same file names and contract (I/O types unchanged, so every
runtime backend reads it as is) and checks it against the float32 export on ONNX Runtime (:mod:`.compare`).

Two INT8 targets: ``trt`` (ModelOpt's Q/DQ placement, what TensorRT fuses) and ``cpu`` (ONNX Runtime's own
static quantization, what its CPU integer kernels fuse, with a per-layer sensitivity sweep: :mod:`.cpu_quantize`,
:mod:`.cpu_sweep`). The gate never runs on calibration frames: it takes ``gate_frames`` or holds back the last
quarter of the frames given, then judges the worst of several unseen synthetic clips (:mod:`.gate_clips`).

The ``trt`` target and FP16 need the ``quant`` extra (nvidia-modelopt, onnx-graphsurgeon, onnxconverter-common,
ml_dtypes, lief, onnxslim); imports stay lazy so the rest of the toolkit works without it.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tmanet.export.manifest import check_replaceable
from tmanet.lazy_exports import lazy_getattr
from tmanet.safe_files import atomic_directory, check_output, refuse_overwriting_inputs
from tmanet.manifest import FRAME_ENCODER, MEMORY_HEAD, load_manifest

log = logging.getLogger("tmanet")

ENGINES = ("frame_encoder", "memory_head")
QUANT_TARGETS = ("trt", "cpu")  # whose kernels the INT8 Q/DQ placement is made for
HELD_BACK_FRACTION = 4           # without gate frames, the last 1/4 of the frames are the gate's

_LAZY = {
    "convert_fp16": "precision", "attention_nodes": "precision", "PrecisionError": "precision",
    "PRECISIONS": "precision",
    "quantize_int8": "quantize", "build_samples": "quantize", "frame_streams": "quantize",
    "SampleReader": "quantize", "CalibrationDataError": "quantize", "read_clip": "quantize",
    "compare_exports": "compare", "format_table": "compare", "CompareError": "compare", "TARGETS": "compare",
    "target_agreement": "compare",
}

__all__ = sorted(["calibrate", "resolve_precisions", "CalibrationError", *_LAZY])


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


class CalibrationError(ValueError):
    """Bad input for :func:`calibrate` (precisions, directories, frames); nothing was written."""


def resolve_precisions(precision=None, frame_precision=None, head_precision=None) -> dict:
    """Per-engine precisions: ``precision`` sets both, ``frame_precision`` / ``head_precision`` override."""
    from .precision import PRECISIONS
    chosen = {"frame_encoder": frame_precision or precision, "memory_head": head_precision or precision}
    for engine, p in chosen.items():
        if p is None:
            raise CalibrationError(f"no precision for the {engine.replace('_', ' ')}: give --precision, or both "
                                   "--frame-precision and --head-precision")
        if p not in PRECISIONS:
            raise CalibrationError(f"precision {p!r} for the {engine.replace('_', ' ')} is not one of {PRECISIONS}")
    if set(chosen.values()) == {"fp32"}:
        raise CalibrationError("both engines fp32: nothing to convert (the source export is fp32)")
    return chosen


def _check_out(src: Path, out: Path, overwrite: bool, frame_sources=()):
    if out.resolve() == src.resolve():
        raise CalibrationError(f"the output directory is the source export {src}: choose another --out")
    check_output(out, "dir", "--out")
    refuse_overwriting_inputs([out], [src, *(f for f in frame_sources if isinstance(f, (str, os.PathLike)))])
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CalibrationError(f"{out} exists and is not empty (use --force to replace it)")
        check_replaceable(out)  # even with --force, only an export directory is replaced


@dataclass(frozen=True)
class _Conversion:
    """How each engine's graph is converted: the precision options of :func:`calibrate`, checked."""
    precisions: dict             # engine -> fp32 | fp16 | int8
    keep_attention_fp32: bool
    method: str
    int8_high_precision: str
    quantize_residual: bool
    int8_keep: dict              # engine -> modules its INT8 graph keeps unquantized
    data_max: float
    reference_batches: int
    batch: int                   # the graphs' batch
    target: str = "trt"          # trt: ModelOpt Q/DQ for TensorRT; cpu: ONNX Runtime QDQ for its CPU kernels
    sweep: bool = True           # cpu: choose the float32 layers by the sensitivity sweep
    threads: int | None = None


def calibrate(src_dir, out_dir, frames, num: int | None = None, precision: str | None = None,
              frame_precision: str | None = None, head_precision: str | None = None,
              keep_attention_fp32: bool = True, method: str | None = None, int8_high_precision: str | None = None,
              quantize_residual: bool = False, int8_keep=None, data_max: float | None = None,
              reference_batches: int = 8, gate: bool = True, gate_frames=None, gate_num: int | None = None,
              overwrite: bool = False, threads: int | None = None, progress: bool = True, target: str = "trt",
              sweep: bool = True, gate_clips: int | None = None) -> dict:
    """Write the float32 export ``src_dir`` at new per-engine precisions into ``out_dir`` and return its
    manifest (``manifest["calibration"]["gate"]`` holds the comparison with ``src_dir`` when ``gate``).

    ``frames``: video / image folder / ``.npy`` clip / uint8 array, the first ``num`` frames (default 64) are
    the calibration data (frames larger than the export are cut into the runtime's slide windows); without
    ``gate_frames`` the last quarter of them is held back for the gate and not calibrated on.
    ``target``: 'trt' (ModelOpt Q/DQ, TensorRT's placement) or 'cpu' (ONNX Runtime QDQ for its CPU integer
    kernels, INT8 only; ``sweep`` chooses its float32 layers by a per-layer sensitivity sweep).
    ``keep_attention_fp32``: the memory read's MatMul/Softmax stay float32 in float16 graphs. ``method``:
    INT8 range calibration, 'entropy' (trt default) or 'max'; the cpu target also 'percentile' (its default). ``int8_high_precision``: what INT8 graphs run unquantized
    parts in ('fp16' or 'fp32'). ``quantize_residual``: quantize the residual shortcuts (identity additions,
    downsample convolutions) too, ModelOpt's default placement; off: they stay high precision.
    ``int8_keep``: torch module paths (e.g. 'backbone.layer1') left unquantized in the INT8 graphs (default:
    for the trt target, those of ``TRT_DEFAULT_KEEP`` the graphs hold; for the cpu target, none: its sweep
    chooses). ``data_max``: AutoCast keeps nodes with larger float32 values in float32.
    ``reference_batches``: batches for AutoCast's float32 reference run. The gate streams ``gate_frames``
    (default: the held-back frames) through both exports, then ``gate_clips`` unseen synthetic driving clips
    (default 4, :mod:`.gate_clips`) one by one; it passes when the gate frames and the worst clip reach the
    target. On error nothing is left behind in ``out_dir``.
    """
    from tmanet.export.manifest import write_manifest

    from .gate_clips import GATE_CLIPS, gate_seeds
    from .precision import require_modelopt
    from .quantize import engine_batch, frame_streams
    precisions = resolve_precisions(precision, frame_precision, head_precision)
    try:
        seeds = gate_seeds(GATE_CLIPS if gate_clips is None else gate_clips)
    except ValueError as e:
        raise CalibrationError(str(e)) from None
    int8_high_precision = _checked_target(target, precisions, int8_high_precision, quantize_residual)
    method = method or ("percentile" if target == "cpu" else "entropy")
    num, data_max = _checked_options(method, int8_high_precision, num, reference_batches, data_max, target)
    src, out = Path(src_dir), Path(out_dir)
    spec = _fp32_spec(src)
    _check_out(src, out, overwrite, (frames, gate_frames))
    if target == "trt" or "fp16" in precisions.values():
        require_modelopt()
    conversion = _Conversion(precisions, keep_attention_fp32, method, int8_high_precision, quantize_residual,
                             _int8_keep(src, precisions, target, int8_keep), data_max, reference_batches,
                             engine_batch(spec), target, sweep, threads)
    streams = frame_streams(frames, spec.input_size, spec, num)
    held_back = None
    if gate and gate_frames is None:
        streams, held_back = hold_back(streams)
    with atomic_directory(out) as stage:  # the previous out_dir stays whole until the new one is complete
        engines = _convert_engines(src, stage, spec, streams, conversion, progress)
        new = _calibrated_manifest(spec, src, stage, precisions, streams, engines, target)
        write_manifest(stage, new)
        if gate:
            new["calibration"]["gate"] = _gate(src, stage, out, held_back, gate_frames, gate_num, seeds,
                                               threads, progress)
            write_manifest(stage, new)
    new["directory"] = str(out)
    return new


def _checked_target(target, precisions, int8_high_precision, quantize_residual) -> str:
    """The INT8 high precision for ``target`` (fp16 for trt unless given; cpu: always fp32), after checking
    that the options fit the target."""
    if target not in QUANT_TARGETS:
        raise CalibrationError(f"target must be one of {QUANT_TARGETS}, got {target!r}")
    if target == "trt":
        return int8_high_precision or "fp16"
    if "fp16" in precisions.values():
        raise CalibrationError("--target cpu writes INT8 for ONNX Runtime's CPU kernels (they have no fast "
                               "float16): give each engine int8 or fp32")
    if int8_high_precision == "fp16" or quantize_residual:
        raise CalibrationError("--target cpu keeps its unquantized layers and the residual additions float32: "
                               "--int8-high-precision fp16 and --quantize-residual are TensorRT-target options")
    return "fp32"


def hold_back(streams):
    """(calibration streams, gate clip): the last quarter of the frames (at least one) are held back for the
    gate, so it never measures frames the calibration saw."""
    from .quantize import FrameStreams
    if streams.frames < 2:
        raise CalibrationError(f"{streams.frames} frame: the gate needs frames the calibration did not see; give "
                               "more frames (the last quarter is held back) or --gate-frames")
    held = max(1, streams.frames // HELD_BACK_FRACTION)
    keep = streams.frames - held
    calib = FrameStreams([s[:keep] for s in streams.streams], streams.windows, streams.clip[:keep],
                         streams.source, streams.kind, streams.frame_size)
    return calib, {"clip": streams.clip[keep:], "first": keep, "count": held, "source": streams.source}


def _checked_options(method, int8_high_precision, num, reference_batches, data_max,
                     target="trt") -> tuple[int, float]:
    """(number of calibration frames, AutoCast data max), defaults filled in, after checking the options."""
    from .cpu_quantize import METHODS
    from .precision import AUTOCAST_DATA_MAX
    from .quantize import CALIBRATION_METHODS, DEFAULT_CALIBRATION_FRAMES
    methods = tuple(METHODS) if target == "cpu" else CALIBRATION_METHODS
    if method not in methods:
        raise CalibrationError(f"calibration method for the {target} target must be one of {methods}, got "
                               f"{method!r}")
    if int8_high_precision not in ("fp16", "fp32"):
        raise CalibrationError(f"int8 high precision must be fp16 or fp32, got {int8_high_precision!r}")
    num = DEFAULT_CALIBRATION_FRAMES if num is None else num
    if num < 1 or reference_batches < 1:
        raise CalibrationError(f"the number of frames and reference batches must be >= 1 (got {num}, "
                               f"{reference_batches})")
    return num, AUTOCAST_DATA_MAX if data_max is None else float(data_max)


def _fp32_spec(src: Path):
    spec = load_manifest(src)
    if any(p != "fp32" for p in spec.precision.values()):
        raise CalibrationError(f"{src} is not a float32 export (precision {spec.precision}): calibrate from "
                               "the fp32 export that `tmanet export` wrote")
    return spec


def _convert_engines(src: Path, stage: Path, spec, streams, conversion: _Conversion,
                     progress: bool) -> dict:
    """Each engine's graph at its precision into ``stage``; returns what was done per engine."""
    from .quantize import build_samples
    work = stage / "work"
    work.mkdir()
    need_head = conversion.precisions["memory_head"] != "fp32"
    log.info("calibration data: %d frames x %d stream(s) from %s%s", streams.frames, len(streams.streams),
             streams.source, ", streamed through the fp32 frame graph" if need_head else "")
    samples = build_samples(src, spec, streams, work, with_head=need_head, progress=progress)
    cpu_int8 = [e for e in ENGINES if conversion.target == "cpu" and conversion.precisions[e] == "int8"]
    engines = {engine: _convert_engine(engine, src, stage, work, samples, conversion) for engine in ENGINES
               if engine not in cpu_int8}
    if cpu_int8:
        from .cpu_quantize import quantize_cpu_engines
        engines.update(quantize_cpu_engines(src, stage, work, samples, streams, cpu_int8, conversion, progress))
        engines = {e: engines[e] for e in ENGINES}
    del samples  # its arrays may map files under work/
    shutil.rmtree(work)
    return engines


def _convert_engine(engine: str, src: Path, stage: Path, work: Path, samples, conversion: _Conversion) -> dict:
    from .precision import convert_fp16
    from .quantize import SampleReader, quantize_int8, write_reference_npz
    file = _graph_file(engine)
    p = conversion.precisions[engine]
    if p == "fp32":
        shutil.copyfile(src / file, stage / file)
        return {"tool": "copied from the source export"}
    if p == "fp16":
        ref = write_reference_npz(samples.graph_inputs(engine), work / f"reference_{engine}", conversion.batch,
                                  conversion.reference_batches)
        log.info("%s: float16 (AutoCast, %d reference batches)...", file, len(list(ref.iterdir())))
        done = convert_fp16(src / file, stage / file, reference_data=ref,
                            keep_attention_fp32=conversion.keep_attention_fp32, data_max=conversion.data_max)
        done["reference_batches"] = len(list(ref.iterdir()))
        return done
    log.info("%s: int8 PTQ (%s calibration on %d samples)...", file, conversion.method, len(samples))
    reader = SampleReader(samples.graph_inputs(engine), conversion.batch)
    return quantize_int8(src / file, stage / file, reader, method=conversion.method,
                         high_precision=conversion.int8_high_precision,
                         keep_attention_fp32=conversion.keep_attention_fp32,
                         quantize_residual=conversion.quantize_residual,
                         keep_modules=conversion.int8_keep[engine], workdir=work)


def _calibrated_manifest(spec, src: Path, stage: Path, precisions: dict, streams, engines: dict,
                         target: str) -> dict:
    """The source manifest with the new precisions and files, and how they were made (gate: not yet)."""
    from tmanet.export.manifest import file_entries

    from .precision import modelopt_version
    new = {k: v for k, v in spec.to_dict().items() if k not in ("check", "calibration")}
    new["precision"] = precisions
    new["target"] = target
    new["files"] = file_entries(stage, [FRAME_ENCODER, MEMORY_HEAD])
    new["calibration"] = {
        "source_export": str(src.resolve()),
        "source_files": spec.files,
        "source_check": spec.check,
        "frames": streams.describe(),
        "precision": precisions,
        "io_types": "unchanged: uint8 frames, float32 encodings and logits, uint8 mask",
        "engines": engines,
        "target": target,
        "modelopt": modelopt_version(),
        "versions": _versions(),
        "gate": None,
    }
    return new


def _gate(src: Path, stage: Path, out: Path, held_back, gate_frames, gate_num, seeds, threads, progress) -> dict:
    """The staged export against the source on ``gate_frames`` (or the frames held back from calibration),
    then on the unseen clips of ``seeds`` at the export size: ``passed`` when both reach the target
    (``frames_passed``: the gate frames alone; ``clips``: each clip and the worst)."""
    from .compare import compare_exports, compare_unseen_clips
    clip = gate_frames if gate_frames is not None else held_back["clip"]
    result = compare_exports(src, stage, clip, num=gate_num, threads=threads, progress=progress)
    result["b"]["directory"] = str(out)
    if gate_frames is None:
        first, count = held_back["first"], min(held_back["count"], gate_num or held_back["count"])
        result["source"] = held_back["source"]
        result["gate_frames"] = (f"frames {first}..{first + count - 1} of {held_back['source']}, held back from "
                                 "calibration")
    else:
        result["gate_frames"] = f"--gate-frames {result['source']} (not calibrated on)"
    result["frames_passed"] = result["passed"]
    result["clips"] = None
    if seeds:
        clips = compare_unseen_clips(src, stage, seeds, threads=threads, progress=progress)
        clips["b"]["directory"] = str(out)
        result["clips"] = clips
        if result["passed"] is not None:
            result["passed"] = bool(result["passed"] and clips["passed"])
    return result


def _int8_keep(src: Path, precisions: dict, target: str, keep) -> dict:
    """Per INT8 engine, the modules ``keep`` names that its graph holds, in order; every module must be in one
    of them. ``keep`` None: the target's default (trt: the modules of ``TRT_DEFAULT_KEEP`` the graphs hold)."""
    from .precision import module_names
    from .quantize import TRT_DEFAULT_KEEP
    int8 = {e: _graph_file(e) for e in ENGINES if precisions[e] == "int8"}
    default = keep is None
    keep = (TRT_DEFAULT_KEEP if target == "trt" else ()) if default else tuple(keep)
    if not keep or (default and not int8):
        return {e: [] for e in int8}
    if not int8:
        raise CalibrationError(f"modules to keep unquantized ({', '.join(keep)}) apply to INT8 engines only; "
                               f"the precisions are {precisions}")
    import onnx
    modules = {e: set(module_names(onnx.load(str(src / f), load_external_data=False))) for e, f in int8.items()}
    found = {e: [m for m in keep if m in names] for e, names in modules.items()}
    missing = [m for m in keep if not any(m in f for f in found.values())]
    if missing and not default:
        known = sorted({m for names in modules.values() for m in names if m.count(".") <= 1})
        if not known:
            raise CalibrationError(f"{src}: the graphs record no module names (exported by an older tmanet "
                                   "export?): re-export the checkpoint to keep modules unquantized")
        raise CalibrationError(f"no module {', '.join(map(repr, missing))} in the INT8 graph(s) "
                               f"({', '.join(int8.values())}); modules include: {', '.join(known)}")
    return found


def _graph_file(engine: str) -> str:
    return {"frame_encoder": FRAME_ENCODER, "memory_head": MEMORY_HEAD}[engine]


def _versions() -> dict:
    from tmanet.export.manifest import library_versions

    from .precision import modelopt_version
    return {**library_versions(), "nvidia-modelopt": modelopt_version()}
