"""``tmanet run`` (segment a video, an image folder, a .npy clip or the image topics of an MCAP) and
``tmanet bench``."""
from __future__ import annotations

import argparse
import logging
from contextlib import contextmanager

from tmanet.pictures import LAYOUTS

from .backends.base import positive_int

log = logging.getLogger("tmanet")

def register(subparsers):
    p = subparsers.add_parser(
        "run", help="segment a video, a folder of images, a .npy clip or an MCAP's camera topics",
        description="Stream frames through an export directory and write an overlay video, masks and/or "
                    "logits. Whole mode needs frames of the export size unless --resize (or use --mode slide "
                    "for larger frames). An MCAP input (ROS 2 bag) is segmented per --topic, each topic its "
                    "own stream timed by the message header stamps, into an MCAP of <topic>/mask images.")
    p.add_argument("export_dir", metavar="DIR", help="export directory (manifest.json + ONNX files)")
    p.add_argument("--input", "-i", required=True, metavar="PATH",
                   help="video file, folder of png/jpg frames (sorted by name), .npy clip (F,H,W,3) uint8, "
                        "ROS bag .mcap/.db3/.bag (with --topic), or X.mcap:/TOPIC (one topic, as a video)")
    p.add_argument("--topic", action="append", metavar="TOPIC",
                   help="ROS bag input: an image topic to segment (repeat for several cameras); without it, "
                        "every image topic")
    p.add_argument("--color", action="store_true",
                   help="ROS bag input: also write <camera>/color_mask (rgb8, the preset's palette)")
    p.add_argument("--resize", action="store_true",
                   help="whole mode, frames of another size: resize each frame to the export size and the "
                        "logits back to the frame size (bilinear) before the argmax")
    _engine_args(p)
    p.add_argument("--mode", choices=("whole", "slide"), default="whole",
                   help="whole: frames of the export size; slide: larger frames as overlapping crops of the "
                        "export size, each crop with its own memory (official slide protocol)")
    p.add_argument("--stride", type=int, nargs="+", metavar="S",
                   help="slide stride (one value or H W); default: the preset's overlap ratio")
    p.add_argument("--output", "-o", metavar="PATH",
                   help="write an overlay video (e.g. overlay.mp4); for a ROS bag input, the output MCAP")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the class colours (0..1)")
    p.add_argument("--layout", choices=LAYOUTS, default="overlay",
                   help="--output video: the colours over the frame with class boundaries and a legend of the "
                        "classes present (overlay), or the untouched frame beside it (side-by-side)")
    p.add_argument("--save-masks", metavar="DIR",
                   help="write one palette PNG per frame (pixel = class id) into a new or empty folder; the set "
                        "appears when the run ends (with what was segmented, if stopped)")
    p.add_argument("--overwrite", action="store_true",
                   help="--save-masks into a folder of an earlier run's masks: replace that whole set")
    p.add_argument("--save-logits", metavar="F.npy", help="write all logits as one (F, C, H, W) float32 .npy")
    p.add_argument("--max-frames", type=positive_int, metavar="N", help="stop after N frames")
    p.add_argument("--allow-truncated", action="store_true",
                   help="a video cut short (or damaged) ends at its last good frame, and a damaged MCAP chunk or bag "
                        "record is skipped, with a warning counting the frames lost, instead of "
                        "an error")
    p.add_argument("--max-gap", type=float, default=1.0, metavar="S",
                   help="reset the memory when consecutive video timestamps are more than S seconds apart "
                        "(0 disables)")
    p.set_defaults(func=run_command)

    b = subparsers.add_parser(
        "bench", help="latency, throughput and memory of the streaming runtime",
        description="Stream synthetic frames at the export size and report per-stage latency "
                    "(p50/p90/p99), frames/s and peak memory; --compare-official also times the official "
                    "protocol (torch eager, backbone on 1+T frames per output frame) on the same weights "
                    "and frames in the same run.")
    b.add_argument("export_dir", metavar="DIR", help="export directory")
    _engine_args(b)
    b.add_argument("--frames", type=int, default=50, metavar="N", help="timed frames (default 50)")
    b.add_argument("--warmup", type=int, default=5, metavar="N", help="untimed frames first (default 5)")
    b.add_argument("--compare-official", action="store_true",
                   help="also time the official protocol (needs the manifest's checkpoint)")
    b.add_argument("--official-frames", type=int, metavar="N",
                   help="timed frames of the official protocol (default: --frames)")
    b.add_argument("--seed", type=int, default=0, help="seed of the synthetic frames")
    b.add_argument("--json", metavar="F", help="write the report as JSON")
    b.add_argument("--plot", metavar="F.png",
                   help="write a PNG: stage latencies (p50 bars, p90/p99 whiskers), every frame's latency, roofline")
    b.add_argument("--no-roofline", action="store_true",
                   help="skip the roofline (work counted from the ONNX graphs against a GEMM peak probed on the "
                        "same backend, ~1 s)")
    b.add_argument("--bare-loop", action="store_true",
                   help="ort: also time a bare loop of the same two sessions (plain session.run, no runtime), "
                        "one frame after each timed frame, and report the runtime's share of its frames/s")
    b.add_argument("--profile", metavar="DIR",
                   help="ort: profile each graph with ONNX Runtime's profiler (--frames runs each, after the "
                        "timing) and write the traces and per-op tables into DIR")
    b.set_defaults(func=bench_command)


