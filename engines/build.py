"""``tmanet build``: TensorRT engines from a split ONNX export, through Polygraphy's loaders.

For each graph of the export (``frame_encoder.onnx``, ``memory_head.onnx``) this parses the ONNX, picks the
recipe for this TensorRT (:func:`tmanet.engines.versioning.build_plan`: strongly typed, precision from the
graph; or TensorRT 10's weak FP16/INT8 flags on an FP32 graph), adds an optimization profile over the batch
when the export has a dynamic batch, builds, and writes ``<name>.engine`` + ``<name>.engine.json`` and the
set's ``engines.json``. Both engines are built before any file is replaced, so a failed build leaves the
previous engine set intact.

TensorRT and Polygraphy are imported inside the functions that need them: without TensorRT, this module
imports and :func:`require_tensorrt` raises one clear sentence.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tmanet.errors import UserError
from tmanet.safe_files import PendingFile
from tmanet.io.video import read_npy
from tmanet.manifest import ManifestError, load_manifest

from .metadata import (ENGINE_NAMES, EngineIntegrityError, current_gpu, engine_path, is_up_to_date,
                       make_engines_manifest, make_metadata, read_metadata, sidecar_path,
                       verify_engine_file, write_engines_manifest, write_metadata)
from .versioning import MIN_TENSORRT_MAJOR, build_plan, parse_trt_version

log = logging.getLogger("tmanet")

DEFAULT_DYNAMIC_BATCH = (1, 1, 8)   # min, opt, max for a dynamic-batch export when --batch is not given
TRT_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
                   "INT32": "int32", "INT64": "int64", "BOOL": "bool", "FP8": "float8_e4m3fn", "INT4": "int4"}


class TensorRTNotInstalled(UserError):
    """The ``tensorrt`` module cannot be imported (or is too old to use)."""


class EngineBuildError(UserError):
    """TensorRT rejected the network or failed to build it."""


def require_tensorrt():
    """The ``tensorrt`` module, or :class:`TensorRTNotInstalled` with one sentence that says what to do."""
    try:
        import tensorrt as trt
        version = trt.__version__
    except Exception as e:  # ImportError, or OSError from a missing libnvinfer: same advice
        reason = f"{type(e).__name__}: {e}".rstrip(".")
        raise TensorRTNotInstalled(
            f"TensorRT is not installed: importing the `tensorrt` module failed ({reason}); install TensorRT "
            f"{MIN_TENSORRT_MAJOR} or newer (`pip install tensorrt` next to a CUDA driver on desktop GPUs, "
            "JetPack on Jetson) to build and run engines, or use the ONNX Runtime backend (--backend ort), "
            "which needs no TensorRT") from None
    if parse_trt_version(version)[0] < MIN_TENSORRT_MAJOR:
        raise TensorRTNotInstalled(
            f"TensorRT is not installed in a usable version: found TensorRT {version}, tmanet needs "
            f"{MIN_TENSORRT_MAJOR} or newer (named I/O tensors, strongly typed networks)")
    return trt


def require_polygraphy():
    import importlib
    try:
        importlib.import_module("polygraphy.backend.trt")  # its own TensorRT import is lazy
    except ImportError as e:
        raise UserError(f"Polygraphy is not installed ({e}): `pip install polygraphy` (pure Python) to build "
                        "engines with `tmanet build`") from None


def trt_dtype_name(dtype) -> str:
    name = getattr(dtype, "name", None) or str(dtype).rsplit(".", 1)[-1]
    return TRT_DTYPE_NAMES.get(name, name.lower())


# -- batch and profiles (pure) ------------------------------------------------------------------------------
def parse_batch(text) -> tuple[int, int, int]:
    """'4' -> (4, 4, 4); '1,2,8' -> (1, 2, 8); a tuple passes through. min <= opt <= max, all >= 1."""
    if isinstance(text, (tuple, list)):
        parts = list(text)
    elif isinstance(text, int):
        parts = [text]
    else:
        try:
            parts = [int(p) for p in str(text).replace(" ", "").split(",")]
        except ValueError:
            raise UserError(f"--batch takes N or MIN,OPT,MAX (integers), got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise UserError(f"--batch takes N or MIN,OPT,MAX, got {text!r}")
    bmin, bopt, bmax = (int(p) for p in parts)
    if not 1 <= bmin <= bopt <= bmax:
        raise UserError(f"--batch needs 1 <= min <= opt <= max, got {bmin},{bopt},{bmax}")
    return bmin, bopt, bmax


def resolve_batch(manifest_batch, requested=None, max_batch: int | None = None) -> tuple[int, int, int]:
    """The (min, opt, max) batch of the engines: the export's fixed batch, or a profile for a dynamic one,
    within the export's ``max_batch`` (the manifest's; exports without one allowed 64)."""
    if manifest_batch == "dynamic":
        profile = parse_batch(requested) if requested is not None else DEFAULT_DYNAMIC_BATCH
        limit = int(max_batch) if max_batch is not None else 64
        if profile[2] > limit:
            raise UserError(f"--batch max {profile[2]} is beyond this export's maximum batch of {limit}: "
                            f"re-export, or build for at most {limit}")
        return profile
    fixed = int(manifest_batch)
    if requested is not None and parse_batch(requested) != (fixed, fixed, fixed):
        text = ",".join(str(b) for b in parse_batch(requested))
        raise UserError(f"this ONNX export has a fixed batch of {fixed}, so --batch {text} cannot apply: "
                        "export with `tmanet export --dynamic-batch` for a batch range")
    return fixed, fixed, fixed


def onnx_input_shapes(onnx_file) -> dict:
    """{input name: [dim or None (symbolic)]} of an ONNX graph, without loading its weights."""
    import onnx
    model = onnx.load(str(onnx_file), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    shapes = {}
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        dims = inp.type.tensor_type.shape.dim
        shapes[inp.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def profile_shapes(input_shapes: dict, batch) -> dict:
    """{name: (min, opt, max) shapes}: the batch (first) dimension takes the profile, the rest must be fixed."""
    bmin, bopt, bmax = batch
    out = {}
    for name, dims in input_shapes.items():
        if not dims:
            raise UserError(f"input {name!r} has no shape in the ONNX graph")
        if any(d is None for d in dims[1:]):
            raise UserError(f"input {name!r} has a dynamic dimension other than the batch ({dims}): tmanet "
                            "engines take a fixed input size (export again at the size you deploy)")
        rest = tuple(int(d) for d in dims[1:])
        if dims[0] is not None and not int(dims[0]) == bmin == bmax:
            raise UserError(f"input {name!r} has a fixed batch {dims[0]}, not the requested {bmin}..{bmax}")
        out[name] = ((bmin, *rest), (bopt, *rest), (bmax, *rest))
    return out


# -- weak INT8 calibration data (TensorRT 10 implicit quantization) ----------------------------------------
def load_calibration_frames(frames, input_size) -> np.ndarray:
    if isinstance(frames, (str, os.PathLike)):
        path = Path(frames)
        if path.suffix != ".npy":
            raise UserError(f"calibration frames must be a .npy uint8 clip (F, H, W, 3), got {path}")
        frames = read_npy(path, mmap=False)
    frames = np.asarray(frames)
    H, W = input_size
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (H, W, 3):
        raise UserError(f"calibration frames must be uint8 (F, {H}, {W}, 3) at the export size, got "
                        f"{frames.dtype} {frames.shape}")
    return frames


def calibration_feeds(onnx_dir, spec, frames: np.ndarray, batch: int, workdir=None):
    """(frame-encoder feeds, memory-head feed generator) for INT8 calibration from a clip.

    The clip is cut into ``batch`` consecutive streams, one per batch row. The head's inputs are what it sees
    when streaming: :func:`tmanet.calibration.quantize.build_samples` runs the FP32 frame graph (ONNX Runtime,
    CPU) frame by frame into the runtime's memory ring, so memory slot i reads frame t-T+i, clamped to the
    stream start. With ``workdir`` the samples are memory maps there (a head sample is ~130 MB at 1024x2048).
    """
    from tmanet.calibration.quantize import FrameStreams, build_samples
    n = len(frames) // batch
    if n < 1:
        raise UserError(f"calibration needs at least {batch} frames (one per stream of the batch), "
                        f"got {len(frames)}")
    H, W = frames.shape[1:3]
    streams = FrameStreams([frames[s * n:(s + 1) * n] for s in range(batch)], [(0, H, 0, W)] * batch, frames,
                           "<array>", "array", (H, W))
    samples = build_samples(onnx_dir, spec, streams, workdir=workdir, progress=False)
    rows = [[s * n + t for s in range(batch)] for t in range(n)]  # sample k = stream * frames + t
    # float32, although the engine's input is uint8: TensorRT calibrates non-index inputs in float32 only, and
    # Polygraphy (>= 0.49.10) declares them float32 and rejects any other batch (then: no scaling factors).
    encoder_feeds = [{"frames": samples.frames[r].astype(np.float32)} for r in rows]

    def head_feeds():
        for r in rows:
            yield {name: samples.head[name][r] for name in samples.head}

    return encoder_feeds, head_feeds


# -- the build ----------------------------------------------------------------------------------------------
def _progress_monitor(trt, bar):
    """A TensorRT IProgressMonitor showing the builder's current phase on ``bar`` (None where unsupported)."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None or bar is None:
        return None

    class _Monitor(base):
        def __init__(self):
            base.__init__(self)
            self.steps = {}

        # Called from TensorRT's C++ side: never raise, and always let the build continue.
        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps
            try:
                bar.set_postfix_str(phase_name, refresh=True)
            except Exception:
                pass

        def step_complete(self, phase_name, step):
            try:
                bar.set_postfix_str(f"{phase_name} {step + 1}/{self.steps.get(phase_name, '?')}", refresh=True)
            except Exception:
                pass
            return True

        def phase_finish(self, phase_name):
            self.steps.pop(phase_name, None)

    return _Monitor()


