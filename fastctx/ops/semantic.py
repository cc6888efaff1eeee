"""ISNet's per-class semantic pooling. Only the "reference" backend so far."""

from __future__ import annotations

from torch import Tensor

import python_ref
from fastctx import _validate
from fastctx.backends import OpSupport, choose_backend, register_op

register_op("semantic_pool", OpSupport())
register_op("semantic_pool_regions", OpSupport())


def _check(op: str, feats: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    _validate.feats_logits(op, feats, logits)
    return _validate.autocast(feats, logits)


def semantic_pool(feats: Tensor, logits: Tensor, *, backend: str | None = None) -> Tensor:
    """Per image and class: softmax-weighted mean of the features of the pixels of that class.

    Args:
        feats (Tensor): ``[B, C, H, W]``.
        logits (Tensor): ``[B, K, H, W]``; each pixel's class is its argmax (ties: lowest index).
        backend (str | None): see :mod:`fastctx.backends`. Default: None.

    Returns:
        Tensor: ``[B, C, H, W]``: every pixel holds the pooled vector of its class.
    """
    feats, logits = _check("semantic_pool", feats, logits)
    choose_backend("semantic_pool", feats, backend)
    return python_ref.semantic_pool(feats, logits)


def semantic_pool_regions(
    feats: Tensor, logits: Tensor, *, backend: str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The compact form of :func:`semantic_pool`.

    Returns:
        tuple: ``regions [B, C, K]`` (zeros for absent classes), ``counts [B, K]`` (int64 pixel
        counts) and ``labels [B, H, W]`` (int64 class map).
    """
    feats, logits = _check("semantic_pool_regions", feats, logits)
    choose_backend("semantic_pool_regions", feats, backend)
    return python_ref.semantic_pool_regions(feats, logits)