def _engine_args(p):
    from .backends import add_backend_arguments
    add_backend_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _backend_options(args) -> dict:
    """The chosen backend's options from the flags; a flag it does not take is a one-line error."""
    from tmanet.errors import UserError

    from .backends import backend_options
    try:
        return backend_options(args)
    except ValueError as e:
        raise UserError(str(e)) from None


def _open(args, **kwargs):
    from tmanet.errors import UserError
    from tmanet.manifest import ManifestError

    from .backends import BackendUnavailable
    from .segmenter import StreamingSegmenter
    options = _backend_options(args)
    try:
        return StreamingSegmenter.open(args.export_dir, backend=args.backend, device=args.device, **kwargs,
                                       **options)
    except (ManifestError, BackendUnavailable, ValueError) as e:
        raise UserError(str(e)) from None


def _check_run_outputs(args):
    """Every output can be written and none is an input: checked before any work starts."""
    from pathlib import Path

    from tmanet.errors import UserError
    from tmanet.safe_files import check_output, refuse_overwriting_inputs

    from tmanet.io.video import WRITABLE_VIDEO_SUFFIXES

    from tmanet.io.run_outputs import check_mask_folder
    if args.output:
        check_output(args.output, "file", "--output")
        suffix = Path(args.output).suffix.lower()
        if suffix not in WRITABLE_VIDEO_SUFFIXES:
            raise UserError(f"--output {args.output}: unknown video container {suffix or '(no extension)'}; "
                            f"use one of {', '.join(WRITABLE_VIDEO_SUFFIXES)}")
    if args.save_logits:
        check_output(args.save_logits, "file", "--save-logits")
        if Path(args.save_logits).suffix.lower() != ".npy":
            raise UserError(f"--save-logits writes a .npy file: got {args.save_logits}")
    if args.save_masks:
        check_output(args.save_masks, "dir", "--save-masks")
    elif args.overwrite:
        raise UserError("--overwrite applies to --save-masks")
    # The mask folder is replaced as a whole (staged, then swapped in), so it may not hold an input either.
    refuse_overwriting_inputs([args.output, args.save_logits, args.save_masks], [args.input, args.export_dir])
    if args.save_masks:
        check_mask_folder(args.save_masks, args.overwrite)


@contextmanager
def _stop_requests(stop: list):
    """Inside the block SIGINT/SIGTERM ask to stop: ``stop[0]`` becomes the signal and the frame loop ends at a
    frame boundary (no exception in the middle of its bookkeeping); a second signal stops at once."""
    from tmanet.errors import Interrupted
    from tmanet.signal_handlers import signal_handlers

    def request(signum, _):
        if stop[0] is not None:
            raise Interrupted(signum)
        stop[0] = signum
    with signal_handlers(request):
        yield stop


