"""Accuracy gate: stream two export directories side by side on ONNX Runtime (CPU) and compare their outputs.

Both run through the real runtime (:class:`~tmanet.runtime.StreamingSegmenter`, ``backend="ort"``): the same
frame order, memory ring and warm-up rule as deployment, whole frames at the export size or slide windows for
larger frames. Reported: pixel agreement of the masks (overall and the worst frame), the logits' max / mean
absolute difference, also relative to the standard deviation of A's logits, and, with labels, each side's
mIoU. Targets against the float32 export: float16 >= 99.9 % pixel agreement, INT8 >= 99 %.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tmanet.metrics import confusion_matrix, scores_from_confusion
from tmanet.io.driving_logs import split_topic
from tmanet.io.video import open_frames, read_npy
from tmanet.manifest import load_manifest

log = logging.getLogger("tmanet")

# Pixel agreement with the float32 export that a lower-precision export must reach.
TARGETS = {"fp16": 0.999, "int8": 0.99}


class CompareError(ValueError):
    """The two exports (or the frames / labels) cannot be compared."""


def target_agreement(precision: dict) -> float | None:
    """The agreement target of an export with these per-engine precisions: its lowest precision's target
    (None for an all-float32 export)."""
    targets = [TARGETS[p] for p in precision.values() if p in TARGETS]
    return min(targets) if targets else None


def precision_label(precision: dict) -> str:
    values = list(dict.fromkeys(precision.values()))
    if len(values) == 1:
        return values[0]
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in precision.items())


def check_compatible(ma, mb):
    """``ma``, ``mb``: the :class:`~tmanet.manifest.ExportSpec` of the two exports."""
    problems = []
    for key, what in (("input_size", "input size"), ("num_classes", "classes"),
                      ("memory_frames", "memory frames T"), ("feature_size", "feature size")):
        a, b = getattr(ma, key), getattr(mb, key)
        if a != b:  # sizes shown as the manifest writes them, [h, w]
            problems.append(f"{what} {list(a) if isinstance(a, tuple) else a} vs "
                            f"{list(b) if isinstance(b, tuple) else b}")
    if problems:
        raise CompareError(f"the exports differ: {'; '.join(problems)} ({ma.directory} vs {mb.directory}); "
                           "compare exports of the same model at the same size")


# -- labels -------------------------------------------------------------------------------------------------
def open_labels(source):
    """Label maps ``(F, H, W)`` uint8 (class ids, 255 = ignore) from a ``.npy`` file or a folder of
    single-channel PNGs (sorted by name): returns (count, getter)."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"labels not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".png")
        if not files:
            raise CompareError(f"{path}: no .png label maps")

        def get(i):
            from PIL import Image
            with Image.open(files[i]) as im:
                if im.mode not in ("L", "P", "I", "I;16"):
                    raise CompareError(f"{files[i]}: label PNGs must be single-channel class ids (mode L or P), "
                                       f"got mode {im.mode}")
                return np.asarray(im)
        return len(files), get
    if path.suffix.lower() != ".npy":
        raise CompareError(f"{path}: labels must be a .npy (F, H, W) uint8 array or a folder of PNGs")
    labels = read_npy(path)
    if labels.ndim != 3 or labels.dtype != np.uint8:
        raise CompareError(f"{path}: labels must be uint8 (F, H, W), got {labels.dtype} {labels.shape}")
    return len(labels), lambda i: np.asarray(labels[i])


def _miou(conf: np.ndarray) -> tuple[float, list]:
    """(mIoU over the classes present in labels or predictions, per-class IoU with None for absent)."""
    scores = scores_from_confusion(conf)
    miou = scores["miou"]
    return (float("nan") if miou is None else miou), [c["iou"] for c in scores["per_class"].values()]


# -- comparison ---------------------------------------------------------------------------------------------
def _frame_iter(frames, num):
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise CompareError(f"frames must be uint8 RGB (F, H, W, 3), got {frames.dtype} {frames.shape}")
        clip = frames if num is None else frames[:num]
        return len(clip), iter(clip), "<array>"
    path = Path(frames)
    if not split_topic(path)[0].exists():  # a ROS bag may name a topic: drive.mcap:/cam/front
        raise FileNotFoundError(f"frames source not found: {path}")
    source = open_frames(path, max_frames=num)
    return source.count, (f for f, _ in source), str(path)


class _Segmenter:
    """One export on a backend (ORT unless told) through the streaming runtime; a fixed batch B > 1 is fed B
    copies of the stream."""

    def __init__(self, directory, threads, backend: str = "ort", options: dict | None = None):
        self.directory = directory
        self.threads = threads
        self.backend, self.options = backend, dict(options or {})
        self.seg = None
        self.copies = 1

    def open(self, mode):
        from tmanet.runtime import StreamingSegmenter
        from tmanet.runtime.backends import get_backend
        opts = dict(self.options)
        if self.threads and "threads" in {o.key for o in get_backend(self.backend).options}:
            opts["threads"] = self.threads
        device = "cuda" if "cpu" not in get_backend(self.backend).devices else "cpu"
        self.seg = StreamingSegmenter.open(self.directory, backend=self.backend, device=device, mode=mode,
                                           return_logits=True, max_gap=None, **opts)
        b = self.seg.backend.batch
        self.copies = b if b and b > 1 and mode == "whole" else 1
        return self

    def push(self, frame):
        if self.copies > 1:
            return self.seg.push_batch(np.broadcast_to(frame, (self.copies, *frame.shape)).copy())[0]
        return self.seg.push(frame)

    def close(self):
        if self.seg is not None:
            self.seg.close()


