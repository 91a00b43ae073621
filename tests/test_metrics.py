"""The segmentation metrics (tmanet.metrics) on hand-made arrays with counts worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from tmanet.metrics import FlipCounter, confusion_matrix, scores_from_confusion, temporal_flip_rate


def test_confusion_matrix_known_counts():
    gt = np.array([[0, 0, 1, 1, 255], [2, 2, 2, 1, 255]])
    pred = np.array([[0, 1, 1, 1, 3], [2, 0, 2, 1, 1]])
    cm = confusion_matrix(pred, gt, 4)
    expected = np.zeros((4, 4), np.int64)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[1, 1] = 3
    expected[2, 2] = 2
    expected[2, 0] = 1
    np.testing.assert_array_equal(cm, expected)   # the two 255 pixels are not counted, whatever predicted
    assert cm.sum() == 8


def test_confusion_matrix_rejects_foreign_ids():
    with pytest.raises(ValueError, match=r"ground truth holds class ids \[7\]"):
        confusion_matrix(np.zeros((2, 2)), np.array([[0, 7], [1, 255]]), 4)
    with pytest.raises(ValueError, match=r"prediction holds class ids \[4\]"):
        confusion_matrix(np.array([[0, 4]]), np.array([[0, 1]]), 4)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 4)


def test_scores_iou_miou_accuracy():
    gt = np.array([0, 0, 1, 1, 255])
    pred = np.array([0, 1, 1, 1, 3])
    s = scores_from_confusion(confusion_matrix(pred, gt, 4), ["a", "b", "c", "d"])
    pc = s["per_class"]
    assert pc["a"]["iou"] == pytest.approx(1 / 2)      # tp 1, gt 2, pred 1
    assert pc["b"]["iou"] == pytest.approx(2 / 3)      # tp 2, gt 2, pred 3
    assert pc["c"]["iou"] is None and pc["d"]["iou"] is None  # absent from GT and predictions (255 ignored)
    assert s["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert s["pixel_accuracy"] == pytest.approx(3 / 4)
    assert s["mean_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    assert s["classes_scored"] == 2 and s["pixels"] == 4
    # a class predicted but absent from the GT counts, with IoU 0
    s = scores_from_confusion(confusion_matrix(np.array([0, 2]), np.array([0, 0]), 3))
    assert s["per_class"]["2"]["iou"] == 0.0 and s["per_class"]["1"]["iou"] is None
    assert s["miou"] == pytest.approx((0.5 + 0.0) / 2)
    empty = scores_from_confusion(np.zeros((3, 3), np.int64))
    assert empty["miou"] is None and empty["pixel_accuracy"] is None


def test_temporal_flip_rate_hand_made():
    gts = [np.array([[0, 0], [1, 1]]), np.array([[0, 0], [1, 2]]), np.array([[0, 255], [1, 2]])]
    preds = [np.array([[0, 0], [1, 1]]), np.array([[0, 1], [1, 1]]), np.array([[1, 1], [1, 2]])]
    # pair 0->1: GT stable at 3 pixels, prediction flips at 1 of them ((0,1)); the (1,1) change follows the GT
    # pair 1->2: GT stable at 3 pixels ((0,1) becomes ignore), prediction flips at (0,0) and (1,1)
    assert temporal_flip_rate(preds, gts) == pytest.approx(3 / 6)
    counter = FlipCounter()
    for p, g in zip(preds, gts):
        counter.add(p, g)
    counter.start_clip()            # a new clip: no pair across the boundary
    counter.add(preds[0], gts[2])
    r = counter.result()
    assert r == {"flip_rate": 0.5, "temporal_consistency": 0.5, "frame_pairs": 2, "stable_pixels": 6}
    assert temporal_flip_rate([preds[0]], [gts[0]]) is None  # one frame: no pair
    static = [np.ones((3, 3), np.uint8)] * 4
    assert temporal_flip_rate(static, static) == 0.0
