"""``tmanet batch``: segment many recorded drives on Ray (an embedded local Ray, or a cluster with
``--ray-address``), each input exactly as ``tmanet run`` would; see :mod:`tmanet.runtime.batch`."""
from __future__ import annotations

import argparse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def register(subparsers):
    from .backends import add_backend_arguments
    from .backends.base import positive_int as _positive_int
    p = subparsers.add_parser(
        "batch", help="segment many recordings (videos, image folders, .npy clips, ROS bags) on Ray",
        description="Segment every INPUT as `tmanet run` would, on Ray actors (an embedded local Ray, or an "
                    "existing cluster with --ray-address; on a cluster the inputs, OUT and the export must be "
                    "at the same paths on every node). Per input, OUT/<input name>/ gets masks/000000.png... "
                    "(frame sources) or masks.mcap with every image topic's <topic>/mask (ROS bags), then "
                    "done.json; an input whose done.json matches is skipped. Exit status: 0 every input done "
                    "or skipped, 1 some failed, 2 usage error.")
    p.add_argument("export_dir", metavar="DIR", help="export directory (manifest.json + ONNX files)")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video, image folder, .npy clip, .mcap/.db3/.bag (or a rosbag2 folder), a glob, or a "
                        "folder of these")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder (one subfolder per input)")
    p.add_argument("--workers", type=_positive_int, metavar="N",
                   help="Ray actors, each with one segmenter (default: as many as the cluster's CPUs (GPUs) "
                        "hold at --threads-per-worker (--gpus-per-worker))")
    p.add_argument("--threads-per-worker", type=_positive_int, default=1, metavar="K",
                   help="CPU threads (and Ray CPUs) per worker (default 1)")
    p.add_argument("--gpus-per-worker", type=_positive_float, metavar="G",
                   help="GPUs per worker (fractions share a GPU), with --device cuda")
    add_backend_arguments(p)
    p.add_argument("--chunk-frames", type=_positive_int, metavar="F",
                   help="split inputs into chunks of about F frames processed in parallel (each decoded from "
                        "T frames earlier, so the masks equal sequential processing); default: whole inputs")
    p.add_argument("--retries", type=int, default=2, metavar="R",
                   help="times a chunk is retried when its worker dies (default 2)")
    p.add_argument("--ray-address", metavar="ADDR", help="an existing Ray cluster (host:port of its head)")
    p.add_argument("--resize", action="store_true",
                   help="frames of another size are resized to the export size (as tmanet run --resize)")
    p.add_argument("--max-gap", type=float, default=1.0, metavar="S",
                   help="reset a stream's memory when its timestamps jump by more than S seconds (0 disables)")
    p.add_argument("--json", metavar="SUMMARY", help="also write the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=batch_command)


def batch_command(args) -> int:
    from pathlib import Path

    from tmanet.errors import UserError
    from tmanet.safe_files import check_output, refuse_overwriting_inputs, write_json

    from .backends import backend_options
    from .batch import BatchConfig, find_inputs, format_summary, input_name, run_batch
    try:
        options = backend_options(args)
    except ValueError as e:
        raise UserError(str(e)) from None
    from .backends import get_backend
    kinds = get_backend(args.backend).devices
    if args.device.split(":")[0] not in kinds:
        raise UserError(f"--backend {args.backend} runs on {' or '.join(kinds)}, not --device {args.device}")
    if "threads" in options:
        raise UserError("tmanet batch sets each worker's CPU threads with --threads-per-worker, not --threads")
    if args.gpus_per_worker and not args.device.startswith("cuda"):
        raise UserError("--gpus-per-worker needs --device cuda (and --backend torch or trt)")
    if args.retries < 0:
        raise UserError(f"--retries must be >= 0, got {args.retries}")
    if args.max_gap < 0:
        raise UserError(f"--max-gap must be >= 0 seconds, got {args.max_gap}")
    check_output(args.out, "dir", "--out")
    if args.json:
        check_output(args.json, "file", "--json")
    items = find_inputs(args.inputs)
    # Each input's folder is replaced as a whole: it must hold no input, and no output may be an input.
    refuse_overwriting_inputs([Path(args.out) / input_name(i) for i in items] + [args.json],
                              [*items, args.export_dir])
    refuse_overwriting_inputs([args.out], [*items, args.export_dir], whole=False)
    config = BatchConfig(
        export_dir=args.export_dir, inputs=items, out=args.out, workers=args.workers,
        threads_per_worker=args.threads_per_worker, gpus_per_worker=args.gpus_per_worker or 0.0,
        backend=args.backend, device=args.device, chunk_frames=args.chunk_frames, retries=args.retries,
        ray_address=args.ray_address, max_gap=args.max_gap or None, resize=args.resize,
        progress=not args.no_progress, backend_options=options)
    summary = run_batch(config)
    print(format_summary(summary))
    if args.json:
        write_json(args.json, summary)
        print(f"summary: {args.json}")
    return 1 if summary["failed"] else 0
