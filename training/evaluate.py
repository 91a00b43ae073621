"""Accuracy of a checkpoint or an export directory on labelled clips: IoU, mIoU, pixel accuracy and
temporal consistency.

The metrics come from :mod:`tmanet.metrics`; :func:`evaluate` streams clips through a predictor and
accumulates them.
Predictions always come from the *streaming* path (frame encoder + ring buffer + memory head), the
way the model is deployed, starting at each clip's first frame (memory warm-up clamps to it).
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from tmanet.manifest import ExportSpec, ManifestError, load_manifest
from tmanet.metrics import FlipCounter, confusion_matrix, region_scores, scores_from_confusion

# Which frames the memory slots see in evaluation: "real" (the clip's previous frames, the deployed rule) or
# "current" (the current frame in every slot): the gap between the two is how much a model uses its memory.
MEMORY_SOURCES = ("real", "current")


# -- predictors ----------------------------------------------------------------------------------------
def feature_size(config, height: int, width: int) -> tuple[int, int]:
    """The frame encoder's output size: every stride-2 layer (3x3 pad 1, or the 3x3 max pool pad 1) maps
    n -> ceil(n / 2); output stride 8 has three of them, 16 four."""
    h, w = height, width
    for _ in range(int(round(math.log2(config.output_stride)))):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


def spec_for_model(model, height: int, width: int, checkpoint=None) -> ExportSpec:
    """The :class:`ExportSpec` the runtime reads, for a model that was not exported (the torch backend on a
    checkpoint): what ``export_onnx`` would record at this size, batch 1, with no graph files."""
    cfg = model.config
    return ExportSpec(cfg.memory_frames, cfg.key_channels, cfg.value_channels, cfg.num_classes, (height, width),
                      feature_size(cfg, height, width), batch=1, max_batch=1,
                      precision={"frame_encoder": "fp32", "memory_head": "fp32"}, files={},
                      class_names=tuple(cfg.class_names), palette=tuple(tuple(c) for c in cfg.palette),
                      slide_crop=tuple(cfg.slide_crop), slide_stride=tuple(cfg.slide_stride),
                      align_corners=cfg.align_corners, config=cfg.to_dict(),
                      checkpoint=str(checkpoint) if checkpoint else None)


class Predictor:
    """Streams clips through the runtime's :class:`StreamingSegmenter` (one per frame size), built from an
    export directory or from a checkpoint (torch backend on the model itself, or ONNX Runtime on a
    temporary export of it)."""

    def __init__(self, source, mode: str = "whole", backend: str | None = None, device: str = "cpu",
                 threads: int | None = None, stride=None, backend_options: dict | None = None):
        from .config import InputError
        if mode not in ("whole", "slide"):
            raise InputError(f"mode must be 'whole' or 'slide', got {mode!r}")
        self.source = Path(source)
        self.mode, self.device, self.stride = mode, device, stride
        self.options = dict(backend_options or {}, **({"threads": threads} if threads else {}))
        self._segmenters: dict[tuple, object] = {}
        self._tmp = None
        if self.source.is_dir():
            try:
                self.spec = load_manifest(self.source)
            except ManifestError as e:
                raise InputError(str(e)) from None
            self.kind, self.backend = "export", backend or "ort"
            self.model = None
            from tmanet.presets import ModelConfig
            self.config = ModelConfig.from_dict(self.spec.config)
        elif self.source.is_file():
            from tmanet.checkpoints import load_model
            self.kind, self.backend = "checkpoint", backend or "torch"
            self.model = load_model(self.source)
            self.config = self.model.config
            self.spec = None
        else:
            raise InputError(f"{source} is neither a checkpoint file nor an export directory")
        from tmanet.runtime.backends import BackendUnavailable, get_backend
        try:
            backend_class = get_backend(self.backend)
        except (ValueError, BackendUnavailable) as e:
            raise InputError(str(e)) from None
        if self.kind == "checkpoint" and self.backend != "torch" and not backend_class.reads_onnx:
            raise InputError(f"the {self.backend} backend needs an export directory with its engines; a checkpoint "
                             "runs on torch or on a backend that reads the ONNX files")

    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def default_size(self) -> tuple[int, int] | None:
        """The frame size an export serves (None for a checkpoint: any size)."""
        return self.spec.input_size if self.spec else None

    def _window(self, H: int, W: int) -> tuple[int, int]:
        if self.mode == "whole":
            return H, W
        crop = self.config.slide_crop
        return min(crop[0], H), min(crop[1], W)

    def segmenter(self, H: int, W: int):
        """The (reset) segmenter for frames of H x W."""
        from tmanet.runtime.backends import BackendUnavailable

        from .config import InputError
        key = (H, W)
        seg = self._segmenters.get(key)
        if seg is None:
            try:
                seg = self._segmenters[key] = self._make_segmenter(H, W)
            except BackendUnavailable as e:
                raise InputError(f"backend {self.backend!r}: {e}") from None
        seg.reset()
        return seg

    def _make_segmenter(self, H: int, W: int):
        from tmanet.runtime.segmenter import StreamingSegmenter
        opts = self.options
        if self.kind == "export":
            return StreamingSegmenter.open(self.source, backend=self.backend, device=self.device, mode=self.mode,
                                           stride=self.stride, max_gap=None, **opts)
        h, w = self._window(H, W)
        if self.backend == "torch":  # the model itself behind the runtime: no export needed
            from tmanet.runtime.backends.torch import TorchBackend
            spec = spec_for_model(self.model, h, w, self.source)
            backend_obj = TorchBackend(self.source.parent, spec, self.device, model=self.model, **opts)
            return StreamingSegmenter(backend_obj, spec, mode=self.mode, stride=self.stride, max_gap=None)
        from tmanet.export import export_onnx  # a checkpoint on a backend that reads ONNX: a temporary export
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tmanet-eval-")
        out = export_onnx(self.model, Path(self._tmp.name) / f"{h}x{w}", h, w, checkpoint=self.source, check=False)
        return StreamingSegmenter.open(out, backend=self.backend, device=self.device, mode=self.mode,
                                       stride=self.stride, max_gap=None, **opts)

    def stream(self, frames, memory_source: str = "real") -> Iterator[np.ndarray]:
        """Masks (H, W) uint8 of a clip's frames, from its first frame on (memory warm-up clamps to it).
        ``memory_source="current"`` restarts the stream before every frame: by the warm-up rule every memory
        slot then reads the current frame (under its own slot weights), as training with memory "current"."""
        frames = np.asarray(frames)
        seg = self.segmenter(*frames.shape[1:3])
        for frame in frames:
            if memory_source == "current":
                seg.reset(0)  # the one stream (every slide window of it) starts afresh; buffers stay
            yield seg.push(frame).mask

    def close(self):
        for seg in self._segmenters.values():
            seg.close()
        self._segmenters.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


# -- evaluation ----------------------------------------------------------------------------------------
def evaluate(source, data, mode: str = "whole", backend: str | None = None, device: str = "cpu",
             split: str = "val", all_frames: bool = False, synthetic_size=None, synthetic_frames: int = 12,
             synthetic_count: int = 8, frames_dir=None, limit: int | None = None, threads: int | None = None,
             stride=None, progress: bool = True, synthetic_degradation: float = 0.5,
             memory_source: str = "real", backend_options: dict | None = None) -> dict:
    """Score ``source`` (a checkpoint ``.pth`` or an export directory) on ``data`` (``synthetic[:N]`` or a
    Cityscapes / CamVid layout root, its ``split``).

    Synthetic clips are streamed whole from frame 0; frames t >= T are scored (all frames with
    ``all_frames``) and consecutive scored frames give the temporal consistency. Dataset samples are
    streamed as their T memory frames then the labelled target, which is scored (one labelled frame per
    sample: no temporal figure). ``limit`` caps the number of clips / samples. ``synthetic_degradation``
    (0..1) is the synthetic clips' per-frame degradation strength; on synthetic clips the pixels the
    degradation destroyed are also scored on their own (``degraded``) and so are the others (``intact``).
    ``memory_source`` (:data:`MEMORY_SOURCES`): "current" feeds the current frame to every memory slot.
    ``backend_options``: the backend's own options (as ``tmanet run`` takes them).
    Returns a dict (see the keys below); :func:`format_report` renders it.
    """
    from tqdm import tqdm

    from .config import InputError, parse_pair
    from .data import SYNTHETIC_VAL_SEED, DataSpec, open_dataset, parse_data
    spec = parse_data(data)
    if not 0.0 <= float(synthetic_degradation) <= 1.0:
        raise InputError(f"synthetic degradation must lie in [0, 1], got {synthetic_degradation}")
    if memory_source not in MEMORY_SOURCES:
        raise InputError(f"memory source must be one of {', '.join(MEMORY_SOURCES)}, got {memory_source!r}")
    predictor = Predictor(source, mode, backend, device, threads, stride, backend_options)
    cfg = predictor.config
    T = cfg.memory_frames
    C = cfg.num_classes
    cm = np.zeros((C, C), np.int64)
    cm_degraded = np.zeros((C, C), np.int64)
    flips = FlipCounter()
    per_clip = []  # synthetic: each clip's confusions, for paired comparisons over the same clips (eval_compare)
    scored = clips = 0
    started = time.perf_counter()
    try:
        if spec.kind == "synthetic":
            size = parse_pair(synthetic_size, "synthetic size") if synthetic_size is not None else \
                (predictor.default_size() or (256, 512))
            count = spec.count or synthetic_count
            ds = open_dataset(DataSpec("synthetic", count=count if limit is None else min(count, limit)), cfg,
                              "val", None, 0, size, synthetic_frames, progress=progress,
                              synthetic_degradation=float(synthetic_degradation))
            for (frames, labels), damage in tqdm(zip(ds.clips, ds.damage), total=len(ds.clips), desc="evaluate",
                                                 unit="clip", disable=not progress):
                flips.start_clip()
                clip_cm = np.zeros((C, C), np.int64)
                clip_degraded = np.zeros((C, C), np.int64)
                for t, mask in enumerate(_stream(predictor, frames, memory_source)):
                    if t < T and not all_frames:
                        continue
                    clip_cm += confusion_matrix(mask, labels[t], C)
                    clip_degraded += confusion_matrix(mask[damage[t]], labels[t][damage[t]], C)
                    flips.add(mask, labels[t])
                    scored += 1
                cm += clip_cm
                cm_degraded += clip_degraded
                per_clip.append({"seed": SYNTHETIC_VAL_SEED + clips, "confusion": clip_cm.tolist(),
                                 "confusion_degraded": clip_degraded.tolist()})
                clips += 1
        else:
            ds = open_dataset(spec, cfg, split, None, 0, frames_dir=frames_dir)
            n = len(ds) if limit is None else min(limit, len(ds))
            for i in tqdm(range(n), desc="evaluate", unit="sample", disable=not progress):
                s = ds[i]
                clip = np.concatenate([np.asarray(s["memory"]), np.asarray(s["image"])[None]])
                mask = None
                for mask in _stream(predictor, clip, memory_source):
                    pass
                try:
                    cm += confusion_matrix(mask, s["label"], C)
                except ValueError as e:
                    raise InputError(f"{s.get('label_path', f'sample {i}')}: {e}") from None
                scored += 1
                clips += 1
    finally:
        predictor.close()
    seconds = time.perf_counter() - started
    if not scored:
        raise InputError(f"--data {data}: nothing to score")
    result = {
        "source": str(source), "kind": predictor.kind, "backend": predictor.backend, "mode": mode,
        "data": str(data), "split": "val" if spec.kind == "synthetic" else split,
        "clips": clips, "frames_scored": scored, "scored_frames": "all" if all_frames else f"t >= T ({T})",
        **scores_from_confusion(cm, predictor.class_names),
        "temporal": flips.result() if spec.kind == "synthetic" else None,
        "memory_source": memory_source,
        # where the synthetic degradation destroyed the frame, and the rest (None for datasets: unknown there)
        "degraded": region_scores(cm_degraded) if spec.kind == "synthetic" else None,
        "intact": region_scores(cm - cm_degraded) if spec.kind == "synthetic" else None,
        "confusion": cm.tolist(), "class_names": predictor.class_names,
        "seconds": round(seconds, 3),
    }
    if spec.kind == "synthetic":
        result["synthetic"] = {"size": list(size), "frames": synthetic_frames, "first_seed": SYNTHETIC_VAL_SEED,
                               "degradation": float(synthetic_degradation)}
        result["per_clip"] = per_clip
    return result


def _stream(predictor: Predictor, frames, memory_source: str = "real") -> Iterator[np.ndarray]:
    from .config import InputError
    try:
        yield from predictor.stream(frames, memory_source)
    except ValueError as e:  # the runtime's message for a frame size the export does not serve
        raise InputError(str(e)) from None


def format_report(result: dict) -> str:
    """A plain-text table: per-class IoU / accuracy of the scored classes, then the summary figures."""
    def pct(v):
        return "   -  " if v is None else f"{100 * v:6.2f}"
    width = max([len(n) for n in result["per_class"]] + [10])
    lines = [f"{result['kind']} {result['source']}  backend {result['backend']}, mode {result['mode']}, "
             f"memory {result.get('memory_source', 'real')}",
             f"data {result['data']} ({result['split']}): {result['clips']} clip(s), {result['frames_scored']} "
             f"frame(s) scored ({result['scored_frames']}), {result['seconds']:.1f} s",
             "",
             f"{'class':<{width}}   IoU %   Acc %   GT px",
             "-" * (width + 26)]
    for name, r in result["per_class"].items():
        if r["iou"] is None:
            continue
        lines.append(f"{name:<{width}}  {pct(r['iou'])}  {pct(r['accuracy'])}  {r['gt_pixels']:>7d}")
    lines.append("-" * (width + 26))
    lines.append(f"{'mIoU':<{width}}  {pct(result['miou'])}   ({result['classes_scored']} classes present in GT "
                 f"or predictions)")
    lines.append(f"{'pixel acc':<{width}}  {pct(result['pixel_accuracy'])}")
    lines.append(f"{'mean acc':<{width}}  {pct(result['mean_accuracy'])}")
    for name, what in (("degraded", "destroyed by the degradation"), ("intact", "the other pixels")):
        r = result.get(name)
        if r:
            lines.append(f"{name:<{width}}  {pct(r['miou'])}   mIoU, pixel acc {pct(r['pixel_accuracy']).strip()} % "
                         f"on {r['pixels']} px ({what})")
    tc = result.get("temporal")
    if tc and tc["flip_rate"] is not None:
        lines.append(f"{'flip rate':<{width}}  {pct(tc['flip_rate'])}   (predicted label changes where the GT "
                     f"does not; lower is better; {tc['frame_pairs']} frame pairs)")
        lines.append(f"{'temporal':<{width}}  {pct(tc['temporal_consistency'])}   (1 - flip rate)")
    else:
        lines.append("temporal consistency: n/a (needs consecutive labelled frames: synthetic clips)")
    return "\n".join(lines)
