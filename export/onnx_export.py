"""Split ONNX export: ``frame_encoder.onnx`` + ``memory_head.onnx`` + ``manifest.json``, checked against torch.

The exported graphs are the BN-folded :class:`~tmanet.model.FrameEncoder` and :class:`~tmanet.model.MemoryHead`
at a fixed input size. Weights are embedded (no ``.onnx.data`` sidecar), so each graph is one file.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from tmanet.memory import MemoryStepper
from tmanet.onnx_session import cpu_session
from tmanet.safe_files import atomic_directory

from tmanet.manifest import ENCODER_OUTPUTS, FORMAT, FRAME_ENCODER, HEAD_OUTPUTS, MEMORY_HEAD, head_input_names
from tmanet.export.manifest import check_replaceable, file_entries, library_versions, write_manifest

log = logging.getLogger("tmanet")

OPSET = 20
MAX_DYNAMIC_BATCH = 64
# Export fails when ORT and torch disagree by more than this fraction of the logits' standard deviation
# (fp32: measured ~1e-5; float32 vs float64 of the official model is ~1e-5 too).
DEFAULT_TOLERANCE = 1e-4


class ExportCheckError(RuntimeError):
    """ONNX Runtime does not reproduce torch on the check frames."""


def _export(module, args, path, input_names, output_names, dynamic_batch, varargs_from=None):
    """``varargs_from``: index where ``module.forward``'s ``*args`` begin (torch.export wants them nested)."""
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)
        dims = [{0: batch} for _ in args]
        if varargs_from is not None:
            dims = dims[:varargs_from] + [tuple(dims[varargs_from:])]
        dynamic_shapes = tuple(dims)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    with warnings.catch_warnings():
        # The exporter's chatter (deprecations, "torchvision is not installed") is not the user's concern.
        warnings.simplefilter("ignore")
        exporter_log.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(module, args, dynamo=True, input_names=input_names,
                                        output_names=output_names,
                                        dynamic_shapes=dynamic_shapes, opset_version=OPSET, verbose=False)
        finally:
            exporter_log.setLevel(level)
    program.save(str(path), external_data=False)


def export_onnx(model, out_dir, height: int, width: int, batch: int = 1, dynamic_batch: bool = False,
                preset: str | None = None, checkpoint=None, check: bool = True, check_frames=None,
                query_chunk: int | None = None, tolerance: float = DEFAULT_TOLERANCE) -> Path:
    """Export ``model`` (a loaded TMANet) for ``height`` x ``width`` uint8 RGB frames into ``out_dir``.

    ``batch`` fixes the batch size (streams x slide windows); ``dynamic_batch`` leaves it free (1..64).
    With ``check`` ONNX Runtime is compared with torch on real frames (``check_frames`` (F,H,W,3) uint8, or
    a synthetic clip) and an :class:`ExportCheckError` is raised above ``tolerance`` or on non-finite outputs.

    The export is staged beside ``out_dir`` and swapped in when complete and checked: a previous export there
    stays usable until then, and a failed export leaves it as it was. ``out_dir`` must be new, empty or an
    export directory (see :func:`~tmanet.export.manifest.check_replaceable`).
    """
    if height < 32 or width < 32:
        raise ValueError(f"input size {height}x{width} is too small (at least 32x32)")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if query_chunk is not None and query_chunk < 0:
        raise ValueError(f"query_chunk must be >= 0 (0: all queries in one chunk), got {query_chunk}")
    out = Path(out_dir)
    check_replaceable(out)
    with atomic_directory(out) as stage:
        _export_into(stage, model, height, width, batch, dynamic_batch, preset, checkpoint, check, check_frames,
                     query_chunk, tolerance)
    return out


