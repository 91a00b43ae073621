"""The ``torch`` backend: the PyTorch split rebuilt from the manifest's checkpoint, the reference for the other
backends, on the CPU or a CUDA device."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tmanet.manifest import ExportSpec

from ..address_cache import AddressKeyedCache
from .base import THREADS, Backend, BackendUnavailable, Option, log

def resolve_checkpoint(export_dir: Path, spec: ExportSpec) -> Path:
    path = spec.checkpoint
    if not path:
        raise BackendUnavailable(f"the torch backend rebuilds the model from the checkpoint, but "
                                 f"{export_dir}/manifest.json records none (export with a checkpoint path)")
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = export_dir / p
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {path} named in {export_dir}/manifest.json does not exist")
    return p


TORCH_PRECISIONS = ("fp32", "fp16")


class TorchBackend(Backend):
    """The PyTorch split (``model.split`` at the export size) rebuilt from the manifest's checkpoint: the
    reference for the other backends, on the CPU or a CUDA device.

    Speed options (each equals eager fp32 within the fp16 tolerance; see the tests):

    - ``precision="fp16"``: true half weights and activations (the BN-folded graphs cast once at open, no
      autocast re-casting weights per call); the memory ring is float16 too, halving its traffic. The
      chunked memory read takes its softmax in float32; logits are returned as float32. On the CPU too,
      where torch has half kernels (slow there: for checking, not for speed).
    - ``channels_last``: weights (and so activations) in NHWC memory format, the layout tensor cores and
      oneDNN prefer. CPU and CUDA.
    - ``cudnn_benchmark`` (CUDA): ``torch.backends.cudnn.benchmark = True`` (process-wide): cuDNN times its
      convolution algorithms for each shape on first use and keeps the fastest.
    - ``compile``: both graphs through ``torch.compile`` (Inductor; needs a C++ compiler on the CPU and
      Triton on CUDA; the first frames compile, which can take minutes).
    - ``cuda_graphs=True`` (CUDA): the frame encoder is captured into a ``torch.cuda.CUDAGraph`` per batch size
      (the host frame is copied into a static input, the graph replayed, the static outputs returned). The
      head is captured lazily once per set of input addresses: its memory inputs are the ring's slot views,
      which rotate over T+1 phases but are fixed tensors within a phase, and its queries are the encoder
      graph's static outputs, so after T+1 frames every call replays a ready graph.
    - ``fused_attention`` (default: on with CUDA): the head's memory read runs as one fused attention kernel
      (``scaled_dot_product_attention``, scale 1) instead of chunked matmul + softmax + matmul, so the
      (h*w) x (T*h*w) score matrix never reaches device memory. Checked at open on the real channel widths
      and dtype; where no fused kernel takes them the head reads in chunks and ``describe()`` says so.
    """
    name = "torch"
    summary = "PyTorch, the reference (CPU or CUDA; needs the checkpoint named in the manifest)"
    measures_torch_cuda_memory = True
    devices = ("cpu", "cuda")
    options = (
        THREADS,
        Option("--precision", "precision", "fp16 runs both graphs in half precision (weights, activations and the "
               "memory ring; meant for CUDA, slow on the CPU); default fp32", choices=TORCH_PRECISIONS),
        Option("--channels-last", "channels_last", "channels_last (NHWC) memory format for weights and "
               "activations"),
        Option("--cudnn-benchmark", "cudnn_benchmark", "on CUDA: let cuDNN time its convolution algorithms and "
               "keep the fastest"),
        Option("--compile", "compile", "torch.compile both graphs (the first frames compile: minutes)"),
        Option("--cuda-graphs", "cuda_graphs", "on CUDA: replay the graphs as captured CUDA graphs",
               needs="a CUDA backend"),
        Option("--no-fused-attention", "fused_attention", "on CUDA: read the memory with chunked matmul + softmax "
               "instead of the fused attention kernel (the default there)", value=False),
    )

    def __init__(self, export_dir, spec, device="cpu", model=None, threads: int | None = None,
                 precision: str = "fp32", cuda_graphs: bool = False, fused_attention: bool | None = None,
                 channels_last: bool = False, cudnn_benchmark: bool = False, compile: bool = False):
        super().__init__(export_dir, spec, device)
        on_cuda = str(device).startswith("cuda")
        self._check_options(precision, on_cuda, cuda_graphs=cuda_graphs, fused_attention=fused_attention,
                            cudnn_benchmark=cudnn_benchmark)
        import torch

        from tmanet.checkpoints import load_model
        from tmanet.presets import ModelConfig
        self.torch = torch
        if on_cuda and not torch.cuda.is_available():
            raise BackendUnavailable(f"device {device!r} asked for, but torch sees no CUDA device")
        if threads:
            torch.set_num_threads(int(threads))
        if cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        if model is None:
            model = load_model(resolve_checkpoint(self.export_dir, spec), ModelConfig.from_dict(spec.config))
        self.device_obj = torch.device(device)
        self.precision, self.dtype = precision, {"fp32": torch.float32, "fp16": torch.float16}[precision]
        self.cuda_graphs, self.channels_last, self.compiled = bool(cuda_graphs), bool(channels_last), bool(compile)
        encoder, head = model.eval().split(self.input_size, query_chunk=spec.query_chunk)
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        self.encoder = encoder.to(self.device_obj, self.dtype, memory_format=memory_format)
        self.memory_head = head.to(self.device_obj, self.dtype, memory_format=memory_format)
        self.memory_head.fused_attention = on_cuda and fused_attention is not False and self._fused_kernel_fits()
        if on_cuda and fused_attention is not False and not self.memory_head.fused_attention:
            log.warning("no fused attention kernel takes this head's inputs (%d key, %d value channels, %s): "
                        "the memory read runs in chunks", self.key_channels, self.value_channels, precision)
        self._encoder_fn, self._head_fn = self.encoder, self.memory_head
        if compile:
            self._encoder_fn = torch.compile(self.encoder, dynamic=False)
            self._head_fn = torch.compile(self.memory_head, dynamic=False)
        self._encoder_graphs: dict[int, tuple] = {}   # batch -> (graph, static input, static outputs)
        self._head_graphs = AddressKeyedCache()      # input addresses -> (graph, static outputs)

    @staticmethod
    def _check_options(precision, on_cuda, **cuda_only):
        """Bad options fail before any loading, in one sentence."""
        if precision not in TORCH_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(TORCH_PRECISIONS)}, got {precision!r}")
        if on_cuda:
            return
        why = {"cuda_graphs": "CUDA graphs capture GPU kernels only",
               "fused_attention": "torch has no fused CPU kernel for the memory read",
               "cudnn_benchmark": "it selects cuDNN convolution algorithms"}
        for name, value in cuda_only.items():
            if value:
                raise ValueError(f"{name} needs device='cuda' (got a CPU device); {why[name]}")

    def gemm_kernel(self):
        from ..roofline import torch_gemm
        return torch_gemm(self.device, self.precision, None)  # the threads set at open stay

    @classmethod
    def copy_for_serving(cls, export_dir, dest, spec):
        """The checkpoint the model is rebuilt from, beside the copy, named in the copy's manifest."""
        ckpt = resolve_checkpoint(Path(export_dir), spec)
        shutil.copy2(ckpt, Path(dest) / ckpt.name)
        copied = spec.to_dict()
        copied["checkpoint"] = ckpt.name
        (Path(dest) / "manifest.json").write_text(json.dumps(copied, indent=1) + "\n")

    def zeros(self, shape):
        return self.torch.zeros(shape, dtype=self.dtype, device=self.device_obj)

    def _fused_kernel_fits(self) -> bool:
        """Whether a fused attention kernel takes the head's channel widths in its precision: which kernel
        applies depends on widths, dtype and alignment, not on the number of positions, so a few suffice."""
        from tmanet.model.tma_head import fused_read
        torch = self.torch
        q = torch.zeros(1, 8, self.key_channels, device=self.device_obj, dtype=self.dtype)
        k = torch.zeros(1, self.key_channels, 16, device=self.device_obj, dtype=self.dtype)
        v = torch.zeros(1, 16, self.value_channels, device=self.device_obj, dtype=self.dtype)
        with torch.inference_mode():
            return fused_read(q, k, v) is not None

    def synchronize(self):
        if self.device_obj.type == "cuda":
            self.torch.cuda.synchronize(self.device_obj)

    def _run_encoder(self, x):
        return self._encoder_fn(x)   # in the backend's dtype: the ring is too

    def _run_head(self, inputs):
        mask, logits = self._head_fn(*inputs)
        return mask, logits.float()   # the interface promises float32 logits (a no-op in fp32)

    def _capture(self, fn, *args):
        """``fn(*args)`` captured into a CUDA graph -> (graph, static outputs). Warm-up runs go on a side
        stream first (lazy cuBLAS/cuDNN initialisation must not happen inside the capture)."""
        torch = self.torch
        side = torch.cuda.Stream(self.device_obj)
        side.wait_stream(torch.cuda.current_stream(self.device_obj))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn(*args)
        torch.cuda.current_stream(self.device_obj).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = fn(*args)
        return graph, outputs

    def encode(self, frames):
        if not frames.flags.writeable:  # torch wants writable memory even for inputs it only reads
            frames = frames.copy()
        torch = self.torch
        with torch.inference_mode():
            host = torch.from_numpy(frames)
            if not self.cuda_graphs:
                return self._run_encoder(host.to(self.device_obj, non_blocking=True))
            b = frames.shape[0]
            entry = self._encoder_graphs.get(b)
            if entry is None:
                static_in = torch.empty(frames.shape, dtype=torch.uint8, device=self.device_obj)
                static_in.copy_(host)
                graph, outputs = self._capture(self._run_encoder, static_in)
                entry = self._encoder_graphs[b] = (graph, static_in, outputs)
            graph, static_in, outputs = entry
            static_in.copy_(host)
            graph.replay()
            return outputs  # static buffers, overwritten by the next call (as the interface allows)

    def head(self, query_key, query_value, slot_keys, slot_values, return_logits=True):
        inputs = (query_key, query_value, *slot_keys, *slot_values)
        with self.torch.inference_mode():
            if self.cuda_graphs:
                key = tuple((t.data_ptr(), tuple(t.shape), tuple(t.stride())) for t in inputs)
                # The graph reads these exact addresses: valid for every later call with the same key.
                graph, (mask, out) = self._head_graphs.get_or_make(key, lambda: self._capture(self._run_head, inputs))
                graph.replay()
            else:
                mask, out = self._run_head(inputs)
            return mask.cpu().numpy(), (out.cpu().numpy() if return_logits else None)

    def close(self):
        self._encoder_graphs.clear()
        self._head_graphs.clear()

    def describe(self):
        on = {True: "on", False: "off"}
        extras = [name for name, used in (("channels_last", self.channels_last), ("torch.compile", self.compiled),
                                          ("cudnn.benchmark", self.torch.backends.cudnn.benchmark
                                           and self.device_obj.type == "cuda")) if used]
        return (f"torch {self.torch.__version__} ({self.device_obj}, {self.precision}, CUDA graphs "
                f"{on[self.cuda_graphs]}, fused attention {on[self.memory_head.fused_attention]}, "
                + "".join(f"{e}, " for e in extras) + f"{self.torch.get_num_threads()} threads)")
