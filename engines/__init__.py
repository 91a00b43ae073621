"""tmanet.engines: TensorRT engines from the split ONNX export (``tmanet build``) and the ``trt`` runtime backend.

Nothing here imports TensorRT at module level: without it, building or running an engine raises one clear
:class:`TensorRTNotInstalled` sentence and everything else (ONNX export, ORT runtime) works as before.
"""
from .build import EngineBuildError, TensorRTNotInstalled, build_engines, require_tensorrt
from .metadata import EngineIntegrityError, read_engines_manifest, read_metadata
from .versioning import BuildPlan, EngineCompatibilityError, build_plan, check_compatible, parse_trt_version


def bench_trt(*args, **kwargs):
    """See :func:`tmanet.engines.trt_backend.bench_trt` (imported on use: it needs torch)."""
    from .trt_backend import bench_trt as run
    return run(*args, **kwargs)


__all__ = ["build_engines", "require_tensorrt", "bench_trt", "build_plan", "check_compatible", "parse_trt_version",
           "BuildPlan", "TensorRTNotInstalled", "EngineBuildError", "EngineIntegrityError",
           "EngineCompatibilityError", "read_engines_manifest", "read_metadata"]
