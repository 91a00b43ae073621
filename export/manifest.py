"""``manifest.json`` of an export directory: what was exported, how, and the SHA256 of every file."""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "tmanet-trt-onnx/1"
FRAME_ENCODER = "frame_encoder.onnx"
MEMORY_HEAD = "memory_head.onnx"
# The graphs' I/O names: the contract between export, the runtime backends, calibration and TensorRT.
ENCODER_OUTPUTS = ["query_key", "query_value", "memory_key", "memory_value"]
HEAD_OUTPUTS = ["mask", "logits"]


def head_input_names(sequence_num: int) -> list[str]:
    return (["query_key", "query_value"] + [f"memory_key_{i}" for i in range(sequence_num)]
            + [f"memory_value_{i}" for i in range(sequence_num)])


class ManifestError(ValueError):
    """The export directory is missing, incomplete or modified since it was written."""


def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
    path = Path(directory) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def load_manifest(directory, verify: bool = True) -> dict:
    """The manifest of an export directory; with ``verify`` every listed file must exist with its SHA256."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{directory} is not an export directory: no {MANIFEST} (run `tmanet export` first)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if verify:
        problems = []
        for name, entry in manifest.get("files", {}).items():
            f = directory / name
            if not f.is_file():
                problems.append(f"{name}: missing")
            elif sha256_file(f) != entry["sha256"]:
                problems.append(f"{name}: SHA256 differs from the manifest (modified or corrupted)")
        if problems:
            raise ManifestError(f"{directory}: " + "; ".join(problems))
    manifest["directory"] = str(directory)
    return manifest
