"""``tmanet triton-repo`` (write a Triton model repository), ``tmanet serve`` (run tritonserver on it) and
``tmanet serve-bench`` (serving vs in-process throughput and latency)."""
from __future__ import annotations

import logging
import tempfile

from tmanet.errors import UserError
from tmanet.safe_files import write_json
from tmanet.signal_handlers import signal_handlers

from .backends import add_backend_arguments, backend_options

log = logging.getLogger("tmanet")


def register(subparsers):
    r = subparsers.add_parser(
        "triton-repo", help="write a Triton Inference Server model repository for an export",
        description="Write REPO/<name>/config.pbtxt and REPO/<name>/1/model.py (Python backend) with the export "
                    "copied beside it. Clients send FRAME uint8 [1,H,W,3] with the standard sequence_id / "
                    "sequence_start / sequence_end parameters and get MASK uint8 [1,H,W] (LOGITS float32 "
                    "[1,C,H,W] when requested).")
    r.add_argument("export_dir", metavar="EXPORT_DIR", help="export directory (engines inside it for --backend trt)")
    r.add_argument("--out", required=True, metavar="REPO", help="model repository (created; other models kept)")
    r.add_argument("--model-name", default="tmanet", help="model name (default tmanet)")
    add_backend_arguments(r)
    r.add_argument("--max-sequences", type=int, default=4, metavar="N",
                   help="concurrent sequences (streams) per instance; a START beyond them is refused "
                        "'server full' (default 4)")
    r.add_argument("--idle-timeout-ms", type=int, default=5000, metavar="MS",
                   help="a sequence idle this long is dropped and its stream freed (default 5000)")
    r.add_argument("--instances", type=int, default=1, metavar="K", help="model instances (default 1)")
    r.add_argument("--max-queue-delay-us", type=int, default=5000, metavar="US",
                   help="how long a frame may wait for other sequences' frames to share its engine batch "
                        "(default 5000; 0 runs each frame as soon as the model is free)")
    r.add_argument("--sequence-id-type", choices=("uint64", "string"), default="uint64",
                   help="uint64 (default): ids arrive in a uint64 CORRID control input; string: string ids "
                        "(uint64 ids are accepted too; no CORRID input, which Triton 2.51's Python backend refuses "
                        "as a string)")
    r.add_argument("--site-packages", metavar="DIR",
                   help="folder the Python backend adds to find tmanet when the server was not started by "
                        "`tmanet serve` (which names its own); default none: the repository holds no path of "
                        "this machine and can be moved or copied into a container where tmanet is installed")
    r.set_defaults(func=triton_repo_command)

    s = subparsers.add_parser(
        "serve", help="run tritonserver on a model repository (foreground; Ctrl-C stops it)",
        description="Start tritonserver (from PATH, else the one in the nvidia-pytriton wheel) with model control "
                    "mode none, wait until every model is ready, print the URLs, and stop cleanly on "
                    "SIGINT/SIGTERM.")
    s.add_argument("repo", metavar="REPO", help="model repository (tmanet triton-repo)")
    _server_args(s)
    s.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds to wait for readiness")
    s.set_defaults(func=serve_command)

    b = subparsers.add_parser(
        "serve-bench", help="Triton serving vs in-process: frames/s and latency percentiles, in one run",
        description="Drive N concurrent sequences over gRPC (one client per sequence) and, in the same run, the "
                    "same frames in-process through push_batch. Without --url a server is started on free "
                    "loopback ports for a temporary repository of EXPORT_DIR and stopped afterwards.")
    b.add_argument("export_dir", metavar="EXPORT_DIR", help="export directory")
    b.add_argument("--url", metavar="HOST:PORT", help="gRPC address of a running server serving EXPORT_DIR")
    b.add_argument("--model-name", default="tmanet", help="model name on that server (default tmanet)")
    b.add_argument("--streams", type=int, default=4, metavar="N", help="concurrent sequences (default 4)")
    b.add_argument("--frames", type=int, default=40, metavar="F", help="timed frames per sequence (default 40)")
    b.add_argument("--warmup", type=int, default=5, metavar="F", help="untimed frames first (default 5)")
    b.add_argument("--rounds", type=int, default=3, metavar="R",
                   help="serving and in-process alternate R times (default 3): load swings hit both alike")
    b.add_argument("--threads", type=int, metavar="N", help="CPU threads, in-process and in the server")
    b.add_argument("--json", metavar="F", help="write the report as JSON")
    b.set_defaults(func=serve_bench_command)


def _server_args(p):
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)


def triton_repo_command(args) -> int:
    from .triton_repo import write_triton_repo
    try:
        options = backend_options(args)
    except ValueError as e:
        raise UserError(str(e)) from None
    folder = write_triton_repo(args.export_dir, args.out, model_name=args.model_name, backend=args.backend,
                               device=args.device, max_sequences=args.max_sequences,
                               idle_timeout_ms=args.idle_timeout_ms, instances=args.instances,
                               backend_options=options, sequence_id_type=args.sequence_id_type,
                               site_packages=args.site_packages, queue_delay_us=args.max_queue_delay_us)
    log.info("wrote %s (serve it with: tmanet serve %s)", folder, args.out)
    return 0


def serve_command(args) -> int:
    import sys

    from .serve import ServerError, TritonServer
    server = TritonServer(args.repo, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port)

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    # SIGINT too, explicitly: `tmanet serve ... &` from a script arrives with SIGINT ignored.
    with signal_handlers(on_signal):
        try:
            server.start(timeout_s=args.timeout)
            print(f"tritonserver (pid {server.process.pid}) ready: HTTP http://{server.http_url}  "
                  f"gRPC {server.grpc_url}  metrics http://{server.host}:{server.metrics_port}/metrics  "
                  "(Ctrl-C stops)", flush=True)
            server.process.wait()
            if server.process.returncode != 0:
                raise ServerError(server.exit_reason("while serving"))
            return 0
        except ServerError as e:  # a server failure, not a usage error: exit 1, one line
            print(f"tmanet serve: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0
        finally:
            code = server.stop()
            if code is not None:
                log.info("tritonserver stopped (status %s)", code)


def serve_bench_command(args) -> int:
    from tmanet.errors import UserError

    from .serve_bench import bench_serving, format_report
    if args.streams < 1 or args.frames < args.rounds or args.rounds < 1 or args.warmup < 0:
        raise UserError("--streams and --rounds must be positive, --frames at least --rounds, --warmup >= 0")
    if args.url:
        report = bench_serving(args.export_dir, args.url, args.model_name, args.streams, args.frames, args.warmup,
                               args.threads, args.rounds)
    else:
        import sys

        from .serve import ServerError, TritonServer, free_ports
        from .triton_repo import write_triton_repo
        with tempfile.TemporaryDirectory(prefix="tmanet-serve-bench-") as tmp:
            write_triton_repo(args.export_dir, f"{tmp}/repo", model_name=args.model_name,
                              max_sequences=args.streams, threads=args.threads)
            http, grpc, metrics = free_ports(3)
            try:
                with TritonServer(f"{tmp}/repo", http_port=http, grpc_port=grpc, metrics_port=metrics,
                                  log_file=f"{tmp}/tritonserver.log") as server:
                    report = bench_serving(args.export_dir, server.grpc_url, args.model_name, args.streams,
                                           args.frames, args.warmup, args.threads, args.rounds)
            except ServerError as e:  # its log goes with the temporary folder: the reason is in the line
                print(f"tmanet serve-bench: error: {e}", file=sys.stderr)
                return 1
    print(format_report(report))
    if args.json:
        write_json(args.json, report)
    return 0
