"""``tmanet calibrate`` (FP16 / INT8 ONNX from an fp32 export) and ``tmanet compare`` (the accuracy gate)."""
from __future__ import annotations

import argparse

from .gate_clips import GATE_CLIPS, GATE_FRAMES
from .quantize import TRT_DEFAULT_KEEP

PRECISION_CHOICES = ("fp32", "fp16", "int8")


def register(sub):
    p = sub.add_parser(
        "calibrate", help="write an fp32 export at FP16 / INT8 precision (ModelOpt), checked against fp32",
        description="Convert the two ONNX graphs of an fp32 export directory to FP16 (ModelOpt AutoCast) or "
                    "INT8 (ModelOpt PTQ, explicit Q/DQ) per engine, calibrated on real frames; the memory "
                    "head is calibrated on the memory encodings those frames produce when streamed in order. "
                    "Engine I/O types are kept, so every runtime backend reads the result as is. Prints the "
                    "accuracy gate against the fp32 export (exit status 1 when it fails).")
    p.add_argument("export_dir", metavar="DIR", help="fp32 export directory (tmanet export)")
    p.add_argument("--frames", required=True, metavar="SRC",
                   help="calibration frames: video, image folder or .npy uint8 clip (F,H,W,3), at least the "
                        "export size (larger frames are cut into the runtime's slide windows)")
    p.add_argument("--num", type=int, metavar="N", help="calibration frames to use (default 64)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, help="precision of both engines")
    p.add_argument("--target", choices=("trt", "cpu"), default="trt",
                   help="whose INT8 kernels the Q/DQ placement is made for: trt (default; ModelOpt PTQ, what "
                        "TensorRT fuses) or cpu (ONNX Runtime static quantization: uint8 activations, int8 "
                        "per-channel weights, what its x86 VNNI / Arm dot-product kernels fuse; float32 layers "
                        "chosen by a sensitivity sweep; `tmanet build` refuses it)")
    p.add_argument("--no-sweep", action="store_true",
                   help="--target cpu: skip the per-layer sensitivity sweep (only --int8-keep modules and the "
                        "attention read stay float32)")
    p.add_argument("--frame-precision", choices=PRECISION_CHOICES, help="frame engine precision (overrides)")
    p.add_argument("--head-precision", choices=PRECISION_CHOICES, help="memory-head precision (overrides)")
    p.add_argument("--keep-attention-fp32", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the memory read's MatMul/Softmax in fp32 (default: on; its unscaled q.k logits "
                        "can overflow fp16)")
    p.add_argument("--method", choices=("entropy", "max", "percentile"),
                   help="INT8 range calibration (default: entropy, ModelOpt's default, for --target trt; "
                        "percentile 99.99 for --target cpu)")
    p.add_argument("--int8-high-precision", choices=("fp16", "fp32"),
                   help="precision of the unquantized parts of INT8 graphs (default fp16; --target cpu: fp32)")
    p.add_argument("--quantize-residual", action="store_true",
                   help="INT8: quantize the residual shortcuts too (identity additions and downsample "
                        "convolutions: ModelOpt's default placement, lets TensorRT fuse the additions into INT8 "
                        "convolutions, less accurate). Default: the shortcuts stay fp16/fp32")
    p.add_argument("--int8-keep", action="append", metavar="MODULE",
                   help="INT8: leave this torch module and its submodules unquantized, by its path in the "
                        "model (e.g. backbone.layer1, backbone.layer2.0.downsample, key_conv); repeatable. "
                        f"Default for --target trt: {' '.join(TRT_DEFAULT_KEEP)} (where the model has them); "
                        "'none': quantize them too")
    p.add_argument("--data-max", type=float, metavar="X",
                   help="FP16: AutoCast keeps nodes whose fp32 values exceed X in fp32 (default 512)")
    p.add_argument("--reference-batches", type=int, default=8, metavar="K",
                   help="FP16: batches of real inputs for AutoCast's fp32 reference run (default 8)")
    p.add_argument("--gate-frames", metavar="SRC",
                   help="frames for the accuracy gate, not calibrated on (default: the last quarter of --frames, "
                        "held back from calibration)")
    p.add_argument("--gate-num", type=int, metavar="N", help="gate frames to use (default: all)")
    p.add_argument("--gate-clips", type=int, default=GATE_CLIPS, metavar="N",
                   help=f"the gate also streams N unseen synthetic driving clips ({GATE_FRAMES} frames each, at the "
                        f"export size) and judges the worst (default {GATE_CLIPS}; 0: the gate frames only)")
    p.add_argument("--no-gate", action="store_true", help="skip the accuracy gate")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads for the gate (default: ORT's)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, metavar="DIR2", help="output directory")
    p.set_defaults(func=run_calibrate)

    c = sub.add_parser(
        "compare", help="compare two exports, or one export on two backends (pixel agreement, logits, mIoU)",
        description="Stream the same frames through two export directories (A = reference, usually fp32), or "
                    "through one export on two backends (--backends A,B, as Polygraphy's run --onnxrt --trt), "
                    "with the streaming runtime; report mask pixel agreement, the first frame whose masks differ, "
                    "the logits error and, with labels, each side's mIoU. Targets against fp32: FP16 >= 99.9 %, "
                    "INT8 >= 99 % pixel agreement (exit status 1 when B misses its target).")
    c.add_argument("dir_a", metavar="DIR_A", help="reference export directory")
    c.add_argument("dir_b", metavar="DIR_B", nargs="?", help="export directory to check (default: DIR_A, with "
                                                            "--backends)")
    c.add_argument("--backends", metavar="A,B", default="ort,ort",
                   help="the backends of A and B, each NAME or NAME:PRECISION (e.g. ort,openvino:bf16, "
                        "ort,trt; default ort,ort)")
    source = c.add_mutually_exclusive_group(required=True)
    source.add_argument("--frames", metavar="SRC", help="video, image folder or .npy uint8 clip")
    source.add_argument("--clips", type=int, metavar="N",
                        help=f"instead of --frames: N unseen synthetic driving clips at the export size, each "
                             f"streamed with fresh memory, judged by the worst (tmanet calibrate's gate uses "
                             f"{GATE_CLIPS})")
    c.add_argument("--labels", metavar="SRC", help="label maps: .npy uint8 (F,H,W) or a folder of single-channel "
                                                   "PNGs, one per frame in order; 255 = ignore")
    c.add_argument("--num", type=int, metavar="N", help="frames to compare (default: all)")
    c.add_argument("--threads", type=int, help="ONNX Runtime threads (default: ORT's)")
    c.add_argument("--json", metavar="F", help="also write the result as JSON to F")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=run_compare)


def _parse_backends(text: str) -> tuple:
    """``A,B`` -> ``((name, options), (name, options))``; each side NAME or NAME:PRECISION, checked against the
    backend registry (its names and precisions) in one line."""
    from tmanet.errors import UserError
    from tmanet.runtime.backends import backend_names, get_backend
    sides = text.split(",")
    if len(sides) != 2:
        raise UserError(f"--backends takes two backends A,B, got {text!r}")
    parsed = []
    for side in sides:
        name, _, precision = side.strip().partition(":")
        if name not in backend_names():
            raise UserError(f"--backends: unknown backend {name!r}; known: {', '.join(backend_names())}")
        options = {}
        if precision:
            choices = [o.choices for o in get_backend(name).options if o.key == "precision"]
            if not choices or precision not in choices[0]:
                raise UserError(f"--backends: the {name} backend takes no precision {precision!r}"
                                + (f" (it takes {', '.join(choices[0])})" if choices else ""))
            options["precision"] = precision
        parsed.append((name, options))
    return tuple(parsed)


def _positive(value, flag):
    from tmanet.errors import UserError
    if value is not None and value < 1:
        raise UserError(f"{flag} must be >= 1, got {value}")


def run_calibrate(args) -> int:
    from tmanet.errors import UserError

    from . import CalibrationError, calibrate
    from .compare import CompareError, format_clips, format_table
    from .precision import PrecisionError
    from .quantize import CalibrationDataError
    for value, flag in ((args.num, "--num"), (args.gate_num, "--gate-num"), (args.threads, "--threads"),
                        (args.reference_batches, "--reference-batches")):
        _positive(value, flag)
    try:
        manifest = calibrate(args.export_dir, args.out, args.frames, num=args.num, precision=args.precision,
                             frame_precision=args.frame_precision, head_precision=args.head_precision,
                             keep_attention_fp32=args.keep_attention_fp32, method=args.method,
                             int8_high_precision=args.int8_high_precision,
                             quantize_residual=args.quantize_residual,
                             int8_keep=None if args.int8_keep is None else [m for m in args.int8_keep if m != "none"],
                             data_max=args.data_max,
                             reference_batches=args.reference_batches, gate=not args.no_gate,
                             gate_frames=args.gate_frames, gate_num=args.gate_num, overwrite=args.force,
                             threads=args.threads, progress=not args.no_progress, target=args.target,
                             sweep=not args.no_sweep, gate_clips=args.gate_clips)
    except (CalibrationError, CalibrationDataError, CompareError, PrecisionError) as e:
        raise UserError(str(e)) from None
    prec = manifest["precision"]
    target = f", {manifest['target']} target" if "int8" in prec.values() else ""
    print(f"wrote {manifest['directory']}/ (frame_encoder.onnx: {prec['frame_encoder']}, memory_head.onnx: "
          f"{prec['memory_head']}{target}, manifest.json)")
    gate = manifest["calibration"]["gate"]
    if gate is None:
        return 0
    print(f"gate frames          {gate['gate_frames']}")
    print(format_table({**gate, "passed": gate["frames_passed"]}, verdict="gate frames"))
    if gate["clips"]:
        clips = gate["clips"]
        print(f"\nunseen clips         {len(clips['clips'])} synthetic driving clips, not calibrated on")
        print(format_clips(clips))
        if gate["passed"] is not None:
            print(f"gate                 {'PASS' if gate['passed'] else 'FAIL'}: the gate frames and the worst "
                  f"clip >= {100 * gate['target']:g} %")
    if gate["passed"] is False and "int8" in prec.values() and manifest["target"] == "cpu":
        print("INT8 below its target: try --int8-keep MODULE for sensitive modules (e.g. backbone.layer1), more "
              "or more varied --frames, or --frame-precision fp32 --head-precision int8")
    elif gate["passed"] is False and "int8" in prec.values():
        print("INT8 below its target: calibrate on more varied --frames first (several clips: at 256x512 the "
              "demo model passes only so); then try --int8-high-precision fp32, --int8-keep MODULE for sensitive "
              "modules (e.g. backbone.layer2, reduce), or an fp16 frame engine (--frame-precision fp16 "
              "--head-precision int8)")
    return 0 if gate["passed"] in (True, None) else 1


def run_compare(args) -> int:
    from tmanet.errors import UserError
    from tmanet.safe_files import check_output, refuse_overwriting_inputs, write_json

    from .compare import CompareError, compare_exports, compare_unseen_clips, format_clips, format_table
    from .gate_clips import gate_seeds
    _positive(args.num, "--num")
    _positive(args.clips, "--clips")
    _positive(args.threads, "--threads")
    backends = _parse_backends(args.backends)
    dir_b = args.dir_b or args.dir_a
    if args.dir_b is None and backends[0] == backends[1]:
        raise UserError("compare needs two exports (DIR_A DIR_B) or two backends (--backends A,B)")
    if args.clips is not None and (args.labels or args.num):
        raise UserError("--labels and --num go with --frames; --clips streams synthetic clips of its own")
    if args.json:
        check_output(args.json, "file", "--json")
        refuse_overwriting_inputs([args.json], [args.dir_a, dir_b, args.frames, args.labels])
    try:
        if args.clips is not None:
            result = compare_unseen_clips(args.dir_a, dir_b, gate_seeds(args.clips), threads=args.threads,
                                          progress=not args.no_progress, backends=backends)
        else:
            result = compare_exports(args.dir_a, dir_b, args.frames, labels=args.labels, num=args.num,
                                     threads=args.threads, progress=not args.no_progress, backends=backends)
    except (CompareError, ValueError) as e:
        raise UserError(str(e)) from None
    print(format_clips(result) if args.clips is not None else format_table(result))
    if args.json:
        write_json(args.json, result)
    return 0 if result["passed"] in (True, None) else 1

