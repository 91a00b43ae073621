"""The runtime's backends: one module each (``ort``, ``torch``, ``openvino`` here; TensorRT's in
``tmanet.engines.backend``), joined through one registry (:mod:`.registry`) that every command reads.
Importing this package loads no backend library (onnxruntime, torch, TensorRT, OpenVINO)."""
from __future__ import annotations

from .base import Backend, BackendUnavailable, GemmKernel, Option
from .registry import (BACKENDS, DEFAULT_BACKEND, add_backend_arguments, backend_names, backend_options,
                       get_backend, register_backend)

__all__ = ["Backend", "BackendUnavailable", "GemmKernel", "Option", "BACKENDS", "DEFAULT_BACKEND",
           "add_backend_arguments", "backend_names", "backend_options", "get_backend", "register_backend"]
