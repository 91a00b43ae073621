"""Writing ``manifest.json`` of an export directory: what was exported, how, and the SHA256 of every file
(:func:`file_entries`), and which folders an export may replace (:func:`check_replaceable`).

Reading and validating it (:class:`~tmanet.manifest.ExportSpec`, :func:`~tmanet.manifest.load_manifest`) is in the
core, :mod:`tmanet.manifest`: every package reads the contract, only the exporters write it.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

from tmanet.safe_files import PARTIAL_MARK, OutputError, write_json
from tmanet.manifest import MANIFEST, sha256_file


# What an export directory may hold and still be replaced: its own files, tmanet build's, and the hidden
# temporary files a killed write leaves.
REPLACEABLE_PATTERNS = ("manifest.json", "*.onnx", "*.engine", "*.engine.json", "engines.json", f".*{PARTIAL_MARK}*")


def check_replaceable(directory):
    """Raise :class:`~tmanet.safe_files.OutputError` unless ``directory`` may be replaced by a new export: it is
    new, empty, or an export directory holding only export and engine files (nothing of the user's is lost)."""
    directory = Path(directory)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise OutputError(f"--out {directory} is an existing file, not a folder")
    entries = list(directory.iterdir())
    if not entries:
        return
    if not (directory / MANIFEST).is_file():
        raise OutputError(f"--out {directory} is a non-empty folder that is not an export directory: refusing to "
                          "replace it (choose a new or empty folder)")
    foreign = [p.name for p in entries if not any(p.match(pattern) for pattern in REPLACEABLE_PATTERNS)]
    if foreign:
        raise OutputError(f"--out {directory} holds files that are not part of an export ({', '.join(foreign[:3])}): "
                          "refusing to replace it (move them, or choose another folder)")


def file_entries(directory, names) -> dict:
    directory = Path(directory)
    return {n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size} for n in names}


def library_versions() -> dict:
    import numpy
    import onnx
    import onnxruntime
    import torch
    from tmanet import __version__
    return {"tmanet": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def write_manifest(directory, manifest: dict) -> Path:
    return write_json(Path(directory) / MANIFEST, manifest)
