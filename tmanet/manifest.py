"""The export contract: ``manifest.json`` of an export directory read and validated once.

:func:`load_manifest` validates the whole manifest (:class:`ExportSpec`: every field the runtime,
calibration and TensorRT build read, with its type and range, and the mandatory ``files`` checksums): a bad
manifest is refused at load with one sentence naming the field. It lives in the core because every package
reads it; :mod:`tmanet.export.manifest` writes it.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "tmanet-trt-onnx/1"
FRAME_ENCODER = "frame_encoder.onnx"
MEMORY_HEAD = "memory_head.onnx"
ENGINE_FILES = (("frame_encoder", FRAME_ENCODER), ("memory_head", MEMORY_HEAD))  # engine name, its ONNX file
# The graphs' I/O names: the contract between export, the runtime backends, calibration and TensorRT.
ENCODER_OUTPUTS = ["query_key", "query_value", "memory_key", "memory_value"]
HEAD_OUTPUTS = ["mask", "logits"]


def head_input_names(memory_frames: int) -> list[str]:
    return (["query_key", "query_value"] + [f"memory_key_{i}" for i in range(memory_frames)]
            + [f"memory_value_{i}" for i in range(memory_frames)])


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
    memory_frames: int
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
        _check_limits(m, f)
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


def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(directory, verify: bool = True) -> ExportSpec:
    """The validated manifest of an export directory; with ``verify`` every listed file must exist with its
    SHA256 and the graphs' inputs and outputs must match the manifest (:func:`check_graphs`)."""
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
        check_graphs(spec, directory)
    return replace(spec, directory=directory)


def _refuse_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")
