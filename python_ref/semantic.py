"""ISNet semantic-level context (ICCV 2021), pure-PyTorch reference.

:func:`semantic_pool` is the literal loop of the original code (sssegmentation
``semanticlevel.py``: a Python loop over images and classes with boolean masks and one host sync
per class); it is the reference of the original behaviour. :func:`semantic_pool_regions` is the
compact, loop-free form of the same computation.
"""

from __future__ import annotations

import torch

from ._common import _compute_dtype, _softmax_or_zero

__all__ = ["semantic_pool", "semantic_pool_regions"]


def semantic_pool(feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Replace every pixel's features by the softmax-weighted mean of its predicted class.

    Per image, each pixel's class is ``argmax`` over K of its logits (ties: the lowest index, as
    ``torch.argmax``). For each class ``c`` present: ``w = softmax of logits[c] over the pixels of
    class c``, ``r_c = sum w * feats`` over those pixels, and every pixel of class ``c`` gets
    ``r_c``. Gradients flow to ``feats`` and, through ``w``, to ``logits`` (not through the
    argmax). The one departure from the original loop: a class whose logits are ``-inf`` at all
    of its pixels gets a region of zeros with zero gradients (the original gives NaN).

    Args:
        feats (torch.Tensor): pixel features, ``[B, C, H, W]`` (NCHW; any strides).
        logits (torch.Tensor): class logits, ``[B, K, H, W]``.

    Returns:
        torch.Tensor: ``pooled``, ``[B, C, H, W]`` (contiguous), in the dtype of ``feats``
        (computed in float32 for float16 / bfloat16 inputs).

    Example:
        >>> pooled = semantic_pool(torch.randn(2, 512, 64, 128), torch.randn(2, 19, 64, 128))
        >>> pooled.shape
        torch.Size([2, 512, 64, 128])
    """
    B, C, H, W = feats.shape
    K = logits.shape[1]
    ct = _compute_dtype(feats, logits)
    x, preds = feats.to(ct), logits.to(ct)
    feats_sl = x.new_zeros(B, H * W, C)
    for b in range(B):
        # (C, H, W), (K, H, W) --> (H * W, C), (H * W, K)
        feats_iter = x[b].reshape(C, -1).permute(1, 0)
        preds_iter = preds[b].reshape(K, -1).permute(1, 0)
        argmax = preds_iter.argmax(1)  # (H * W,)
        for clsid in range(K):
            mask = argmax == clsid
            if mask.sum() == 0:
                continue
            feats_iter_cls = feats_iter[mask]  # (n_c, C)
            preds_iter_cls = preds_iter[:, clsid][mask]  # (n_c,)
            weight = _softmax_or_zero(preds_iter_cls, dim=0)  # F.softmax in the original
            feats_iter_cls = (feats_iter_cls * weight.unsqueeze(-1)).sum(0)  # (C,)
            feats_sl[b][mask] = feats_iter_cls
    feats_sl = feats_sl.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()
    return feats_sl.to(feats.dtype)


def semantic_pool_regions(
    feats: torch.Tensor, logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compact form of :func:`semantic_pool`: one pooled vector per class.

    ``pooled[b, :, i, j] == regions[b, :, labels[b, i, j]]``. Absent classes get a zero region
    and count 0; a present class whose logits are ``-inf`` at all of its pixels gets a zero
    region and zero gradients.

    Args:
        feats (torch.Tensor): pixel features, ``[B, C, H, W]`` (NCHW; any strides).
        logits (torch.Tensor): class logits, ``[B, K, H, W]``.

    Returns:
        tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            ``regions`` ``[B, C, K]`` in the dtype of ``feats`` (computed in float32 for
            float16 / bfloat16 inputs); ``counts`` ``[B, K]`` int64, the pixels per class;
            ``labels`` ``[B, H, W]`` int64, the argmax class map (ties: lowest index).

    Example:
        >>> regions, counts, labels = semantic_pool_regions(
        ...     torch.randn(2, 512, 64, 128), torch.randn(2, 19, 64, 128))
        >>> regions.shape, counts.shape, labels.shape
        (torch.Size([2, 512, 19]), torch.Size([2, 19]), torch.Size([2, 64, 128]))
    """
    B, C, H, W = feats.shape
    K = logits.shape[1]
    ct = _compute_dtype(feats, logits)
    f = feats.to(ct).reshape(B, C, H * W)  # [B, C, N]
    lg = logits.to(ct).reshape(B, K, H * W)  # [B, K, N]
    labels = lg.argmax(1)  # [B, N]
    classes = torch.arange(K, device=logits.device).view(1, K, 1)
    member = labels.unsqueeze(1) == classes  # [B, K, N]
    w = _softmax_or_zero(lg.masked_fill(~member, float("-inf")), dim=-1)  # [B, K, N]
    regions = torch.einsum("bkn,bcn->bck", w, f)  # [B, C, K]
    counts = member.sum(-1)  # [B, K] int64
    return regions.to(feats.dtype), counts, labels.reshape(B, H, W)
