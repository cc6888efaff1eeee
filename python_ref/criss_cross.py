"""Criss-cross attention (CCNet), pure-PyTorch reference: mmcv's einsum formulation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import _compute_dtype

__all__ = ["criss_cross_attention"]


def criss_cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Criss-cross attention: each pixel attends to its row and its column.

    Pixel ``(i, j)`` attends to the ``H + W - 1`` positions of its criss-cross: its column
    ``(i', j)`` with ``i' != i`` and its row ``(i, j')`` for all ``j'`` (itself once, through the
    row). ``e = scale * <q[:, i, j], k[:, pos]>``, one softmax over all ``H + W - 1`` energies,
    ``out[:, i, j] = sum_pos a[pos] * v[:, pos]``. This is mmcv's einsum version
    (``mmcv/ops/cc_attention.py``): the column energies with the diagonal set to ``-inf``, the
    row energies, one softmax over their concatenation, two einsums for the output.

    Args:
        q (torch.Tensor): queries, ``[B, Cqk, H, W]`` (NCHW; any strides).
        k (torch.Tensor): keys, ``[B, Cqk, H, W]``.
        v (torch.Tensor): values, ``[B, Cv, H, W]``; ``Cv`` may differ from ``Cqk``
            (CCNet: 64 vs 512).
        scale (float): energy scale; CCNet uses no ``1 / sqrt(d)`` scaling. Default: ``1.0``.

    Returns:
        torch.Tensor: ``out``, ``[B, Cv, H, W]``, in the dtype of ``q`` (computed in float32 for
        float16 / bfloat16 inputs).

    Example:
        >>> q, k = torch.randn(2, 64, 97, 97), torch.randn(2, 64, 97, 97)
        >>> v = torch.randn(2, 512, 97, 97)
        >>> criss_cross_attention(q, k, v).shape
        torch.Size([2, 512, 97, 97])
    """
    H = q.shape[2]
    ct = _compute_dtype(q, k, v)
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    # Column energies: query (h, w) against key (i, w).
    e_col = scale * torch.einsum("bchw,bciw->bhwi", qf, kf)  # [B, H, W, H]
    diag = torch.eye(H, dtype=torch.bool, device=q.device).unsqueeze(1)  # [H, 1, H]: i == h
    e_col = e_col.masked_fill(diag, float("-inf"))
    # Row energies: query (h, w) against key (h, j).
    e_row = scale * torch.einsum("bchw,bchj->bhwj", qf, kf)  # [B, H, W, W]
    # The own pixel is in the row, so every softmax row has a finite entry: no NaN.
    a = F.softmax(torch.cat([e_col, e_row], dim=-1), dim=-1)  # [B, H, W, H + W]
    out = torch.einsum("bciw,bhwi->bchw", vf, a[..., :H])
    out = out + torch.einsum("bchj,bhwj->bchw", vf, a[..., H:])
    return out.to(q.dtype)
