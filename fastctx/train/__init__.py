"""Training and evaluation of segmentation models: ``fastctx train`` / ``fastctx eval``.

* :mod:`fastctx.train.data`: synthetic scenes, Cityscapes and ADE20K folders, mmseg augmentation.
* :mod:`fastctx.train.loop`: SGD + poly schedule, AMP, gradient accumulation, checkpoints and
  bit-for-bit resume, DDP + SyncBatchNorm under torchrun, whole/sliding-window evaluation.
* :mod:`fastctx.train.metrics`: IoU, mIoU, mAcc, aAcc.
"""

from fastctx.train.data import (
    ADE20K,
    IGNORE_INDEX,
    Augment,
    Cityscapes,
    DatasetError,
    EvalTransform,
    SegDataset,
    SyntheticScenes,
    build_dataset,
)
from fastctx.train.loop import (
    CheckpointError,
    TrainConfig,
    evaluate,
    seg_loss,
    slide_inference,
    train,
    whole_inference,
)
from fastctx.train.metrics import confusion_matrix, summarize

__all__ = [
    "ADE20K", "IGNORE_INDEX", "Augment", "Cityscapes", "CheckpointError", "DatasetError", "EvalTransform",
    "SegDataset", "SyntheticScenes", "TrainConfig", "build_dataset", "confusion_matrix", "evaluate",
    "seg_loss", "slide_inference", "summarize", "train", "whole_inference",
]