def compare_exports(dir_a, dir_b, frames, labels=None, num: int | None = None, threads: int | None = None,
                    progress: bool = True, backends: tuple = (("ort", {}), ("ort", {}))) -> dict:
    """Stream ``frames`` (a video / image folder / ``.npy`` clip, or a uint8 ``(F, H, W, 3)`` array; the
    first ``num``) through the exports ``dir_a`` (the reference) and ``dir_b``, each on its backend
    (``backends``: ``(name, options)`` for A and B; the same export on two backends is Polygraphy's
    cross-backend check); returns the metrics."""
    from tqdm import tqdm

    ma, mb = load_manifest(dir_a), load_manifest(dir_b)
    check_compatible(ma, mb)
    if num is not None and num < 1:
        raise CompareError(f"the number of frames must be >= 1, got {num}")
    count, frame_iter, source = _frame_iter(frames, num)
    C = ma.num_classes
    H, W = ma.input_size
    label_get = None
    if labels is not None:
        label_count, label_get = open_labels(labels)
        if count is not None and label_count < count:
            raise CompareError(f"{label_count} label maps for {count} frames: labels are matched to frames by "
                               "position, give one per frame (255 = ignore) or fewer frames (--num)")
    equal = total = 0
    per_frame = []
    max_abs = sum_abs = 0.0
    n_logits = 0
    s1 = s2 = 0.0
    conf_a = conf_b = None
    (backend_a, options_a), (backend_b, options_b) = backends
    seg_a, seg_b = _Segmenter(dir_a, threads, backend_a, options_a), _Segmenter(dir_b, threads, backend_b, options_b)
    mode = None
    try:
        for i, frame in enumerate(tqdm(frame_iter, total=count, desc="compare", unit="frame", disable=not progress)):
            frame = np.ascontiguousarray(frame)
            if mode is None:
                fh, fw = frame.shape[:2]
                if fh < H or fw < W:
                    raise CompareError(f"frames are {fh}x{fw} (HxW), smaller than the export size {H}x{W}")
                mode = "whole" if (fh, fw) == (H, W) else "slide"
                seg_a.open(mode)
                seg_b.open(mode)
            ra, rb = seg_a.push(frame), seg_b.push(frame)
            same = int(np.count_nonzero(ra.mask == rb.mask))
            equal += same
            total += ra.mask.size
            per_frame.append(same / ra.mask.size)
            la = ra.logits.astype(np.float64)
            d = np.abs(la - rb.logits)
            max_abs = max(max_abs, float(d.max()))
            sum_abs += float(d.sum())
            n_logits += d.size
            s1 += float(la.sum())
            s2 += float((la * la).sum())
            if label_get is not None:
                if i >= label_count:
                    raise CompareError(f"{label_count} label maps for more frames: give one per frame")
                label = label_get(i)
                if label.shape != ra.mask.shape:
                    raise CompareError(f"label map {i} is {label.shape[0]}x{label.shape[1]}, the frames are "
                                       f"{ra.mask.shape[0]}x{ra.mask.shape[1]}")
                try:
                    ca, cb = confusion_matrix(ra.mask, label, C), confusion_matrix(rb.mask, label, C)
                except ValueError as e:
                    raise CompareError(f"label map {i} holds a value that is not a class id: {e}") from None
                conf_a = ca if conf_a is None else conf_a + ca
                conf_b = cb if conf_b is None else conf_b + cb
    finally:
        seg_a.close()
        seg_b.close()
    if total == 0:
        raise CompareError(f"{source}: no frames")
    mean = s1 / n_logits
    std = float(np.sqrt(max(s2 / n_logits - mean * mean, 0.0)))
    scale = max(std, 1e-12)
    target = target_agreement(mb.precision)
    agreement = equal / total
    differing = [i for i, a in enumerate(per_frame) if a < 1.0]
    result = {
        "a": {"directory": str(dir_a), "precision": ma.precision, "backend": backend_a, "options": options_a},
        "b": {"directory": str(dir_b), "precision": mb.precision, "backend": backend_b, "options": options_b},
        "frames": len(per_frame), "source": source, "mode": mode,
        "pixel_agreement": agreement,
        "worst_frame_agreement": min(per_frame), "worst_frame": int(np.argmin(per_frame)),
        "first_differing_frame": differing[0] if differing else None,
        "logits_max_abs": max_abs, "logits_mean_abs": sum_abs / n_logits, "logits_std": std,
        "logits_max_rel": max_abs / scale, "logits_mean_rel": sum_abs / n_logits / scale,
        "target": target, "passed": None if target is None else agreement >= target,
        "labels": None,
    }
    if conf_a is not None:
        miou_a, iou_a = _miou(conf_a)
        miou_b, iou_b = _miou(conf_b)
        result["labels"] = {"source": str(labels), "frames": len(per_frame), "miou_a": miou_a, "miou_b": miou_b,
                            "iou_a": iou_a, "iou_b": iou_b}
    return result


