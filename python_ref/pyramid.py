"""Asymmetric pyramid non-local attention (ANN: APNB / AFNB), pure-PyTorch reference."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ._common import _compute_dtype
from .ocr import region_attention

__all__ = ["pyramid_pool", "pyramid_attention"]


def _pool(x: torch.Tensor, pool_scales: Sequence[int]) -> torch.Tensor:
    """:func:`pyramid_pool` without the dtype handling."""
    return torch.cat([F.adaptive_avg_pool2d(x, s).flatten(2) for s in pool_scales], dim=2)


def pyramid_pool(x: torch.Tensor, pool_scales: Sequence[int] = (1, 3, 6, 8)) -> torch.Tensor:
    """Pyramid of adaptive average pools, flattened and concatenated.

    At each scale ``s``, bin ``(p, r)`` averages rows ``floor(p * H / s)`` to
    ``ceil((p + 1) * H / s)`` (exclusive) and the same for columns (``adaptive_avg_pool2d``;
    bins overlap when ``H % s != 0``), flattened row-major. Scales are concatenated in the order
    of ``pool_scales``: ``S = sum(s * s)`` (110 for the default scales).

    Args:
        x (torch.Tensor): ``[B, C, H, W]`` (NCHW; any strides).
        pool_scales (Sequence[int]): output sizes of the pools. Default: ``(1, 3, 6, 8)``.

    Returns:
        torch.Tensor: ``[B, C, S]``, in the dtype of ``x`` (computed in float32 for float16 /
        bfloat16 inputs).

    Example:
        >>> pyramid_pool(torch.randn(2, 256, 64, 128)).shape
        torch.Size([2, 256, 110])
    """
    return _pool(x.to(_compute_dtype(x)), pool_scales).to(x.dtype)


def pyramid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pool_scales: Sequence[int] = (1, 3, 6, 8),
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of every query pixel over the pyramid-pooled keys and values (ANN).

    ``K = pyramid_pool(k)``, ``V = pyramid_pool(v)`` (``[B, C, S]``), then
    ``out = softmax(scale * q^T K) V`` with the softmax over the ``S`` pooled keys.

    Args:
        q (torch.Tensor): queries, ``[B, Cqk, Hq, Wq]`` (NCHW; any strides).
        k (torch.Tensor): keys before pooling, ``[B, Cqk, H, W]``.
        v (torch.Tensor): values before pooling, ``[B, Cv, H, W]``.
        pool_scales (Sequence[int]): see :func:`pyramid_pool`. Default: ``(1, 3, 6, 8)``.
        scale (float | None): energy scale. Default: ``None`` (``Cqk ** -0.5``).

    Returns:
        torch.Tensor: ``out``, ``[B, Cv, Hq, Wq]``, in the dtype of ``q`` (computed in float32
        for float16 / bfloat16 inputs).

    Example:
        >>> q, k = torch.randn(2, 256, 64, 128), torch.randn(2, 256, 64, 128)
        >>> v = torch.randn(2, 512, 64, 128)
        >>> pyramid_attention(q, k, v).shape
        torch.Size([2, 512, 64, 128])
    """
    ct = _compute_dtype(q, k, v)
    kp = _pool(k.to(ct), pool_scales)  # [B, Cqk, S]
    vp = _pool(v.to(ct), pool_scales)  # [B, Cv, S]
    return region_attention(q.to(ct), kp, vp, scale=scale).to(q.dtype)
