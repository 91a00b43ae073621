"""What every runtime backend is: a class that runs the two graphs of an export directory, and says as a class
what the commands need to know before opening one (its options, devices, precisions, peak probe, serving files).

A backend runs ``frame_encoder`` and ``memory_head`` and allocates the memory the ring buffer lives in;
everything stateful (the ring, streams, slide windows) is the segmenter's, shared by every backend:

- ``zeros(shape)``: float32 zeros in the backend's memory (host numpy for ONNX Runtime, a torch tensor on the
  device for torch, device memory for TensorRT); the segmenter builds the :class:`MemoryRing` with it.
- ``encode(frames)``: uint8 host frames ``[b, H, W, 3]`` -> ``(query_key, query_value, memory_key,
  memory_value)`` in backend memory. They may be preallocated buffers overwritten by the next call.
- ``head(query_key, query_value, slot_keys, slot_values, return_logits)``: the T memory slots are views into the
  ring (slot i = frame t-T+i); returns host ``mask [b, H, W]`` uint8 and ``logits [b, C, H, W]`` float32
  (or None when not asked for), valid until the next call.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tmanet.manifest import ExportSpec

log = logging.getLogger("tmanet")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine (missing library or device)."""


def positive_int(text: str) -> int:
    """argparse type of a count >= 1 (``--threads``, ``--max-frames``)."""
    import argparse
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class Option:
    """A command-line option a backend takes: ``--flag`` sets ``options[key]``. It takes one of ``choices``, or
    a value converted by ``type``; without either it is a switch that sets ``value``. ``needs`` words what the
    option needs when every backend that takes it shares that need (e.g. "a CUDA backend")."""
    flag: str
    key: str
    help: str
    choices: tuple | None = None
    type: Callable | None = None
    metavar: str | None = None
    value: object = True
    needs: str | None = None

    @property
    def is_switch(self) -> bool:
        return self.choices is None and self.type is None


THREADS = Option("--threads", "threads", "CPU threads (default: all cores)", type=positive_int, metavar="N")


@dataclass(frozen=True)
class GemmKernel:
    """A square GEMM on a backend's own engine, for the roofline's peak: ``run(make())`` multiplies two
    ``n x n`` matrices, ``sync()`` waits for the device."""
    n: int
    make: Callable
    run: Callable
    sync: Callable
    description: str


class Backend:
    """Base class: what the segmenter needs from a backend. ``batch`` is the fixed engine batch or None
    when the export's batch is dynamic (any batch up to ``max_batch``).

    Class attributes a backend sets (the registry and every command read them before opening one):
    ``name`` (``--backend NAME``), ``summary`` (one line for ``--help``), ``devices``, ``options`` (its command-line
    options, :class:`Option`), ``reads_onnx`` (it runs the export's ONNX files as they are, so a checkpoint can
    be evaluated on it through a temporary export), ``measures_torch_cuda_memory`` (the bench reads its device
    memory from torch's allocator), ``bench_options`` (options the bench opens it with by default)."""
    name = "base"
    summary = ""
    devices: tuple[str, ...] = ("cpu",)   # the device kinds it runs on ("cpu", "cuda")
    options: tuple[Option, ...] = ()
    reads_onnx = False
    measures_torch_cuda_memory = False
    bench_options: dict = {}

    def __init__(self, export_dir, spec: ExportSpec, device: str = "cpu"):
        self.export_dir = Path(export_dir)
        self.spec = spec
        self.device = device
        self.memory_frames = spec.memory_frames
        self.input_size = spec.input_size
        self.feature_size = spec.feature_size
        self.num_classes = spec.num_classes
        self.key_channels = spec.key_channels
        self.value_channels = spec.value_channels
        self.batch = spec.batch
        self.max_batch = spec.max_batch

    # -- what a command asks of the class, before opening one ---------------------------------------------
    @classmethod
    def copy_for_serving(cls, export_dir: Path, dest: Path, spec: ExportSpec) -> None:
        """Copy what this backend needs beyond the export's own files into ``dest`` (the export's copy in a
        Triton repository); nothing by default."""

    # -- one open backend -------------------------------------------------------------------------------------
    def zeros(self, shape):
        raise NotImplementedError

    def encode(self, frames: np.ndarray):
        raise NotImplementedError

    def head(self, query_key, query_value, slot_keys, slot_values, return_logits: bool = True):
        raise NotImplementedError

    def gemm_kernel(self) -> GemmKernel:
        """The square GEMM the roofline probes as this backend's peak, on its device, threads and precision."""
        raise NotImplementedError(f"the {self.name} backend has no peak probe")

    def synchronize(self):
        """Wait for the work this backend enqueued on its device (nothing to wait for on the CPU)."""

    def close(self):
        """Release engines and buffers (the object is unusable afterwards)."""

    def describe(self) -> str:
        return f"{self.name} ({self.device})"
