"""tmanet.engines: TensorRT engines from the split ONNX export (``tmanet build``) and the ``trt`` runtime backend.

Nothing here imports TensorRT at module level: without it, building or running an engine raises one clear
:class:`TensorRTNotInstalled` sentence and everything else (ONNX export, ORT runtime) works as before.
"""
from .build import EngineBuildError, TensorRTNotInstalled, build_engines, require_tensorrt
from .metadata import EngineIntegrityError, read_engines_manifest, read_metadata
from .versioning import BuildPlan, EngineCompatibilityError, build_plan, check_compatible, parse_trt_version


__all__ = ["build_engines", "require_tensorrt", "build_plan", "check_compatible", "parse_trt_version",
           "BuildPlan", "TensorRTNotInstalled", "EngineBuildError", "EngineIntegrityError",
           "EngineCompatibilityError", "read_engines_manifest", "read_metadata"]
