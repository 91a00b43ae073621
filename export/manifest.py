"""``manifest.json`` of an export directory: what was exported, how, and the SHA256 of every file.

:func:`load_manifest` validates the whole manifest once, here (:class:`ExportSpec`: every field the runtime,
calibration and TensorRT build read, with its type and range, and the mandatory ``files`` checksums): a bad
manifest is refused at load with one sentence naming the field.
"""
from __future__ import annotations

import hashlib
import json
import platform
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from tmanet.safe_files import PARTIAL_MARK, OutputError, write_json

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


PRECISIONS = ("fp32", "fp16", "int8")
QUANT_TARGETS = ("trt", "cpu")  # whose kernels the INT8 Q/DQ placement is made for (tmanet calibrate --target)
MAX_CLASSES = 256  # masks are uint8
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Fields:
    """Typed reads of a manifest dict; each failure is one :class:`ManifestError` naming the field."""

    def __init__(self, m: dict, where: str):
        self.m, self.where = m, where

    def bad(self, field, want) -> ManifestError:
        if field not in self.m:
            return ManifestError(f"{self.where}: field {field!r} is missing (it must be {want})")
        got = repr(self.m[field])
        got = got if len(got) <= 60 else got[:57] + "..."
        return ManifestError(f"{self.where}: field {field!r} must be {want}, got {got}")

    def integer(self, field, low=1, high=None) -> int:
        v = self.m.get(field)
        if not _is_int(v) or v < low or (high is not None and v > high):
            raise self.bad(field, f"an integer in {low}..{high}" if high else f"an integer >= {low}")
        return v

    def pair(self, field) -> tuple[int, int]:
        v = self.m.get(field)
        if not (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 1 for x in v)):
            raise self.bad(field, "a list of two integers >= 1")
        return tuple(v)

    def optional(self, field, valid, want):
        if field in self.m and self.m[field] is not None and not valid(self.m[field]):
            raise self.bad(field, want)


def _is_pair_or_int(v) -> bool:
    return _is_int(v) and v >= 1 or isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 1 for x in v)


def _is_palette(v) -> bool:
    return isinstance(v, list) and all(isinstance(c, list) and len(c) == 3
                                       and all(_is_int(x) and 0 <= x <= 255 for x in c) for c in v)


def _is_file_entry(name, entry) -> bool:
    return (Path(name).name == name and isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
            and bool(_SHA256.fullmatch(entry["sha256"])) and _is_int(entry.get("bytes", 0)))


