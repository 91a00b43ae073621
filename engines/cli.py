"""``tmanet build``: TensorRT engines from an ONNX export directory."""
from __future__ import annotations


def register(sub):
    p = sub.add_parser(
        "build", help="build TensorRT engines from an ONNX export",
        description="Build frame_encoder.engine and memory_head.engine (with .engine.json metadata and "
                    "engines.json) from an export directory, for this machine's TensorRT and GPU. Precision "
                    "comes from the ONNX graphs (strongly typed); TensorRT 10.x also takes weak FP16/INT8 "
                    "builder flags on an FP32 export.")
    p.add_argument("dir", help="export directory (manifest.json, frame_encoder.onnx, memory_head.onnx)")
    p.add_argument("--out", help="directory for the engines (default: the export directory)")
    p.add_argument("--batch", help="N or MIN,OPT,MAX: batch profile of a dynamic-batch export (default 1,1,8); "
                                   "a fixed-batch export keeps its batch")
    p.add_argument("--workspace", type=float, metavar="GB", help="builder workspace limit in GiB")
    p.add_argument("--timing-cache", metavar="FILE", help="tactic timing cache: read if present, updated after")
    weak = p.add_mutually_exclusive_group()
    weak.add_argument("--weak-fp16", action="store_true",
                      help="TensorRT 10.x only: weakly typed FP16 builder flag on an FP32 export")
    weak.add_argument("--weak-int8", action="store_true",
                      help="TensorRT 10.x only: weakly typed INT8 (+FP16) with calibration (--calib-frames)")
    p.add_argument("--calib-frames", metavar="CLIP", help="uint8 clip (.npy, video or image folder) at the "
                                                          "export size for --weak-int8 calibration")
    p.add_argument("--force", action="store_true", help="rebuild even when the engines are up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from tmanet.errors import UserError

    from .build import build_engines, parse_batch, refuse_cpu_target, require_tensorrt
    refuse_cpu_target(args.dir)  # a CPU INT8 export is never TensorRT's, installed or not
    require_tensorrt()  # then: without TensorRT nothing else here matters
    if args.workspace is not None and args.workspace <= 0:
        raise UserError(f"--workspace must be a positive number of GiB, got {args.workspace}")
    weak = "fp16" if args.weak_fp16 else "int8" if args.weak_int8 else None
    if args.calib_frames and weak != "int8":
        raise UserError("--calib-frames is for --weak-int8 calibration (Q/DQ exports carry their own scales)")
    batch = parse_batch(args.batch) if args.batch is not None else None
    _check_build_outputs(args)
    calib = _read_clip(args.calib_frames) if args.calib_frames else None
    result = build_engines(args.dir, out_dir=args.out, batch=batch, workspace_gb=args.workspace,
                           timing_cache=args.timing_cache, weak_precision=weak, progress=not args.no_progress,
                           calib_frames=calib, force=args.force)
    out = args.out or args.dir
    for name, entry in result["engines"].items():
        print(f"{out}/{entry['file']}: {entry['precision']}, {entry['bytes'] / 1e6:.1f} MB")
    gpu = result["gpu"]
    print(f"TensorRT {result['tensorrt_version']} on {gpu['name']} ({gpu['compute_capability']}); "
          f"batch {result['batch']['min']}..{result['batch']['max']} (opt {result['batch']['opt']})")
    return 0


MAX_CALIB_FRAMES = 512


def _check_build_outputs(args):
    """The engine folder can be written and no engine file, sidecar or engines.json is one of the inputs."""
    from pathlib import Path

    from tmanet.manifest import FRAME_ENCODER, MANIFEST, MEMORY_HEAD
    from tmanet.safe_files import check_output, refuse_overwriting_inputs

    from .metadata import ENGINE_NAMES, ENGINES_MANIFEST, engine_path, sidecar_path
    out = Path(args.out or args.dir)
    check_output(out, "dir", "--out")
    engines = [engine_path(out, name) for name in ENGINE_NAMES]
    outputs = engines + [sidecar_path(e) for e in engines] + [out / ENGINES_MANIFEST]
    src = Path(args.dir)
    refuse_overwriting_inputs(outputs, [src / MANIFEST, src / FRAME_ENCODER, src / MEMORY_HEAD, args.calib_frames,
                                        args.timing_cache])


def _read_clip(path):
    """A .npy clip as it is; a video or image folder through the runtime's reader (first 512 frames)."""
    from pathlib import Path
    if Path(path).suffix == ".npy":
        return path
    import numpy as np

    from tmanet.io.video import open_frames
    return np.stack([frame for frame, _ in open_frames(path, max_frames=MAX_CALIB_FRAMES)])
