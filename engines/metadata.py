"""What an engine was built from, with and for: a JSON sidecar per engine and a manifest of the engine set.

``frame_encoder.engine`` gets ``frame_encoder.engine.json``: the TensorRT version and GPU it was built on
(a serialized engine runs only there), its precision and build recipe, its I/O tensors with the optimization
profile, the SHA256 of the engine file and of the ONNX it came from, the build options and time. The loader
checks the engine file against the sidecar's SHA256 and the sidecar against this machine
(:func:`tmanet.engines.versioning.check_compatible`) *before* handing bytes to TensorRT, which otherwise fails
with an opaque deserialization error (or worse, runs a truncated file's garbage).

``engines.json`` beside them lists the engine set (file, SHA256, sidecar) and carries a copy of the ONNX
manifest, so an engine directory is self-describing even when it lives apart from the ONNX export.
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from tmanet.errors import UserError
from tmanet.manifest import sha256_file
from tmanet.safe_files import write_text, write_text_if_changed

from .versioning import format_compute_capability, format_version

SCHEMA = 1
ENGINE_NAMES = ("frame_encoder", "memory_head")
ENGINE_SUFFIX = ".engine"
ENGINES_MANIFEST = "engines.json"
REQUIRED_KEYS = ("schema", "engine", "engine_file", "engine_sha256", "engine_bytes", "tensorrt_version", "gpu",
                 "precision", "build_plan", "io", "batch", "source_onnx", "build_options")


class EngineIntegrityError(UserError):
    """An engine file or its metadata is missing, unreadable or does not match."""


def sidecar_path(engine_path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def engine_path(directory, name: str) -> Path:
    return Path(directory) / f"{name}{ENGINE_SUFFIX}"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def make_metadata(*, engine: str, engine_file, engine_sha256: str, engine_bytes: int, tensorrt_version,
                  gpu_name: str, compute_capability, precision: str, build_plan: dict, io: dict, batch,
                  source_onnx, source_sha256: str, build_options: dict, build_seconds: float,
                  tmanet_version: str | None = None, built_at: str | None = None) -> dict:
    """The sidecar of one engine. ``io`` maps tensor name -> {mode, dtype, shape (-1 = dynamic), and for
    inputs with a dynamic dim, profile {min, opt, max}}; ``batch`` is (min, opt, max) (equal for a fixed batch)."""
    if tmanet_version is None:
        from tmanet import __version__ as tmanet_version
    bmin, bopt, bmax = (int(b) for b in batch)
    meta = {
        "schema": SCHEMA,
        "engine": engine,
        "engine_file": Path(engine_file).name,
        "engine_sha256": engine_sha256,
        "engine_bytes": int(engine_bytes),
        "tensorrt_version": format_version(tensorrt_version),
        "tensorrt_version_full": str(tensorrt_version),
        "gpu": {"name": gpu_name, "compute_capability": format_compute_capability(compute_capability)},
        "precision": precision,
        "build_plan": dict(build_plan),
        "io": io,
        "batch": {"min": bmin, "opt": bopt, "max": bmax, "dynamic": not bmin == bopt == bmax},
        "source_onnx": {"file": Path(source_onnx).name, "sha256": source_sha256},
        "build_options": dict(build_options),
        "build_seconds": round(float(build_seconds), 3),
        "built_at": built_at or utc_now(),
        "tmanet_version": tmanet_version,
    }
    validate_metadata(meta)
    return meta


def validate_metadata(meta: dict, where: str = "engine metadata") -> dict:
    if not isinstance(meta, dict):
        raise EngineIntegrityError(f"{where} is not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise EngineIntegrityError(f"{where} lacks {', '.join(missing)}: rebuild with `tmanet build`")
    if meta["schema"] != SCHEMA:
        raise EngineIntegrityError(f"{where} has schema {meta['schema']}, this tmanet reads schema {SCHEMA}: "
                                   "rebuild with `tmanet build`")
    if not {"name", "compute_capability"} <= set(meta["gpu"]):
        raise EngineIntegrityError(f"{where}: 'gpu' needs name and compute_capability")
    return meta


def write_metadata(engine_file, meta: dict) -> Path:
    validate_metadata(meta)
    path = sidecar_path(engine_file)
    write_text(path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def read_metadata(engine_file) -> dict:
    path = sidecar_path(engine_file)
    if not path.is_file():
        raise EngineIntegrityError(f"{path} is missing: every engine needs the metadata sidecar that "
                                   "`tmanet build` writes next to it")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EngineIntegrityError(f"{path} is not readable JSON ({e})") from None
    return validate_metadata(meta, str(path))


def verify_engine_file(engine_file, meta: dict) -> None:
    """The engine file is the one the sidecar describes (size, then SHA256)."""
    engine_file = Path(engine_file)
    if not engine_file.is_file():
        raise EngineIntegrityError(f"{engine_file} is missing: run `tmanet build`")
    size = engine_file.stat().st_size
    if size != meta["engine_bytes"]:
        raise EngineIntegrityError(f"{engine_file} has {size} bytes, its metadata says {meta['engine_bytes']}: "
                                   "the file changed after the build; rebuild with `tmanet build`")
    digest = sha256_file(engine_file)
    if digest != meta["engine_sha256"]:
        raise EngineIntegrityError(f"{engine_file} does not match its metadata (sha256 {digest[:12]}... != "
                                   f"{meta['engine_sha256'][:12]}...): the file changed after the build; "
                                   "rebuild with `tmanet build`")


def source_matches(meta: dict, onnx_sha256: str) -> bool:
    """Was this engine built from the ONNX file with this SHA256?"""
    return meta["source_onnx"]["sha256"] == onnx_sha256


def is_up_to_date(meta: dict, *, onnx_sha256: str, tensorrt_version, compute_capability, build_plan: dict,
                  batch, build_options: dict) -> bool:
    """Would building again give the same engine (same source, TensorRT, GPU, recipe, profile, options)?"""
    bmin, bopt, bmax = (int(b) for b in batch)
    return (source_matches(meta, onnx_sha256)
            and meta["tensorrt_version"] == format_version(tensorrt_version)
            and meta["gpu"]["compute_capability"] == format_compute_capability(compute_capability)
            and meta["build_plan"] == dict(build_plan)
            and (meta["batch"]["min"], meta["batch"]["opt"], meta["batch"]["max"]) == (bmin, bopt, bmax)
            and _comparable_options(meta["build_options"]) == _comparable_options(build_options))


def _comparable_options(options: dict) -> dict:
    # The timing cache only speeds the build up; where it lives does not change the engine.
    return {k: v for k, v in options.items() if k != "timing_cache"}


# -- the engine set -----------------------------------------------------------------------------------------
def make_engines_manifest(metas: dict, onnx_manifest: dict, onnx_dir) -> dict:
    """``metas``: engine name -> sidecar dict. ``written_at`` is the newest engine's build time, not the clock:
    the same engines give the same manifest, byte for byte."""
    first = next(iter(metas.values()))
    return {
        "schema": SCHEMA,
        "tensorrt_version": first["tensorrt_version"],
        "gpu": first["gpu"],
        "batch": first["batch"],
        "onnx_dir": str(Path(onnx_dir).resolve()),
        "onnx_manifest": onnx_manifest,
        "engines": {name: {"file": m["engine_file"], "sha256": m["engine_sha256"], "bytes": m["engine_bytes"],
                           "metadata": sidecar_path(m["engine_file"]).name, "precision": m["precision"]}
                    for name, m in metas.items()},
        "written_at": max(m["built_at"] for m in metas.values()),
    }


def write_engines_manifest(out_dir, manifest: dict) -> Path:
    """Atomically, and only when it changes: a build that kept every engine leaves the file as it was."""
    path = Path(out_dir) / ENGINES_MANIFEST
    write_text_if_changed(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def read_engines_manifest(directory) -> dict:
    path = Path(directory) / ENGINES_MANIFEST
    if not path.is_file():
        raise EngineIntegrityError(f"{directory} has no {ENGINES_MANIFEST}: build TensorRT engines there with "
                                   f"`tmanet build {directory}`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EngineIntegrityError(f"{path} is not readable JSON ({e})") from None
    if manifest.get("schema") != SCHEMA or not isinstance(manifest.get("engines"), dict):
        raise EngineIntegrityError(f"{path} is not a schema-{SCHEMA} engines manifest: rebuild with `tmanet build`")
    missing = [n for n in ENGINE_NAMES if n not in manifest["engines"]]
    if missing:
        raise EngineIntegrityError(f"{path} lists no {', '.join(missing)} engine: rebuild with `tmanet build`")
    return manifest


def load_engine_metadata(directory, name: str) -> tuple[Path, dict]:
    """Path and verified sidecar of engine ``name`` in an engine directory (file SHA256 checked)."""
    manifest = read_engines_manifest(directory)
    entry = manifest["engines"][name]
    path = Path(directory) / entry["file"]
    meta = read_metadata(path)
    if meta["engine_sha256"] != entry["sha256"]:
        raise EngineIntegrityError(f"{sidecar_path(path)} and {ENGINES_MANIFEST} disagree on {name}'s SHA256: "
                                   "the directory mixes two builds; rebuild with `tmanet build`")
    verify_engine_file(path, meta)
    return path, meta


# -- this machine ---------------------------------------------------------------------------------------------
def current_gpu(device: int = 0) -> tuple[str, str]:
    """(name, 'sm_XY') of a CUDA device, through torch or cuda-python, whichever this machine has."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(device), format_compute_capability(
                torch.cuda.get_device_capability(device))
    except ImportError:
        pass
    try:
        from cuda.bindings import runtime as cudart
        err, prop = cudart.cudaGetDeviceProperties(device)
        if int(err) == 0:
            name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
            return name.rstrip("\x00"), format_compute_capability((prop.major, prop.minor))
    except ImportError:
        pass
    raise UserError("no CUDA GPU is visible (torch.cuda and cuda-python found none): TensorRT engines "
                    "are built and run on an NVIDIA GPU")