@dataclass(frozen=True)
class ExportSpec:
    """The validated contents of ``manifest.json``: what an export directory holds and at which shapes.

    :meth:`from_dict` checks every field (type, range, consistency) and raises :class:`ManifestError` naming
    the first bad field."""
    sequence_num: int
    key_channels: int
    value_channels: int
    num_classes: int
    input_size: tuple[int, int]
    feature_size: tuple[int, int]
    batch: int | None            # None: dynamic batch (1..max_batch)
    max_batch: int
    precision: dict
    files: dict                  # name -> {"sha256": hex, "bytes": int}
    class_names: tuple = ()
    palette: tuple = ()          # (r, g, b) per class
    slide_crop: object = None    # int or (h, w); None: the input size
    slide_stride: object = None
    query_chunk: int | None = None
    align_corners: bool = False
    config: dict | None = None   # ModelConfig.to_dict() of the exported model
    checkpoint: str | None = None
    preset: str | None = None
    check: dict | None = None    # export's comparison with torch (onnx_export.check_against_torch)
    target: str = "trt"          # INT8 placement: trt (ModelOpt, TensorRT) or cpu (ONNX Runtime); older: trt
    directory: Path | None = None  # where it was loaded from
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # the manifest as written

    @property
    def dynamic_batch(self) -> bool:
        return self.batch is None

    @property
    def batch_setting(self):
        """The manifest's ``batch``: the fixed batch, or "dynamic"."""
        return "dynamic" if self.batch is None else self.batch

    def to_dict(self) -> dict:
        """The manifest as written (a copy), e.g. to record it or write a derived manifest."""
        return json.loads(json.dumps(self.raw))

    @classmethod
    def from_dict(cls, m, where: str = MANIFEST) -> "ExportSpec":
        if not isinstance(m, dict):
            raise ManifestError(f"{where}: the manifest must be a JSON object, got a {type(m).__name__}")
        f = _Fields(m, where)
        size, feature = f.pair("input_size"), f.pair("feature_size")
        if any(a > b for a, b in zip(feature, size)):
            raise f.bad("feature_size", f"at most the input size {list(size)}")
        batch = m.get("batch")
        if batch != "dynamic" and not (_is_int(batch) and batch >= 1):
            raise f.bad("batch", 'an integer >= 1 or "dynamic"')
        max_batch = m.get("max_batch", batch)
        if not (_is_int(max_batch) and max_batch >= 1 and batch in ("dynamic", max_batch)):
            raise f.bad("max_batch", "an integer >= 1 (the batch, for a fixed-batch export)")
        f.optional("class_names", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
                   "a list of names")
        f.optional("palette", _is_palette, "a list of [r, g, b] colours in 0..255")
        for field in ("slide_crop", "slide_stride"):
            f.optional(field, _is_pair_or_int, "an integer >= 1 or a list of two")
        f.optional("query_chunk", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: one chunk)")
        f.optional("align_corners", lambda v: isinstance(v, bool), "true or false")
        f.optional("config", lambda v: isinstance(v, dict), "an object")
        precision = m.get("precision", {"frame_encoder": "fp32", "memory_head": "fp32"})
        if not (isinstance(precision, dict) and set(precision) == {"frame_encoder", "memory_head"}
                and all(p in PRECISIONS for p in precision.values())):
            raise f.bad("precision", f"an object giving frame_encoder and memory_head one of {', '.join(PRECISIONS)}")
        files = m.get("files")
        if not isinstance(files, dict) or not {FRAME_ENCODER, MEMORY_HEAD} <= set(files):
            raise f.bad("files", f"an object with the SHA256 of {FRAME_ENCODER} and {MEMORY_HEAD}; checksums are "
                                 "mandatory, re-export")
        for name, entry in files.items():
            if not _is_file_entry(name, entry):
                raise f.bad("files", f'plain file names with {{"sha256": 64 hex digits, "bytes": n}} ({name!r} is not)')
        f.optional("checkpoint", lambda v: isinstance(v, str), "a path")
        f.optional("preset", lambda v: isinstance(v, str), "a preset name")
        f.optional("check", lambda v: isinstance(v, dict), "an object")
        f.optional("target", lambda v: v in QUANT_TARGETS, f"one of {', '.join(QUANT_TARGETS)}")
        return cls(f.integer("sequence_num"), f.integer("key_channels"), f.integer("value_channels"),
                   f.integer("num_classes", 1, MAX_CLASSES), size, feature, None if batch == "dynamic" else batch,
                   max_batch, dict(precision), dict(files), tuple(m.get("class_names") or ()),
                   tuple(tuple(c) for c in m.get("palette") or ()), _pair_or_none(m.get("slide_crop")),
                   _pair_or_none(m.get("slide_stride")), m.get("query_chunk"), bool(m.get("align_corners", False)),
                   m.get("config"), m.get("checkpoint"), m.get("preset"), m.get("check"),
                   m.get("target") or "trt", raw=m)


def _pair_or_none(v):
    return tuple(v) if isinstance(v, list) else v


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
    return write_json(Path(directory) / MANIFEST, manifest)


def load_manifest(directory, verify: bool = True) -> ExportSpec:
    """The validated manifest of an export directory; with ``verify`` every listed file must exist with its
    SHA256."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{directory} is not an export directory: no {MANIFEST} (run `tmanet export` first)")
    try:
        manifest = json.loads(path.read_text(), parse_constant=_refuse_constant)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ManifestError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: the manifest must be a JSON object, got a {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    spec = ExportSpec.from_dict(manifest, str(path))
    if verify:
        problems = []
        for name, entry in spec.files.items():
            f = directory / name
            if not f.is_file():
                problems.append(f"{name}: missing")
            elif sha256_file(f) != entry["sha256"]:
                problems.append(f"{name}: SHA256 differs from the manifest (modified or corrupted)")
        if problems:
            raise ManifestError(f"{directory}: " + "; ".join(problems))
    return replace(spec, directory=directory)


def _refuse_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")
