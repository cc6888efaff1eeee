"""Segmentation metrics as mmseg's IoUMetric: per-class IoU and accuracy, mIoU, mAcc, aAcc."""

from __future__ import annotations

import math

import torch

from fastctx.train.data import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``[K, K]`` int64 counts, rows = ground truth, columns = prediction; ignored pixels dropped.

    Args:
        pred (Tensor): integer class ids, any shape.
        label (Tensor): same shape as ``pred``.
    """
    if pred.shape != label.shape:
        raise ValueError(f"fastctx.train.confusion_matrix: pred {tuple(pred.shape)} and label {tuple(label.shape)} differ")
    keep = label != ignore_index
    lab, prd = label[keep].long(), pred[keep].long()
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
        raise ValueError(f"fastctx.train.confusion_matrix: label ids outside 0..{num_classes - 1}")
    idx = lab * num_classes + prd
    return torch.bincount(idx.cpu(), minlength=num_classes * num_classes).view(num_classes, num_classes)


def summarize(hist: torch.Tensor, class_names: tuple[str, ...] | None = None) -> dict:
    """From a confusion matrix: ``{"aAcc", "mIoU", "mAcc", "IoU": {name: v}, "Acc": {name: v}}``.
    A class absent from both ground truth and predictions has IoU NaN and is left out of the mean
    (mmseg's nanmean); values are fractions in [0, 1]."""
    hist = hist.double()
    inter = hist.diag()
    gt, pr = hist.sum(1), hist.sum(0)
    union = gt + pr - inter
    iou = inter / union  # 0/0 -> nan
    acc = inter / gt
    names = class_names or tuple(str(i) for i in range(hist.shape[0]))

    def mean(v):
        v = v[~torch.isnan(v)]
        return float(v.mean()) if v.numel() else math.nan

    return {
        "aAcc": float(inter.sum() / hist.sum()) if hist.sum() > 0 else math.nan,
        "mIoU": mean(iou),
        "mAcc": mean(acc),
        "IoU": {n: float(v) for n, v in zip(names, iou)},
        "Acc": {n: float(v) for n, v in zip(names, acc)},
    }