@contextmanager
def _polygraphy_quiet():
    """Polygraphy logs every build step at INFO: keep warnings and errors unless tmanet runs with -v."""
    from polygraphy.logger import G_LOGGER
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        yield


def _describe_network(network, shapes: dict) -> dict:
    io = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        entry = {"mode": "input", "dtype": trt_dtype_name(t.dtype), "shape": [int(d) for d in t.shape]}
        if t.name in shapes:
            entry["profile"] = dict(zip(("min", "opt", "max"), ([int(d) for d in s] for s in shapes[t.name])))
        io[t.name] = entry
    for i in range(network.num_outputs):
        t = network.get_output(i)
        io[t.name] = {"mode": "output", "dtype": trt_dtype_name(t.dtype), "shape": [int(d) for d in t.shape]}
    return io


def _load_onnx_manifest(onnx_dir):
    try:
        return load_manifest(onnx_dir)
    except ManifestError as e:
        raise UserError(str(e)) from None


def refuse_cpu_target(onnx_dir):
    """A ``tmanet calibrate --target cpu`` export is ONNX Runtime's Q/DQ placement: refuse it in one sentence
    (an unreadable manifest is left to the regular load, which says what is wrong)."""
    try:
        spec = load_manifest(onnx_dir, verify=False)
    except ManifestError:
        return
    if spec.target == "cpu":
        raise UserError(f"{onnx_dir} was quantized for ONNX Runtime's CPU kernels (tmanet calibrate --target cpu); "
                        "TensorRT wants the ModelOpt Q/DQ placement: calibrate the fp32 export with --target trt")