def run_command(args) -> int:
    import os
    import time
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from tmanet.errors import Interrupted, UserError

    from tmanet.io.threads import Prefetch, Worker, call_in_thread
    from tmanet.io.run_outputs import RunOutputs
    from tmanet.io.video import open_frames
    from tmanet.io.driving_logs import is_log
    if is_log(args.input):
        return run_log_command(args)
    if args.topic or args.color:
        raise UserError("--topic and --color apply to a ROS bag input (--input X.mcap, X.db3, X.bag)")
    if not (args.output or args.save_masks or args.save_logits):
        log.info("no --output, --save-masks or --save-logits: segmenting without writing results")
    _backend_options(args)  # flag errors before any file is opened
    if not 0 <= args.alpha <= 1:
        raise UserError(f"--alpha must be in 0..1, got {args.alpha}")
    if args.stride and len(args.stride) not in (1, 2):
        raise UserError("--stride takes one value or two (H W)")
    stride = None if not args.stride else (args.stride * 2)[:2]
    _check_run_outputs(args)
    try:  # in a thread: a SIGTERM still ends the command while opening blocks (a pipe that sends nothing)
        source = call_in_thread(open_frames, args.input, args.max_frames, args.allow_truncated)
    except ValueError as e:
        raise UserError(str(e)) from None
    seg = _open(args, mode=args.mode, stride=stride, return_logits=bool(args.save_logits),
                max_gap=args.max_gap or None, resize=args.resize)
    described = seg.backend.describe()
    try:
        outputs = RunOutputs(args.output, args.save_logits, args.save_masks, seg.palette, seg.class_names,
                             args.alpha, fps=source.fps or 25.0, layout=args.layout)
    except BaseException:
        seg.close()
        raise

    # Decoding ahead, and rendering and writing behind, run in threads, so the engines wait for neither.
    workers = max(1, min(4, (os.cpu_count() or 2) - 1))
    count, started, busy = 0, time.perf_counter(), 0.0
    stop = [None]
    frames = Prefetch(source, stop_requested=lambda: stop[0] is not None)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="tmanet-render")
    output = Worker(lambda item: outputs.write(item[0].result(), item[1]), depth=2 * workers)  # in frame order
    finished = False
    try:
        with _stop_requests(stop):  # SIGINT/SIGTERM: the frames segmented so far become valid outputs
            bar = tqdm(frames, total=source.count, desc="tmanet run", unit="frame", disable=args.no_progress)
            for frame, timestamp in bar:
                if stop[0] is not None:
                    break
                t0 = time.perf_counter()
                try:
                    res = seg.push(frame, timestamp=timestamp)
                except ValueError as e:
                    raise UserError(f"frame {count} of {args.input}: {e}") from None
                busy += time.perf_counter() - t0
                output.submit((pool.submit(outputs.render, count, frame, res), res))
                count += 1
            bar.close()
            output.close()  # the last results are written (and a writing error raised) before the files close
            if count == 0:  # nothing segmented: every earlier output stays as it was
                if stop[0] is None:
                    raise UserError(f"{args.input}: no frames")
                outputs.discard()
            else:
                outputs.close()
            finished = True
    finally:
        frames.close()
        if not finished:  # an error: no output is left under its final name (mask PNGs are whole files)
            try:
                output.close()
            except BaseException:
                pass  # the first error is the one to report
            outputs.discard()
        pool.shutdown()
        seg.close()
    if stop[0] is not None:
        listed = ", ".join(f"{what} {where}" for what, where in outputs.paths)
        print(f"interrupted: {outputs.written} frames written" + (f" ({listed})" if listed else ""))
        raise Interrupted(stop[0])
    wall = time.perf_counter() - started
    print(f"{count} frames, {described}, mode {seg.mode}: {count / busy:.2f} frames/s segmenting "
          f"({count / wall:.2f} frames/s with reading and writing)")
    for what, where in outputs.paths:
        print(f"  {what}: {where}")
    return 0


def run_log_command(args) -> int:
    """``tmanet run DIR --input X.mcap|X.db3|X.bag --topic T [...] --output OUT.mcap [--color]``: each topic
    one camera stream; per camera ``<camera>/mask`` (and ``<camera>/color_mask``) with the input's header and
    log time, and once its ``<camera>/label_info`` (the class names); ``<camera>`` is the image topic without
    a transport name (``/cam/image_raw/compressed`` -> ``/cam/image_raw``)."""
    import time

    from tqdm import tqdm

    from tmanet.errors import UserError
    from tmanet.io.driving_logs import log_reader
    from tmanet.io.mcap import McapImageWriter
    from tmanet.io.ros_images import output_topic

    from .camera_streams import CameraStreams, segment_messages
    _backend_options(args)
    source, topics, output = _log_arguments(args)
    reader = log_reader(source)
    streams = CameraStreams(lambda: _open(args, max_gap=args.max_gap or None, resize=args.resize))
    described = streams.describe()
    palette = streams.palette if args.color else None
    count, started = 0, time.perf_counter()
    try:
        images = reader.read_images(source, topics, skip_damaged=args.allow_truncated)
        with McapImageWriter(output, streams.class_names) as writer:
            masks = tqdm(segment_messages(streams, images, source, palette),
                         total=reader.count_messages(source, topics), desc="tmanet run", unit="image",
                         disable=args.no_progress)
            for topic, log_time, publish_time, mask, color in masks:
                writer.write_mask(output_topic(topic, "mask"), mask, log_time, publish_time)
                if color is not None:
                    writer.write(output_topic(topic, "color_mask"), color, log_time, publish_time)
                count += 1
            if count == 0:
                raise UserError(f"{source}: no messages on {', '.join(topics)}")
    except ValueError as e:  # the input turned unreadable part-way (the writer has removed its partial file)
        raise UserError(str(e)) from None
    finally:
        streams.close()
    wall = time.perf_counter() - started
    print(f"{count} images from {len(topics)} topic(s), {described}: {count / wall:.2f} images/s\n"
          f"  masks: {output}")
    return 0