def format_table(result: dict, verdict: str = "gate") -> str:
    """The comparison as a small text table; its last line, named ``verdict``, says whether B met its target."""
    a, b = result["a"], result["b"]
    def backend(side):
        options = ", ".join(f"{k} {v}" for k, v in (side.get("options") or {}).items())
        return side.get("backend", "ort") + (f" ({options})" if options else "")
    rows = [("", "A", "B"),
            ("export", a["directory"], b["directory"]),
            ("backend", backend(a), backend(b)),
            ("precision", precision_label(a["precision"]), precision_label(b["precision"]))]
    if result["labels"]:
        lab = result["labels"]
        rows.append(("mIoU", f"{100 * lab['miou_a']:.2f} %", f"{100 * lab['miou_b']:.2f} %"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in rows]
    lines.append("")
    lines.append(f"frames               {result['frames']} ({result['mode']}, {result['source']})")
    first = result.get("first_differing_frame")
    lines.append(f"pixel agreement      {100 * result['pixel_agreement']:.4f} %  (worst frame "
                 f"{result['worst_frame']}: {100 * result['worst_frame_agreement']:.4f} %; "
                 + ("masks equal on every frame)" if first is None else f"first frame that differs: {first})"))
    lines.append(f"logits |A-B|         max {result['logits_max_abs']:.4g}, mean {result['logits_mean_abs']:.4g}"
                 f"  (A's logit std {result['logits_std']:.4g}: max {result['logits_max_rel']:.3g}, mean "
                 f"{result['logits_mean_rel']:.3g} of it)")
    if result["target"] is not None:
        label, verdict = verdict, "PASS" if result["passed"] else "FAIL"
        lines.append(f"{label:<20} {verdict}: target >= {100 * result['target']:g} % agreement for "
                     f"{precision_label(b['precision'])}")
    return "\n".join(lines)


def compare_clips(dir_a, dir_b, clips, threads: int | None = None, progress: bool = True,
                  backends: tuple = (("ort", {}), ("ort", {}))) -> dict:
    """The gate over several clips (an iterable of ``(name, frames)``, e.g. :func:`~.gate_clips.unseen_clips`):
    each clip streamed on its own (fresh memory), judged by the **worst** clip's pixel agreement. ``backends``:
    as for :func:`compare_exports`."""
    per_clip = []
    for name, frames in clips:
        r = compare_exports(dir_a, dir_b, frames, threads=threads, progress=progress, backends=backends)
        per_clip.append({"clip": name, "frames": r["frames"], "pixel_agreement": r["pixel_agreement"],
                         "worst_frame_agreement": r["worst_frame_agreement"]})
    if not per_clip:
        raise CompareError("no clips to compare")
    worst = min(per_clip, key=lambda c: c["pixel_agreement"])
    target = r["target"]
    return {"a": r["a"], "b": r["b"], "clips": per_clip, "worst_clip": worst["clip"],
            "worst_clip_agreement": worst["pixel_agreement"], "target": target,
            "passed": None if target is None else worst["pixel_agreement"] >= target}


def compare_unseen_clips(dir_a, dir_b, seeds, threads: int | None = None, progress: bool = True,
                         backends: tuple = (("ort", {}), ("ort", {}))) -> dict:
    """:func:`compare_clips` on the unseen synthetic clips of ``seeds`` (:mod:`.gate_clips`), rendered one at a
    time at ``dir_a``'s export size: the calibrate gate's clips, for any two exports or backends."""
    from .gate_clips import iter_unseen_clips
    size = load_manifest(dir_a).input_size
    log.info("%d unseen synthetic clips at %dx%d (seeds %d..%d), each rendered, then streamed through both sides",
             len(seeds), *size, seeds[0], seeds[-1])
    return compare_clips(dir_a, dir_b, iter_unseen_clips(*size, seeds=seeds), threads=threads, progress=progress,
                         backends=backends)


def format_clips(result: dict) -> str:
    lines = [f"{c['clip']:<24} {100 * c['pixel_agreement']:.3f} %  (worst frame {100 * c['worst_frame_agreement']:.3f} %)"
             for c in result["clips"]]
    verdict = "" if result["target"] is None else (
        f": {'PASS' if result['passed'] else 'FAIL'} (target >= {100 * result['target']:g} %)")
    lines.append(f"worst clip               {100 * result['worst_clip_agreement']:.3f} % ({result['worst_clip']}){verdict}")
    return "\n".join(lines)
