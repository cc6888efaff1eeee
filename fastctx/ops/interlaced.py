"""Interlaced sparse self-attention (ISANet). Only the "reference" backend so far."""

from __future__ import annotations

from torch import Tensor

import python_ref
from fastctx import _validate
from fastctx.backends import OpSupport, choose_backend, register_op

OP = "interlaced_attention"
register_op(OP, OpSupport())


def interlaced_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block: tuple[int, int] = (8, 8),
    mode: str = "long",
    scale: float | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """Dense softmax attention inside the groups of the interlaced pattern.

    Args:
        q (Tensor): ``[B, Cqk, H, W]``; k (Tensor): ``[B, Cqk, H, W]``; v (Tensor): ``[B, Cv, H, W]``.
        block (tuple[int, int]): ``(bh, bw)``, mmseg's ``down_factor``; ``H % bh == 0`` and
            ``W % bw == 0`` are required (the module pads). Default: ``(8, 8)``.
        mode (str): "long" groups positions of equal ``(i % bh, j % bw)``; "short" groups
            contiguous ``bh x bw`` blocks. Default: "long".
        scale (float | None): Default: ``Cqk ** -0.5``.
        backend (str | None): see :mod:`fastctx.backends`. Default: None.

    Returns:
        Tensor: ``[B, Cv, H, W]``.
    """
    _validate.qkv_map(OP, q, k, v)
    if (
        not isinstance(block, (tuple, list))
        or len(block) != 2
        or not all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise ValueError(f"fastctx.{OP}: block must be two positive ints (bh, bw), got {block!r}")
    bh, bw = block
    H, W = q.shape[2], q.shape[3]
    if H % bh or W % bw:
        raise ValueError(
            f"fastctx.{OP}: the map {H}x{W} is not divisible by block {bh}x{bw} "
            f"(H % bh = {H % bh}, W % bw = {W % bw}); pad it (fastctx.nn pads for you)"
        )
    if mode not in ("long", "short"):
        raise ValueError(f"fastctx.{OP}: mode must be 'long' or 'short', got {mode!r}")
    scale = _validate.scale(OP, scale, q.shape[1] ** -0.5)
    _validate.no_nan(OP, q=q, k=k, v=v)
    q, k, v = _validate.autocast(q, k, v)
    choose_backend(OP, q, backend)
    return python_ref.interlaced_attention(q, k, v, (bh, bw), mode, scale)
