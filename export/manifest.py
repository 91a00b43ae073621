"""Writing ``manifest.json`` of an export directory: what was exported, how, and the SHA256 of every file
(:func:`file_entries`), and which folders an export may replace (:func:`check_replaceable`).

Reading and validating it (:class:`~tmanet.manifest.ExportSpec`, :func:`~tmanet.manifest.load_manifest`) is in the
core, :mod:`tmanet.manifest`: every package reads the contract, only the exporters write it.
"""
from __future__ import annotations

import json
import platform
import re
from pathlib import Path

from tmanet.safe_files import PARTIAL_MARK, OutputError, write_json
from tmanet.manifest import _Fields, _is_int, FRAME_ENCODER, MANIFEST, ManifestError, MEMORY_HEAD, sha256_file


# Upper bounds of the sizes a manifest states, far above any TMANet (T 2..4, Ck 64, Cv 256-512, 1024x2048):
# they keep a mistyped or hostile value from sizing anything before the graphs are compared (check_graphs).
LIMITS = {"sequence_num": 64, "key_channels": 16384, "value_channels": 16384, "batch": 4096, "max_batch": 4096,
          "query_chunk": 1 << 26}
MAX_SIDE = 16384  # input_size / feature_size, pixels per side


def _check_limits(m: dict, f: _Fields):
    """The upper bound of every integer field (types and lower bounds are from_dict's)."""
    for name, high in LIMITS.items():
        v = m.get(name)
        if _is_int(v) and v > high:
            raise f.bad(name, f"at most {high}")
    for name in ("input_size", "feature_size"):
        v = m.get(name)
        if isinstance(v, list) and any(_is_int(x) and x > MAX_SIDE for x in v):
            raise f.bad(name, f"a list of two integers in 1..{MAX_SIDE}")


def _graph_io(path: Path) -> tuple[dict, dict]:
    """``({input: dims}, {output: dims})`` of an ONNX graph (a dim is an int, or None where symbolic), read
    once without external data; an unparsable file is one ManifestError."""
    import onnx
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError, truncated or not ONNX at all: one line
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ManifestError(f"{path}: not a readable ONNX graph ({detail}): re-export") from None

    def dims(values):
        return {v.name: [d.dim_value if d.HasField("dim_value") else None
                         for d in v.type.tensor_type.shape.dim] for v in values}
    return dims(model.graph.input), dims(model.graph.output)


def _expected_io(spec: "ExportSpec") -> dict:
    """``{(file, "input"/"output", name): [(field, value) per dim]}``: what each graph's I/O must be for the
    manifest to be true."""
    B = ("batch", spec.batch)  # None (dynamic): a symbolic dim, compared only where the graph fixes it
    T, C = ("sequence_num", spec.memory_frames), ("num_classes", spec.num_classes)
    ck, cv = ("key_channels", spec.key_channels), ("value_channels", spec.value_channels)
    H, W = ("input_size", spec.input_size[0]), ("input_size", spec.input_size[1])
    h, w = ("feature_size", spec.feature_size[0]), ("feature_size", spec.feature_size[1])
    want = {(FRAME_ENCODER, "input", "frames"): [B, H, W, ("RGB channels", 3)],
            (FRAME_ENCODER, "output", "query_key"): [B, ck, h, w],
            (FRAME_ENCODER, "output", "query_value"): [B, cv, h, w],
            (FRAME_ENCODER, "output", "memory_key"): [B, T, ck, h, w],
            (FRAME_ENCODER, "output", "memory_value"): [B, T, cv, h, w],
            (MEMORY_HEAD, "input", "query_key"): [B, ck, h, w],
            (MEMORY_HEAD, "input", "query_value"): [B, cv, h, w],
            (MEMORY_HEAD, "output", "mask"): [B, H, W],
            (MEMORY_HEAD, "output", "logits"): [B, C, H, W]}
    for i in range(spec.memory_frames):
        want[(MEMORY_HEAD, "input", f"memory_key_{i}")] = [B, ck, h, w]
        want[(MEMORY_HEAD, "input", f"memory_value_{i}")] = [B, cv, h, w]
    return want


def check_graphs(spec: "ExportSpec", directory) -> None:
    """The manifest agrees with the ONNX graphs' own inputs and outputs (the graphs are the truth): names,
    memory length T (the number of ``memory_key_i`` inputs), classes, channels, feature and input size,
    batch. A disagreement is one :class:`ManifestError` naming the field and what the graph says."""
    directory = Path(directory)
    where = directory / MANIFEST
    graphs = {name: _graph_io(directory / name) for name in (FRAME_ENCODER, MEMORY_HEAD)}
    memory_keys = [n for n in graphs[MEMORY_HEAD][0] if re.fullmatch(r"memory_key_\d+", n)]
    if len(memory_keys) != spec.memory_frames:
        raise ManifestError(f"{where}: field 'sequence_num' is {spec.memory_frames}, but {MEMORY_HEAD} has "
                            f"{len(memory_keys)} memory_key inputs (the graphs are the truth: re-export, or "
                            "restore the manifest)")
    want = _expected_io(spec)
    for file, kind in ((FRAME_ENCODER, "input"), (FRAME_ENCODER, "output"), (MEMORY_HEAD, "input"),
                       (MEMORY_HEAD, "output")):
        names = graphs[file][0 if kind == "input" else 1]
        expected = [n for (f, k, n) in want if (f, k) == (file, kind)]
        if set(names) != set(expected):
            raise ManifestError(f"{where}: {file} has the {kind}s {sorted(names)}, expected {sorted(expected)} "
                                "(not a tmanet export of this manifest: re-export)")
    for (file, kind, name), fields in want.items():
        dims = graphs[file][0 if kind == "input" else 1][name]
        if len(dims) != len(fields):
            raise ManifestError(f"{where}: {file}'s {kind} {name} has {len(dims)} dims {dims}, expected "
                                f"{len(fields)} (not a tmanet export of this manifest: re-export)")
        for got, (field_name, value) in zip(dims, fields):
            if got is not None and value is not None and got != value:
                raise ManifestError(f"{where}: field {field_name!r} says {value}, but {file}'s {kind} {name} "
                                    f"has the shape {[d if d is not None else '?' for d in dims]} (the graphs "
                                    "are the truth: re-export, or restore the manifest)")


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