def _log_arguments(args):
    """``(source, topics, output)`` of a ROS bag run, checked before anything is written; without ``--topic``,
    every image topic."""
    from pathlib import Path

    from tmanet.errors import UserError

    from tmanet.io.driving_logs import log_reader
    if args.save_masks or args.save_logits or args.mode != "whole" or args.max_frames:
        raise UserError("a ROS bag input takes --topic, --output OUT.mcap, --color and --resize (whole mode; "
                        "not --save-masks, --save-logits, --mode slide or --max-frames)")
    source = Path(args.input)
    if not source.exists():
        raise UserError(f"input not found: {source}")
    try:
        found = log_reader(source).image_topics(source)
    except ValueError as e:
        raise UserError(str(e)) from None
    listing = ", ".join(f"{t} ({kind.rsplit('/', 1)[-1]})" for t, kind in found.items()) or "none"
    unknown = [t for t in args.topic or () if t not in found]
    if unknown:
        raise UserError(f"{source} has no image topic {', '.join(unknown)}; its image topics: {listing}")
    if not args.output or not args.output.lower().endswith(".mcap"):
        raise UserError(f"a ROS bag input writes an MCAP: --output OUT.mcap (for an overlay video or mask PNGs of "
                        f"one topic, give --input {source}:/TOPIC); its image topics: {listing}")
    if not found:
        raise UserError(f"{source} has no image topics (sensor_msgs/Image or CompressedImage)")
    output = Path(args.output)
    if output.resolve() == source.resolve():
        raise UserError(f"--output {output} is the input: choose another file")
    return source, list(dict.fromkeys(args.topic or found)), output  # no --topic: every image topic


def bench_command(args) -> int:
    from tmanet.errors import UserError
    from tmanet.manifest import ManifestError

    from .backends import BackendUnavailable
    from tmanet.safe_files import check_output, refuse_overwriting_inputs

    from .bench import format_report, plot_report, run_bench, write_json
    options = _backend_options(args)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_output(path, "file", flag)
    if args.profile:
        if args.backend != "ort":
            raise UserError(f"--profile profiles the ONNX graphs on ONNX Runtime: backend 'ort' only "
                            f"(got {args.backend!r})")
        check_output(args.profile, "dir", "--profile")
        from .op_profile import check_profile_dir
        check_profile_dir(args.profile)
    refuse_overwriting_inputs([args.json, args.plot, args.profile], [args.export_dir])
    try:
        report = run_bench(args.export_dir, backend=args.backend, device=args.device, frames=args.frames,
                           warmup=args.warmup, compare_official=args.compare_official,
                           official_frames=args.official_frames, threads=options.get("threads"), seed=args.seed,
                           progress=not args.no_progress, backend_options=options,
                           roofline=not args.no_roofline, bare_loop=args.bare_loop)
        if args.profile:
            from .op_profile import format_tables, profile_export
            report["profile"] = profile_export(args.export_dir, args.profile, runs=args.frames,
                                               threads=options.get("threads"), seed=args.seed)
    except (ManifestError, BackendUnavailable, ValueError) as e:
        raise UserError(str(e)) from None
    print(format_report(report))
    if args.profile:
        print("\n".join(format_tables(report["profile"])))
        print(f"profile: {args.profile}")
    if args.json:
        write_json(report, args.json)
        print(f"report: {args.json}")
    if args.plot:
        plot_report(report, args.plot)
        print(f"plot: {args.plot}")
    return 0
