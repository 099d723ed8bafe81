"""Segmentation metrics from one confusion matrix accumulated over a whole split (mmsegmentation's way)."""

from __future__ import annotations

import numpy as np

from segcli.vocabulary.labels import IGNORE_INDEX


class ConfusionMatrix:
    """counts[t, p]: pixels of true class t predicted as p. Pixels labelled `ignore_index` never count."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = np.zeros((num_classes, num_classes), np.int64)

    def update(self, truth: np.ndarray, pred: np.ndarray) -> None:
        """truth, pred: [H,W] integer maps of the same shape."""
        if truth.shape != pred.shape:
            raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in shape")
        keep = truth != self.ignore_index
        t = truth[keep].astype(np.int64)
        p = pred[keep].astype(np.int64)
        k = self.num_classes
        self.counts += np.bincount(t * k + p, minlength=k * k).reshape(k, k)

    def merge(self, other: "ConfusionMatrix") -> None:
        self.counts += other.counts

    def iou(self) -> np.ndarray:
        """[K] IoU per class; NaN where a class is neither present nor predicted."""
        inter = np.diag(self.counts).astype(np.float64)
        union = self.counts.sum(0) + self.counts.sum(1) - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, inter / union, np.nan)

    def summary(self, class_names: list[str] | tuple[str, ...] | None = None) -> dict:
        """{"mIoU", "pixAcc", "per_class": {name: IoU or None}, "pixels"} (mIoU: mean over non-NaN classes)."""
        iou = self.iou()
        total = int(self.counts.sum())
        names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        valid = iou[~np.isnan(iou)]
        return {
            "mIoU": float(valid.mean()) if valid.size else 0.0,
            "pixAcc": float(np.diag(self.counts).sum() / total) if total else 0.0,
            "per_class": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)},
            "pixels": total,
        }