def _export_into(out: Path, model, height, width, batch, dynamic_batch, preset, checkpoint, check, check_frames,
                 query_chunk, tolerance):
    cfg = model.config
    model = model.eval()
    encoder, head = model.split((height, width), query_chunk=query_chunk)
    example_batch = 2 if dynamic_batch else batch  # torch.export specialises a dynamic dim traced at size 1
    frames = torch.zeros(example_batch, height, width, 3, dtype=torch.uint8)
    started = time.perf_counter()
    with torch.no_grad():
        qk, qv, mk, mv = encoder(frames)
        T = cfg.memory_frames
        head_args = (qk, qv, *[mk[:, i] for i in range(T)], *[mv[:, i] for i in range(T)])
        log.info("[1/3] tracing the frame encoder to %s (torch.onnx.export: tens of seconds for a ResNet-50)",
                 FRAME_ENCODER)
        _export(encoder, (frames,), out / FRAME_ENCODER, ["frames"], ENCODER_OUTPUTS, dynamic_batch)
        log.info("[2/3] tracing the memory head to %s", MEMORY_HEAD)
        _export(head, tuple(a.contiguous() for a in head_args), out / MEMORY_HEAD, head_input_names(T),
                HEAD_OUTPUTS, dynamic_batch, varargs_from=2)
    log.info("exported %s and %s in %.1f s", FRAME_ENCODER, MEMORY_HEAD, time.perf_counter() - started)
    manifest = {
        "format": FORMAT,
        "preset": preset,
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
        "config": cfg.to_dict(),
        "sequence_num": T,
        "key_channels": cfg.key_channels,
        "value_channels": cfg.value_channels,
        "num_classes": cfg.num_classes,
        "class_names": list(cfg.class_names),
        "palette": [list(c) for c in cfg.palette],
        "input_size": [height, width],
        "feature_size": list(qk.shape[-2:]),
        "batch": "dynamic" if dynamic_batch else batch,
        "max_batch": MAX_DYNAMIC_BATCH if dynamic_batch else batch,
        "align_corners": cfg.align_corners,
        "slide_crop": list(cfg.slide_crop),
        "slide_stride": list(cfg.slide_stride),
        "query_chunk": head.query_chunk,
        "opset": OPSET,
        "exporter": "torch.onnx.export(dynamo=True)",
        "precision": {"frame_encoder": "fp32", "memory_head": "fp32"},
        "versions": library_versions(),
    }
    if check:
        log.info("[3/3] checking ONNX Runtime against torch")
        manifest["check"] = check_against_torch(out, encoder, head, T, check_frames, batch if not dynamic_batch else 1,
                                                tolerance)
    manifest["files"] = file_entries(out, [FRAME_ENCODER, MEMORY_HEAD])
    write_manifest(out, manifest)


def check_frames_for(height, width, count, seed=0) -> np.ndarray:
    """Real-looking frames for the check when the user gives none: the documented synthetic clip rule."""
    from tmanet.test_clips import make_noise_clip
    return make_noise_clip(count, height, width, seed)


def check_against_torch(out, encoder, head, memory_frames, frames, batch, tolerance) -> dict:
    """Stream ``frames`` through torch and ONNX Runtime side by side; compare every output."""
    height, width = head.out_size
    frames = check_frames_for(height, width, memory_frames + 2) if frames is None else np.asarray(frames)
    if frames.dtype != np.uint8 or frames.shape[1:] != (height, width, 3):
        raise ValueError(f"check frames must be uint8 (F, {height}, {width}, 3), got {frames.dtype} {frames.shape}")
    enc_s, head_s = cpu_session(out / FRAME_ENCODER), cpu_session(out / MEMORY_HEAD)
    names = head_input_names(memory_frames)
    worst = {"encoder": 0.0, "logits": 0.0}
    mask_equal = total = 0
    scale = []

    def encode(x):  # torch's outputs go on through the ring; ONNX Runtime's are compared with them
        ref = encoder(torch.from_numpy(x))
        got = enc_s.run(ENCODER_OUTPUTS, {"frames": x})
        worst["encoder"] = max(worst["encoder"], *(float(np.abs(r.numpy() - g).max()) for r, g in zip(ref, got)))
        return ref

    def compare_heads(qk, qv, keys, values):  # both heads on the same slot inputs
        nonlocal mask_equal, total
        inputs = [qk, qv, *keys, *values]
        ref_mask, ref_logits = head(*inputs)
        mask, logits = head_s.run(HEAD_OUTPUTS, {n: t.contiguous().numpy() for n, t in zip(names, inputs)})
        if not (np.isfinite(logits).all() and bool(torch.isfinite(ref_logits).all())):
            raise ExportCheckError(
                f"the exported model gives non-finite logits (NaN or infinite) on check frame {len(scale)}: "
                "its weights or activations overflow; the export is not usable")
        worst["logits"] = max(worst["logits"], float(np.abs(ref_logits.numpy() - logits).max()))
        scale.append(float(ref_logits.std()))
        mask_equal += int((ref_mask.numpy() == mask).sum())
        total += mask.size

    stepper = MemoryStepper(encode, compare_heads)
    with torch.no_grad():
        for frame in frames:
            stepper.step(np.repeat(frame[None], batch, 0))
    worst_enc, worst_logits = worst["encoder"], worst["logits"]
    std = float(np.mean(scale))
    result = {"frames": int(len(frames)), "encoder_max_abs": worst_enc, "logits_max_abs": worst_logits,
              "logits_std": std, "relative": worst_logits / max(std, 1e-12), "tolerance": tolerance,
              "mask_agreement": mask_equal / total}
    log.info("ONNX Runtime vs torch on %d frames: logits max |d| %.3g (%.2g of the logit std), encoder max |d| "
             "%.3g, masks %.4f%% equal", result["frames"], worst_logits, result["relative"], worst_enc,
             100 * result["mask_agreement"])
    if not result["relative"] <= tolerance:  # NaN fails too
        raise ExportCheckError(
            f"ONNX Runtime disagrees with torch: logits max |d| {worst_logits:.4g} = {result['relative']:.3g} of the "
            f"logit std, above the tolerance {tolerance:g}; the ONNX files are not trustworthy")
    return result
