"""``tmanet train`` (the paper's recipe, one process or ``torchrun``), ``tmanet eval`` (IoU, mIoU, pixel
accuracy, temporal consistency of a checkpoint or an export directory) and ``tmanet eval-compare`` (two eval
results on the same clips: their difference and its 95 % interval)."""
from __future__ import annotations

from tmanet.help_format import DefaultsHelpFormatter
from tmanet.runtime.backends import add_backend_arguments

DATA_HELP = ("'synthetic' or 'synthetic:N' (N procedural street clips, rendered deterministically), or a folder "
             "in the Cityscapes video layout (leftImg8bit_sequence/ + gtFine/) or a CamVid layout (official "
             "TMANet: images/ + labels/*_L.png + annotations/{split}.txt + images_sequence/; SegNet: train/ + "
             "trainannot/ ...)")


def register(sub):
    p = sub.add_parser(
        "train", help="train TMANet (paper recipe; multi-GPU/multi-node through torchrun)",
        description="Train TMANet with the paper's recipe: SGD momentum 0.9, weight decay 5e-4, poly lr (power "
                    "0.9, min 1e-4), random resize 0.5-2 / crop / flip, auxiliary FCN loss 0.4, SyncBN on GPUs. "
                    "Several processes: torchrun --nproc_per_node N -m tmanet.cli train ...",
        formatter_class=DefaultsHelpFormatter)
    p.add_argument("--preset", help="model preset (required unless --resume), e.g. cityscapes-r18")
    p.add_argument("--config-override", nargs="+", metavar="KEY=VALUE", default=[],
                   help="change config fields, values in JSON (base_channels=32 key_channels=32 ...)")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", default="runs/train",
                   help="output folder: model.pth (the weights to export: tmanet export OUT/model.pth), final.pth "
                        "and latest.pth (full checkpoints with the optimizer: --resume, --init), log.csv, log.json")
    p.add_argument("--iters", type=int, default=80000, help="total iterations")
    p.add_argument("--batch", type=int, default=8, help="global batch (split over the processes)")
    p.add_argument("--lr", type=float, default=0.01, help="base learning rate")
    p.add_argument("--crop", help="training crop H,W (default: the preset's slide window, e.g. 769,769)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from latest.pth")
    p.add_argument("--init", metavar="CHECKPOINT", help="start from these weights instead of from scratch")
    p.add_argument("--workers", type=int, default=2, help="data loader processes per training process")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and augmentation")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--log-every", type=int, default=10, help="iterations per log.csv row")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="iterations between latest.pth saves")
    p.add_argument("--keep-every", type=int, default=8000, help="iterations between kept iter_N.pth (0: none)")
    p.add_argument("--stop-after", type=int, help="end this invocation after N iterations (resume later)")
    p.add_argument("--synthetic-size", default="256,512", help="synthetic clip size H,W")
    p.add_argument("--synthetic-frames", type=int, default=12, help="frames per synthetic clip")
    p.add_argument("--synthetic-degradation", type=float,
                   help="synthetic clips: per-frame degradation strength 0..1 (default 0.5)")
    p.add_argument("--damage-weight", type=float,
                   help="synthetic clips: loss weight of the pixels the degradation destroyed, where only the "
                        "memory shows the scene (default 1: plain cross-entropy)")
    p.add_argument("--frames-dir", help="CamVid: folder with the full-rate frames for the memory (default: "
                        "images_sequence/ in the official layout, the image folder in the SegNet layout)")
    p.add_argument("--memory-order", choices=("oldest_first", "newest_first", "current"),
                   help="frames in the memory slots: oldest_first (official, slot i = frame t-T+i; the default), "
                        "newest_first (slot i = frame t-1-i) or current (every slot = frame t: a single-frame "
                        "baseline with the same compute); a resumed run keeps its own")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)

    e = sub.add_parser(
        "eval", help="score a checkpoint or export directory: IoU, mIoU, pixel accuracy, temporal consistency "
                    "(synthetic clips: also on the pixels the degradation destroyed)",
        description="Stream labelled clips through the runtime and score the masks. Synthetic clips are streamed "
                    "from frame 0 and frames t >= T scored (--all-frames: every frame); dataset samples are "
                    "streamed as their T memory frames then the labelled target.",
        formatter_class=DefaultsHelpFormatter)
    e.add_argument("source", help="checkpoint (.pth) or export directory (manifest.json + ONNX)")
    e.add_argument("--data", required=True, help=DATA_HELP)
    e.add_argument("--split", default="val", help="dataset split (Cityscapes/CamVid layouts)")
    e.add_argument("--mode", choices=("whole", "slide"), default="whole", help="inference mode")
    e.add_argument("--stride", help="slide stride H,W (default: the preset's rule)")
    add_backend_arguments(e, default=None, backend_help="default: torch for a checkpoint, ort for an export "
                                                         "directory; any other backend reads an export directory")
    e.add_argument("--all-frames", action="store_true", help="synthetic: also score the warm-up frames t < T")
    e.add_argument("--synthetic-size", help="synthetic clip size H,W (default: the export's size, or 256,512)")
    e.add_argument("--synthetic-frames", type=int, default=12, help="frames per synthetic clip")
    e.add_argument("--synthetic-degradation", type=float, default=0.5,
                   help="synthetic clips: per-frame degradation strength 0..1")
    e.add_argument("--frames-dir", help="CamVid: folder with the full-rate frames for the memory (default: "
                        "images_sequence/ in the official layout, the image folder in the SegNet layout)")
    e.add_argument("--memory-source", choices=("real", "current"), default="real",
                   help="frames in the memory slots: real (the previous frames, as deployed) or current (the "
                        "current frame in every slot: how much the model relies on its memory)")
    e.add_argument("--limit", type=int, help="score at most this many clips / samples")
    e.add_argument("--json", metavar="FILE", help="write the full result (per-class, confusion matrix) here")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=run_eval)

    c = sub.add_parser(
        "eval-compare", help="difference of two `tmanet eval --json` results on the same synthetic clips, with a "
                             "95 %% interval (paired bootstrap over clips)",
        description="How much two `tmanet eval --json` results on the same synthetic clips differ in mIoU, with "
                    "a 95 %% interval from a paired bootstrap over the clips.",
        formatter_class=DefaultsHelpFormatter)
    c.add_argument("a", help="result A (tmanet eval --json)")
    c.add_argument("b", help="result B, on the same clips")
    c.add_argument("--region", choices=("all", "degraded", "intact"), default="degraded",
                   help="pixels scored: all, those the degradation destroyed, or the others")
    c.add_argument("--samples", type=int, default=2000, help="bootstrap draws")
    c.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws")
    c.add_argument("--json", metavar="FILE", help="write the comparison here")
    c.set_defaults(func=run_eval_compare)


