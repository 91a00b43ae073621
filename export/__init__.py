"""Split ONNX export (frame encoder + memory head) with its manifest (read by :mod:`tmanet.manifest`)."""
from tmanet.manifest import ManifestError, load_manifest
from .onnx_export import ExportCheckError, export_onnx

__all__ = ["export_onnx", "load_manifest", "ExportCheckError", "ManifestError"]