def build_engines(onnx_dir, out_dir=None, batch=None, workspace_gb=None, timing_cache=None, weak_precision=None,
                  progress=True, calib_frames=None, force=False) -> dict:
    """Build ``frame_encoder.engine`` and ``memory_head.engine`` from the export in ``onnx_dir``.

    ``batch``: (min, opt, max) or 'min,opt,max' for a dynamic-batch export (default 1,1,8); a fixed-batch export
    keeps its batch. ``workspace_gb``: builder workspace limit. ``timing_cache``: a file read before and
    updated after the build (rebuilds take seconds instead of minutes). ``weak_precision``: 'fp16' or 'int8'
    for TensorRT 10's weakly typed flags on an FP32 export (INT8 needs ``calib_frames``, a uint8 clip or .npy).
    An engine whose sidecar already matches the source, TensorRT, GPU and options is kept unless ``force``.
    Returns the engines manifest (also written to ``engines.json``).
    """
    refuse_cpu_target(onnx_dir)  # before TensorRT: the answer does not depend on it
    trt = require_tensorrt()
    require_polygraphy()
    onnx_dir = Path(onnx_dir)
    out = Path(out_dir) if out_dir is not None else onnx_dir
    spec = _load_onnx_manifest(onnx_dir)
    batch = resolve_batch(spec.batch_setting, batch, spec.max_batch)
    precisions = spec.precision
    plans = {name: build_plan(trt.__version__, precisions.get(name, "fp32"), weak_precision)
             for name in ENGINE_NAMES}
    calibration = work = None
    if any(p.int8_flag for p in plans.values()):
        if calib_frames is None:
            raise UserError("--weak-int8 calibrates INT8 ranges on real frames: pass --calib-frames CLIP.npy "
                            "(uint8 F x H x W x 3 at the export size)")
        frames = load_calibration_frames(calib_frames, spec.input_size)
        work = tempfile.TemporaryDirectory(prefix="tmanet-calibration-")
        calibration = calibration_feeds(onnx_dir, spec, frames, batch[1], workdir=work.name)
    gpu_name, cc = current_gpu()
    options = {"workspace_gb": workspace_gb, "timing_cache": str(timing_cache) if timing_cache else None,
               "tf32": False, "calibration_frames": None, "calibration_sha256": None}
    if calibration is not None:   # other frames give other INT8 ranges: part of what makes the engine
        options.update(calibration_frames=len(frames),
                       calibration_sha256=hashlib.sha256(np.ascontiguousarray(frames).data).hexdigest())
    out.mkdir(parents=True, exist_ok=True)

    staged = {}   # name -> (temporary engine path, sidecar dict); moved into place once both are built
    metas = {}
    try:
        from tqdm import tqdm
        with tqdm(ENGINE_NAMES, desc="tmanet build", unit="engine", disable=not progress) as bar:
            for name in bar:
                bar.set_description(f"building {name}")
                onnx_file = onnx_dir / f"{name}.onnx"
                entry = spec.files.get(onnx_file.name)
                if entry is None:
                    raise UserError(f"{onnx_dir}/manifest.json lists no {onnx_file.name}")
                shapes = profile_shapes(onnx_input_shapes(onnx_file), batch)
                final = engine_path(out, name)
                if not force and _still_valid(final, entry["sha256"], trt.__version__, cc, plans[name], batch,
                                              options):
                    log.info("%s is up to date (same ONNX, TensorRT, GPU and options): kept", final)
                    metas[name] = read_metadata(final)
                    continue
                calibrator_data = None
                if calibration is not None:
                    calibrator_data = calibration[0] if name == "frame_encoder" else calibration[1]()
                staged[name] = _build_one(trt, name, onnx_file, entry["sha256"], out, plans[name], shapes, batch,
                                          workspace_gb, timing_cache, calibrator_data, options, gpu_name, cc,
                                          bar if progress else None)
                metas[name] = staged[name][1]
        for name, (pending, meta) in staged.items():
            pending.commit()
            write_metadata(pending.path, meta)
    finally:
        for pending, _ in staged.values():
            pending.discard()
        if work is not None:
            work.cleanup()
    engines_manifest = make_engines_manifest(metas, spec.to_dict(), onnx_dir)
    path = write_engines_manifest(out, engines_manifest)
    for name, meta in metas.items():
        log.info("%s: %s, %.1f MB, TensorRT %s on %s (%s)", name, meta["precision"], meta["engine_bytes"] / 1e6,
                 meta["tensorrt_version"], meta["gpu"]["name"], meta["gpu"]["compute_capability"])
    log.info("wrote %s", path)
    return engines_manifest


