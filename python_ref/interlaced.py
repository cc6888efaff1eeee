"""Interlaced sparse self-attention (ISANet), pure-PyTorch reference.

The grouping is mmseg's ``ISAHead``: ``view`` the map as ``[B, C, H/bh, bh, W/bw, bw]``,
``permute`` the group axes to the front, ``reshape`` to one small map per group, attend densely
inside each group, and invert the permutation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import _compute_dtype

__all__ = ["interlaced_attention"]

_MODES = ("long", "short")


def _to_groups(x: torch.Tensor, bh: int, bw: int, mode: str) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B * G, C, L]``: G groups of L members each."""
    B, C, H, W = x.shape
    gh, gw = H // bh, W // bw
    x = x.reshape(B, C, gh, bh, gw, bw)  # i = I * bh + a, j = J * bw + b
    if mode == "long":  # groups of equal (a, b): [B, bh, bw, C, gh, gw]
        return x.permute(0, 3, 5, 1, 2, 4).reshape(B * bh * bw, C, gh * gw)
    # short: groups of equal (I, J): [B, gh, gw, C, bh, bw]
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B * gh * gw, C, bh * bw)


def _from_groups(y: torch.Tensor, H: int, W: int, bh: int, bw: int, mode: str) -> torch.Tensor:
    """Inverse of :func:`_to_groups`: ``[B * G, C, L]`` -> ``[B, C, H, W]``."""
    C = y.shape[1]
    gh, gw = H // bh, W // bw
    if mode == "long":
        y = y.reshape(-1, bh, bw, C, gh, gw).permute(0, 3, 4, 1, 5, 2)  # [B, C, gh, bh, gw, bw]
    else:
        y = y.reshape(-1, gh, gw, C, bh, bw).permute(0, 3, 1, 4, 2, 5)  # [B, C, gh, bh, gw, bw]
    return y.reshape(-1, C, H, W)


def interlaced_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block: tuple[int, int] = (8, 8),
    mode: str = "long",
    scale: float | None = None,
) -> torch.Tensor:
    """Interlaced sparse self-attention: dense attention inside groups of positions.

    Write ``i = I * bh + a`` and ``j = J * bw + b``. With ``mode="long"`` (mmseg's global
    relation) a group is all positions of equal ``(a, b) = (i % bh, j % bw)``:
    ``(H / bh) * (W / bw)`` members spread over the whole map. With ``mode="short"`` (the local
    relation) a group is all positions of equal ``(I, J)``: a contiguous ``bh x bw`` block.
    Inside each group: ``softmax(scale * q^T k) v``; positions never attend across groups.
    mmseg's zero padding to multiples of ``block`` happens before the projections, outside this
    operator.

    Args:
        q (torch.Tensor): queries, ``[B, Cqk, H, W]`` (NCHW; any strides).
        k (torch.Tensor): keys, ``[B, Cqk, H, W]``.
        v (torch.Tensor): values, ``[B, Cv, H, W]``.
        block (tuple[int, int]): ``(bh, bw)``, mmseg's ``down_factor``; requires
            ``H % bh == 0`` and ``W % bw == 0``. Default: ``(8, 8)``.
        mode (str): ``"long"`` or ``"short"``. Default: ``"long"``.
        scale (float | None): energy scale. Default: ``None`` (``Cqk ** -0.5``).

    Returns:
        torch.Tensor: ``out``, ``[B, Cv, H, W]``, in the dtype of ``q`` (computed in float32 for
        float16 / bfloat16 inputs).

    Example:
        >>> q, k = torch.randn(2, 256, 64, 128), torch.randn(2, 256, 64, 128)
        >>> v = torch.randn(2, 512, 64, 128)
        >>> out = interlaced_attention(q, k, v, block=(8, 8), mode="long")  # global relation
        >>> out = interlaced_attention(q, k, out, block=(8, 8), mode="short")  # local relation
    """
    if mode not in _MODES:
        raise ValueError(f"interlaced_attention: mode must be one of {_MODES}, got {mode!r}")
    B, Cqk, H, W = q.shape
    bh, bw = block
    if H % bh or W % bw:
        raise ValueError(
            f"interlaced_attention: H x W = {H} x {W} is not a multiple of block {bh} x {bw}"
        )
    if scale is None:
        scale = Cqk**-0.5
    ct = _compute_dtype(q, k, v)
    qg = _to_groups(q.to(ct), bh, bw, mode)  # [B * G, Cqk, L]
    kg = _to_groups(k.to(ct), bh, bw, mode)  # [B * G, Cqk, L]
    vg = _to_groups(v.to(ct), bh, bw, mode)  # [B * G, Cv, L]
    a = F.softmax(scale * torch.einsum("gcl,gcm->glm", qg, kg), dim=-1)  # [B * G, L, L]
    out = torch.einsum("glm,gcm->gcl", a, vg)  # [B * G, Cv, L]
    return _from_groups(out, H, W, bh, bw, mode).to(q.dtype)
