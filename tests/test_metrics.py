"""Confusion-matrix metrics against a direct computation on hand-made masks."""

from __future__ import annotations

import numpy as np

from segcli.evaluation.metrics import ConfusionMatrix


def test_metrics_match_direct_computation_over_the_whole_split():
    truth_a = np.array([[0, 0, 1], [1, 2, 255]], np.uint8)
    pred_a = np.array([[0, 1, 1], [1, 2, 0]], np.uint8)
    truth_b = np.array([[2, 2], [2, 0]], np.uint8)
    pred_b = np.array([[2, 0], [2, 0]], np.uint8)
    cm = ConfusionMatrix(4)
    cm.update(truth_a, pred_a)
    cm.update(truth_b, pred_b)
    summary = cm.summary(["a", "b", "c", "d"])
    # by hand over both images (the 255 pixel ignored): 9 pixels
    # class 0: truth at 3 px, predicted at 3 px (one of them truth 2), correct 2 -> IoU 2/4
    # class 1: truth 2, predicted 3, correct 2 -> 2/3;  class 2: truth 4, predicted 3, correct 3 -> 3/4
    # class 3: never present nor predicted -> excluded from the mean
    assert summary["per_class"] == {"a": 2 / 4, "b": 2 / 3, "c": 3 / 4, "d": None}
    assert np.isclose(summary["mIoU"], (2 / 4 + 2 / 3 + 3 / 4) / 3)
    assert np.isclose(summary["pixAcc"], 7 / 9) and summary["pixels"] == 9
    # not the mean of per-image mIoUs
    per_image = []
    for t, p in ((truth_a, pred_a), (truth_b, pred_b)):
        one = ConfusionMatrix(4)
        one.update(t, p)
        per_image.append(one.summary()["mIoU"])
    assert not np.isclose(np.mean(per_image), summary["mIoU"])


def test_a_class_predicted_but_absent_counts_as_zero():
    cm = ConfusionMatrix(3)
    cm.update(np.array([[0, 0]]), np.array([[0, 2]]))
    summary = cm.summary()
    assert summary["per_class"] == {"0": 0.5, "1": None, "2": 0.0}
    assert np.isclose(summary["mIoU"], 0.25)
