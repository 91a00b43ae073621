"""The ``tmanet`` command. Each subcommand lives beside the code it drives and registers itself here.

A command module exposes ``register(subparsers)``, which adds its parser(s) with ``set_defaults(func=...)``;
``func(args)`` returns the exit status. Heavy imports stay inside ``func`` so ``tmanet --help`` is fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from . import __version__

COMMAND_MODULES = (
    "tmanet.export.cli",        # export
    "tmanet.runtime.cli",       # run, bench
    "tmanet.runtime.serve_cli",  # triton-repo, serve, serve-bench
    "tmanet.runtime.batch_cli",  # batch
    "tmanet.calibration.cli",   # calibrate, compare
    "tmanet.engines.cli",       # build
    "tmanet.training.cli",      # train, eval, eval-compare
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tmanet", description="TMANet video segmentation: export, run, "
                                     "benchmark, calibrate, build TensorRT engines, train, evaluate.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _raise_interrupted(signum, frame):
    from .errors import Interrupted
    raise Interrupted(signum)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Only our logger speaks at INFO: the exporter's libraries are chatty at that level.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("tmanet").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from tmanet.export import ExportCheckError
    from tmanet.manifest import ManifestError

    from .checkpoints import CheckpointError
    from .errors import UserError
    from .signal_handlers import signal_handlers
    # SIGTERM unwinds like Ctrl-C: temporary outputs are removed, `run` finishes what it segmented.
    with signal_handlers(_raise_interrupted, (signal.SIGTERM,)):
        try:
            return int(args.func(args) or 0)
        except (UserError, CheckpointError, ManifestError, ExportCheckError, FileNotFoundError) as e:
            print(f"tmanet {args.command}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", signal.SIGINT)
            print(f"tmanet {args.command}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
            return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