def _still_valid(final: Path, onnx_sha256, trt_version, cc, plan, batch, options) -> bool:
    if not (final.is_file() and sidecar_path(final).is_file()):
        return False
    try:
        meta = read_metadata(final)
        if not is_up_to_date(meta, onnx_sha256=onnx_sha256, tensorrt_version=trt_version, compute_capability=cc,
                             build_plan=plan.to_dict(), batch=batch, build_options=options):
            return False
        verify_engine_file(final, meta)
    except EngineIntegrityError:
        return False
    return True


def _build_one(trt, name, onnx_file, onnx_sha256, out, plan, shapes, batch, workspace_gb, timing_cache,
               calibrator_data, options, gpu_name, cc, bar):
    from polygraphy.backend.trt import (Calibrator, CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath,
                                        Profile)
    from polygraphy.exception import PolygraphyException

    dynamic = batch[0] != batch[2]
    started = time.perf_counter()
    cache = PendingFile(timing_cache) if timing_cache else None   # a killed build never truncates the cache
    try:
        with _polygraphy_quiet():
            # TensorRT 11 ignores the strongly-typed flag (always strongly typed); 10.x needs it set.
            builder, network, parser = NetworkFromOnnxPath(str(onnx_file), strongly_typed=plan.strongly_typed)()
            profiles = None
            if dynamic:
                profile = Profile()
                for tensor, (smin, sopt, smax) in shapes.items():
                    profile.add(tensor, min=smin, opt=sopt, max=smax)
                profiles = [profile]
            config = CreateConfig(
                fp16=plan.fp16_flag or None, int8=plan.int8_flag or None, profiles=profiles,
                memory_pool_limits=({trt.MemoryPoolType.WORKSPACE: int(workspace_gb * (1 << 30))}
                                    if workspace_gb else None),
                load_timing_cache=str(timing_cache) if timing_cache else None,
                calibrator=Calibrator(calibrator_data) if calibrator_data is not None else None,
                progress_monitor=_progress_monitor(trt, bar),
            )
            io = _describe_network(network, shapes)
            serialized = EngineBytesFromNetwork((builder, network, parser), config=config,
                                                save_timing_cache=str(cache.tmp) if cache else None)()
    except BaseException as e:
        if cache is not None:
            cache.discard()
        # TypeError/AttributeError: a Polygraphy/TensorRT pair whose APIs disagree (e.g. Polygraphy < 0.49.22
        # reading config.int8_calibrator on TensorRT 11); RuntimeError: TensorRT's own failures.
        if isinstance(e, (PolygraphyException, TypeError, AttributeError, RuntimeError)):
            raise EngineBuildError(f"TensorRT could not build {name} from {onnx_file}: {type(e).__name__}: {e} "
                                   "(run `tmanet -v build` for TensorRT's log)") from None
        raise
    if cache is not None:  # Polygraphy wrote the whole cache (nothing written: the old one stays)
        cache.commit() if cache.tmp.stat().st_size else cache.discard()
    seconds = time.perf_counter() - started
    data = memoryview(serialized)
    pending = PendingFile(engine_path(out, name))   # renamed into place once every engine is built
    try:
        with open(pending.tmp, "wb") as f:
            f.write(data)
    except BaseException:
        pending.discard()
        raise
    meta = make_metadata(
        engine=name, engine_file=engine_path(out, name), engine_sha256=hashlib.sha256(data).hexdigest(),
        engine_bytes=data.nbytes, tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=cc,
        precision=plan.precision, build_plan=plan.to_dict(), io=io, batch=batch, source_onnx=onnx_file,
        source_sha256=onnx_sha256, build_options=options, build_seconds=seconds)
    log.debug("built %s in %.1f s: %s", name, seconds, plan.reason)
    return pending, meta
