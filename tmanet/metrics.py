"""Segmentation metrics, pure numpy: the confusion matrix, IoU / mIoU / accuracies from it, and temporal
consistency (the flip rate) over consecutive frames. Shared by ``tmanet eval``, ``tmanet compare``, the ablation
study and the demo, so every figure the toolkit reports is computed the same way."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# The label value that marks a pixel as unlabelled (mmsegmentation's convention).
IGNORE_INDEX = 255


def confusion_matrix(pred, gt, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """``(C, C)`` int64 counts, rows = ground truth, columns = prediction; ``ignore_index`` pixels of the
    ground truth are left out. Any other ground-truth or predicted value outside ``[0, C)`` is an error
    (a label map in the wrong numbering would otherwise be scored silently)."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    valid = gt != ignore_index
    g = gt[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    for name, a in (("ground truth", g), ("prediction", p)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            bad = np.unique(a[(a < 0) | (a >= num_classes)])[:10].tolist()
            raise ValueError(f"{name} holds class ids {bad} outside 0..{num_classes - 1} "
                             f"(and not the ignore index {ignore_index})")
    return np.bincount(g * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores_from_confusion(cm: np.ndarray, class_names=None) -> dict:
    """Per-class IoU (None for a class absent from both ground truth and predictions), mIoU over the
    classes that are present in either, pixel accuracy and mean class accuracy (over classes in the GT)."""
    cm = np.asarray(cm, np.int64)
    tp = np.diag(cm).astype(np.float64)
    gt_count = cm.sum(1).astype(np.float64)
    pred_count = cm.sum(0).astype(np.float64)
    union = gt_count + pred_count - tp
    total = cm.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt_count > 0, tp / gt_count, np.nan)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(cm))]
    present = union > 0
    return {
        "miou": float(np.mean(iou[present])) if present.any() else None,
        "pixel_accuracy": float(tp.sum() / total) if total else None,
        "mean_accuracy": float(np.nanmean(acc)) if (gt_count > 0).any() else None,
        "per_class": {n: {"iou": None if math.isnan(iou[i]) else float(iou[i]),
                          "accuracy": None if math.isnan(acc[i]) else float(acc[i]),
                          "gt_pixels": int(gt_count[i]), "pred_pixels": int(pred_count[i])}
                      for i, n in enumerate(names)},
        "classes_scored": int(present.sum()),
        "pixels": int(total),
    }


def region_scores(cm: np.ndarray) -> dict:
    """The summary of a confusion matrix restricted to some pixels: ``{miou, pixel_accuracy, pixels}``."""
    s = scores_from_confusion(cm)
    return {"miou": s["miou"], "pixel_accuracy": s["pixel_accuracy"], "pixels": s["pixels"]}


@dataclass
class FlipCounter:
    """Temporal consistency over consecutive frames of a clip: among the pixels whose ground-truth label
    does *not* change from frame t-1 to t (both valid), the fraction whose predicted label does change.
    Flicker that the scene does not explain; lower is better."""
    ignore_index: int = IGNORE_INDEX
    stable: int = 0      # pixels whose GT label stays the same
    flipped: int = 0     # ... of which the prediction changes
    pairs: int = 0
    _prev: tuple | None = field(default=None, repr=False)

    def start_clip(self):
        self._prev = None

    def add(self, pred, gt):
        """The next frame of the current clip (call :meth:`start_clip` between clips)."""
        pred, gt = np.asarray(pred), np.asarray(gt)
        if self._prev is not None:
            p0, g0 = self._prev
            if p0.shape != pred.shape:
                raise ValueError(f"frame size changed within a clip: {p0.shape} -> {pred.shape}")
            stable = (g0 == gt) & (gt != self.ignore_index)
            self.stable += int(stable.sum())
            self.flipped += int((stable & (p0 != pred)).sum())
            self.pairs += 1
        self._prev = (pred, gt)

    @property
    def flip_rate(self) -> float | None:
        return self.flipped / self.stable if self.stable else None

    def result(self) -> dict:
        rate = self.flip_rate
        return {"flip_rate": rate, "temporal_consistency": None if rate is None else 1.0 - rate,
                "frame_pairs": self.pairs, "stable_pixels": self.stable}


def temporal_flip_rate(preds, gts, ignore_index: int = IGNORE_INDEX) -> float | None:
    """:class:`FlipCounter` over one clip given as sequences of (H, W) maps."""
    counter = FlipCounter(ignore_index)
    for p, g in zip(preds, gts, strict=True):
        counter.add(p, g)
    return counter.flip_rate
