"""OCR (OCRNet, ECCV 2020): spatial gather and region attention, pure-PyTorch reference."""

from __future__ import annotations

import torch

from ._common import _compute_dtype, _softmax_or_zero

__all__ = ["spatial_gather", "region_attention"]

def spatial_gather(feats: torch.Tensor, logits: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """OCR's spatial gather: one soft-pooled region vector per class.

    For each class ``k``: ``w = softmax over the N = H * W pixels of scale * logits[:, k]``,
    ``regions[:, :, k] = sum_n w[n] * feats[:, :, n]``. The softmax runs over PIXELS, not over
    classes. A class whose logits are all ``-inf`` gets a region of zeros (not NaN) and zero
    gradients. mmseg's ``SpatialGatherModule`` returns the same tensor as ``[B, C, K, 1]``.

    Args:
        feats (torch.Tensor): pixel features, ``[B, C, H, W]`` (NCHW; any strides).
        logits (torch.Tensor): raw class logits of the auxiliary head, ``[B, K, H, W]``;
            ``-inf`` allowed.
        scale (float): multiplies the logits before the softmax; must be positive.
            Default: ``1.0``.

    Returns:
        torch.Tensor: ``regions``, ``[B, C, K]``, in the dtype of ``feats`` (computed in float32
        for float16 / bfloat16 inputs).

    Example:
        >>> regions = spatial_gather(torch.randn(2, 512, 64, 128), torch.randn(2, 19, 64, 128))
        >>> regions.shape
        torch.Size([2, 512, 19])
    """
    ct = _compute_dtype(feats, logits)
    f = feats.to(ct).flatten(2)  # [B, C, N]
    w = _softmax_or_zero(scale * logits.to(ct).flatten(2), dim=-1)  # [B, K, N]
    regions = torch.einsum("bkn,bcn->bck", w, f)  # [B, C, K]
    return regions.to(feats.dtype)


def region_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of every pixel over a small set of S keys (OCR's object attention).

    ``e[b, n, s] = scale * <q[b, :, n], k[b, :, s]> + bias[b, s]``, ``a = softmax over s``,
    ``out[b, :, n] = sum_s a[b, n, s] * v[b, :, s]``. A query whose energies are all ``-inf``
    (e.g. ``bias[b]`` all ``-inf``) gets zeros, not NaN, and zero gradients.

    Args:
        q (torch.Tensor): pixel queries, ``[B, Cqk, H, W]`` (NCHW; any strides).
        k (torch.Tensor): region keys, ``[B, Cqk, S]``.
        v (torch.Tensor): region values, ``[B, Cv, S]``.
        scale (float | None): energy scale. Default: ``None`` (``Cqk ** -0.5``).
        bias (torch.Tensor | None): additive logit bias, ``[B, S]``; ``-inf`` marks an absent
            key (e.g. ``log(counts)`` for ISNet's reduced semantic-level attention).
            Default: ``None``.

    Returns:
        torch.Tensor: ``out``, ``[B, Cv, H, W]``, in the dtype of ``q`` (computed in float32 for
        float16 / bfloat16 inputs).

    Example:
        >>> q = torch.randn(2, 256, 64, 128)
        >>> k, v = torch.randn(2, 256, 19), torch.randn(2, 256, 19)
        >>> region_attention(q, k, v).shape
        torch.Size([2, 256, 64, 128])
    """
    B, Cqk, H, W = q.shape
    Cv = v.shape[1]
    if scale is None:
        scale = Cqk**-0.5
    tensors = (q, k, v) if bias is None else (q, k, v, bias)
    ct = _compute_dtype(*tensors)
    qf = q.to(ct).reshape(B, Cqk, H * W)  # [B, Cqk, N]
    e = scale * torch.einsum("bcn,bcs->bns", qf, k.to(ct))  # [B, N, S]
    if bias is not None:
        e = e + bias.to(ct).unsqueeze(1)
    a = _softmax_or_zero(e, dim=-1)  # [B, N, S]
    out = torch.einsum("bns,bcs->bcn", a, v.to(ct))  # [B, Cv, N]
    return out.reshape(B, Cv, H, W).to(q.dtype)
