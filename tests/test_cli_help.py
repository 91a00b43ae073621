"""Every help text of the ``tmanet`` command renders: the top level and each subcommand, found from the parser
itself, so a new subcommand is covered without editing this file (a bare ``%`` in a help string crashes
argparse only when the help is printed)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tmanet import __version__
from tmanet.cli import build_parser, main


def _subcommands() -> list[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sorted(sub.choices)


def test_the_parser_has_the_known_commands():
    assert {"export", "run", "bench", "calibrate", "train", "eval", "eval-compare", "serve"} <= set(_subcommands())


@pytest.mark.parametrize("argv", [["--help"], ["-h"]] + [[name, "--help"] for name in _subcommands()])
def test_help_renders(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tmanet") and len(out.splitlines()) > 2
    flat = " ".join(out.split())
    assert "(default: None)" not in flat and "(default: False)" not in flat  # says nothing: left out


def test_help_and_version_as_a_user_types_them():
    """The installed entry point and ``python -m tmanet``: exit 0, no traceback."""
    entry_point = str(Path(sys.executable).with_name("tmanet"))
    for cmd in ([entry_point, "--help"], [sys.executable, "-m", "tmanet", "--help"], [entry_point, "--version"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.strip() == f"tmanet {__version__}"


def test_defaults_that_say_something_are_shown(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "dataset split (Cityscapes/CamVid layouts) (default: val)" in out
