"""Training and evaluation of segmentation models: ``fastctx train`` / ``fastctx eval``.

* :mod:`fastctx.train.data`: synthetic scenes, Cityscapes and ADE20K folders, mmseg augmentation.
* :mod:`fastctx.train.loop`: SGD + poly schedule, AMP, gradient accumulation, checkpoints and
  bit-for-bit resume, DDP + SyncBatchNorm under torchrun, whole/sliding-window evaluation.
* :mod:`fastctx.train.metrics`: IoU, mIoU, mAcc, aAcc.

Command line::

    fastctx train                                   # the CPU demo: ccnet_r18_d8 on synthetic scenes
    fastctx train --model ocrnet_hr18 --dataset cityscapes --data-root data/cityscapes \
        --scale 2048,1024 --crop 512,1024 --batch-size 2 --iters 80000 --amp fp16 --ohem
    torchrun --nproc-per-node 4 -m fastctx train ...  # DDP + SyncBatchNorm, same arguments
    fastctx train --out RUN --resume                # continue RUN/latest.pth bit for bit
    fastctx eval RUN/latest.pth --mode slide --slide-crop 769 --slide-stride 513

A run writes ``OUT/latest.pth`` (every ``--ckpt-every`` iterations, atomically), ``OUT/log.jsonl``
(one record per iteration: losses, lr, throughput) and ``OUT/metrics.json``.
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