def run_train(args) -> int:
    from tmanet.errors import UserError
    from tmanet.safe_files import check_output, refuse_overwriting_inputs

    from .config import InputError
    from .trainer import train
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        import torch
        torch.set_num_threads(args.threads)
    for name in ("log_every", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.resume and not args.preset:
        raise UserError("--preset is required to start a run (e.g. --preset cityscapes-r18)")
    check_output(args.out, "dir", "--out")
    # The run folder is written file by file: an input inside it could be overwritten (e.g. --init iter_N.pth).
    refuse_overwriting_inputs([args.out], [args.init, None if args.data.startswith("synthetic") else args.data])
    try:
        summary = train(args.preset, args.data, args.out, iters=args.iters, batch=args.batch, lr=args.lr,
                        resume=args.resume, crop=args.crop, workers=args.workers, seed=args.seed,
                        overrides=args.config_override, init=args.init, device=args.device, amp=args.amp,
                        log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                        keep_every=args.keep_every or None, stop_after=args.stop_after,
                        synthetic_size=args.synthetic_size, synthetic_frames=args.synthetic_frames,
                        frames_dir=args.frames_dir, progress=not args.no_progress,
                        memory_order=args.memory_order, synthetic_degradation=args.synthetic_degradation,
                        damage_weight=args.damage_weight)
    except InputError as e:
        raise UserError(str(e)) from None
    import os
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not per process
        speed = summary["iters_per_second"]
        last = summary["last_log"] or {}
        print(f"trained iterations {summary['start_iter']}..{summary['end_iter']} of {summary['iters']} in "
              f"{summary['seconds']:.1f} s" + (f" ({speed:.2f} it/s)" if speed else "") +
              (f", loss {last['loss']:.4f}" if last else "") + f"; checkpoints in {args.out}/")
        if summary["end_iter"] >= summary["iters"]:
            print(f"  export the weights: tmanet export {args.out}/model.pth --height H --width W --out DIR\n"
                  f"  (final.pth and latest.pth also hold the optimizer, to --resume or --init from)")
    return 0


def run_eval(args) -> int:
    from tmanet.errors import UserError
    from tmanet.safe_files import check_output, refuse_overwriting_inputs

    from .evaluate import evaluate, format_report
    from .config import InputError, parse_pair
    for name in ("limit", "synthetic_frames"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.json:
        check_output(args.json, "file", "--json")
        refuse_overwriting_inputs([args.json], [args.source, None if args.data.startswith("synthetic") else args.data])
    from pathlib import Path

    from tmanet.runtime.backends import backend_options
    if args.backend is None:
        args.backend = "ort" if Path(args.source).is_dir() else "torch"
    try:
        options = backend_options(args)
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        stride = parse_pair(args.stride, "--stride") if args.stride else None
        result = evaluate(args.source, args.data, mode=args.mode, backend=args.backend, device=args.device,
                          split=args.split, all_frames=args.all_frames, synthetic_size=args.synthetic_size,
                          synthetic_frames=args.synthetic_frames, frames_dir=args.frames_dir, limit=args.limit,
                          backend_options=options, stride=stride, progress=not args.no_progress,
                          synthetic_degradation=args.synthetic_degradation, memory_source=args.memory_source)
    except InputError as e:
        raise UserError(str(e)) from None
    return _report(format_report(result), result, args.json)


def _report(text: str, result: dict, json_path) -> int:
    """Print ``text`` and write ``result`` to ``json_path`` (atomically) when one was given."""
    from tmanet.safe_files import write_json
    print(text)
    if json_path:
        print(f"wrote {write_json(json_path, result)}")
    return 0


def run_eval_compare(args) -> int:
    import json
    from pathlib import Path

    from tmanet.errors import UserError
    from tmanet.safe_files import check_output, refuse_overwriting_inputs

    from .eval_compare import ComparisonError, compare_evals, format_comparison
    if args.json:
        check_output(args.json, "file", "--json")
        refuse_overwriting_inputs([args.json], [args.a, args.b])
    results = []
    for path in (args.a, args.b):
        try:
            results.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable tmanet eval result ({e})") from None
    try:
        comparison = compare_evals(*results, region=args.region, samples=args.samples, seed=args.seed)
    except ComparisonError as e:
        raise UserError(str(e)) from None
    return _report(format_comparison(comparison), comparison, args.json)
