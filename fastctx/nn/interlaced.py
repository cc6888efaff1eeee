"""ISANet's interlaced sparse self-attention block, with mmsegmentation's parameter layout."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastctx.nn._common import bare
from fastctx.nn._conv import BN, RELU, ConvModule
from fastctx.ops.interlaced import interlaced_attention

__all__ = ["ISASelfAttentionBlock", "InterlacedSparseAttention", "interlaced_sparse_context"]

def _to_groups(x: Tensor, bh: int, bw: int, mode: str) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, G, C, L]``: G groups of L members (the interlaced pattern)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // bh, bh, W // bw, bw)
    if mode == "long":  # groups of equal (i % bh, j % bw)
        return x.permute(0, 3, 5, 1, 2, 4).reshape(B, bh * bw, C, -1)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // bh) * (W // bw), C, -1)  # bh x bw blocks


def _from_groups(y: Tensor, H: int, W: int, bh: int, bw: int, mode: str) -> Tensor:
    """Inverse of :func:`_to_groups`."""
    B, _, C, _ = y.shape
    gh, gw = H // bh, W // bw
    if mode == "long":
        y = y.reshape(B, bh, bw, C, gh, gw).permute(0, 3, 4, 1, 5, 2)
    else:
        y = y.reshape(B, gh, gw, C, bh, bw).permute(0, 3, 1, 4, 2, 5)
    return y.reshape(B, C, H, W)


def masked_interlaced_attention(
    q: Tensor, k: Tensor, v: Tensor, valid: Tensor, block: tuple[int, int], mode: str, scale: float
) -> Tensor:
    """Interlaced attention in which only positions with ``valid`` true are keys (plain PyTorch).

    ``fastctx.interlaced_attention`` has no mask, so ``mask_padding=True`` runs this path.
    A query whose group holds no valid key (a group made only of padding) gets a zero output.

    Args:
        q, k (Tensor): ``[B, Cqk, H, W]``; v (Tensor): ``[B, Cv, H, W]``.
        valid (Tensor): bool ``[H, W]``.
        block, mode, scale: as :func:`fastctx.interlaced_attention`.

    Returns:
        Tensor: ``[B, Cv, H, W]``, in the dtype of ``q`` (float32 math for half inputs).
    """
    bh, bw = block
    H, W = q.shape[2:]
    ct = torch.promote_types(q.dtype, torch.float32)
    qg, kg, vg = (_to_groups(t.to(ct), bh, bw, mode) for t in (q, k, v))  # [B, G, C, L]
    ok = _to_groups(valid[None, None], bh, bw, mode)[0, :, 0]  # [G, L]
    has_key = ok.any(dim=-1)  # [G]
    bias = torch.zeros(ok.shape, dtype=ct, device=q.device).masked_fill(~ok, float("-inf"))
    bias = torch.where(has_key[:, None], bias, torch.zeros_like(bias))  # all-padding groups
    e = scale * torch.einsum("bgcl,bgcm->bglm", qg, kg) + bias[None, :, None, :]
    a = F.softmax(e, dim=-1) * has_key[None, :, None, None].to(ct)  # [B, G, L, L]
    out = torch.einsum("bglm,bgcm->bgcl", a, vg)
    return _from_groups(out, H, W, bh, bw, mode).to(q.dtype)


class ISASelfAttentionBlock(nn.Module):
    """One relation of mmseg's ISAHead (``isa_head.SelfAttentionBlock``), same submodules.

    ``key_project`` / ``query_project``: 2 x ConvModule(1x1) to ``channels``;
    ``value_project``: plain 1x1 conv to ``in_channels``; no ``out_project``
    (``with_out=False``); ``output_project``: ConvModule(1x1) ``in_channels -> in_channels``.
    The projections are pointwise, so they run once on the unpermuted map and the attention
    follows the group pattern (mmseg permutes the map into groups first; same result).
    Called with the map alone (``block=None``) it attends over the whole map, one group, as
    mmseg's and sssegmentation's relation blocks do with the permuted groups they are given.

    Args:
        in_channels (int): channels of the feature map (mmseg's ``channels``).
        channels (int): query/key channels (mmseg's ``isa_channels``).
        conv_cfg, norm_cfg, act_cfg (dict | None): as mmcv's ``ConvModule``.
        backend (str | None): of :func:`fastctx.interlaced_attention` when ``forward`` is given
            none. Default: None.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        conv_cfg: Mapping | None = None,
        norm_cfg: Mapping | None = BN,
        act_cfg: Mapping | None = RELU,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.backend = backend

        def project(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                ConvModule(cin, cout, 1, conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg),
                ConvModule(cout, cout, 1, conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg),
            )

        self.key_project = project(in_channels, channels)
        self.query_project = project(in_channels, channels)
        self.value_project = nn.Conv2d(in_channels, in_channels, 1)
        self.output_project = ConvModule(
            in_channels, in_channels, 1, conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg
        )

    @classmethod
    def from_modules(
        cls,
        key_project: nn.Module,
        query_project: nn.Module,
        value_project: nn.Module,
        output_project: nn.Module,
        channels: int,
        *,
        backend: str | None = None,
    ) -> ISASelfAttentionBlock:
        """An ISASelfAttentionBlock around existing projections (the SAME modules, so the same
        ``Parameter`` and buffer objects, run by their own forward): :func:`fastctx.swap` builds
        one from each relation of an mmseg ``ISAHead`` or an sssegmentation ``ISANet``. The
        projections must be pointwise, with ``query_project`` / ``key_project`` mapping to
        ``channels`` (the caller verifies it)."""
        block = bare(cls)
        block.channels = channels
        block.backend = backend
        block.key_project = key_project
        block.query_project = query_project
        block.value_project = value_project
        block.output_project = output_project
        return block

    def forward(
        self,
        x: Tensor,
        block: tuple[int, int] | None = None,
        mode: str = "short",
        valid: Tensor | None = None,
        backend: str | None = None,
    ) -> Tensor:
        """``x``: ``[B, C, H, W]`` with ``H``, ``W`` multiples of ``block`` (None: one group, the
        whole map); ``valid``: bool ``[H, W]`` to mask keys (plain-PyTorch path), or None (the
        fastctx op); ``backend``: None uses ``self.backend``."""
        if block is None:
            block, mode = (x.shape[2], x.shape[3]), "short"
        if backend is None:
            backend = self.backend
        q, k, v = self.query_project(x), self.key_project(x), self.value_project(x)
        scale = self.channels**-0.5  # mmseg: matmul_norm=True
        if valid is None:
            context = interlaced_attention(q, k, v, block, mode, scale, backend=backend)
        else:
            context = masked_interlaced_attention(q, k, v, valid, block, mode, scale)
        return self.output_project(context)


class InterlacedSparseAttention(nn.Module):
    """Interlaced sparse self-attention, as mmseg's ``ISAHead`` runs it between ``in_conv``
    and ``out_conv``.

    Zero-pad ``x`` to multiples of ``down_factor`` (``pad // 2`` top/left, the rest
    bottom/right), run ``global_relation`` (long-range groups: equal ``(i % bh, j % bw)``),
    then ``local_relation`` (``bh x bw`` blocks), crop. Submodule names and state-dict keys are
    ISAHead's (``global_relation.*``, ``local_relation.*``), so those keys of an mmseg
    checkpoint (without the ``decode_head.`` prefix) load unchanged.

    As in mmseg, the padded positions go through the projections (after conv+BN+ReLU they are
    ordinary non-zero keys and values, and in training they enter the BN statistics).
    ``mask_padding=True`` is a DIFFERENT semantics: padded positions are not keys in either
    relation (they still pass through the projections and their BN statistics; their outputs
    are cropped), so in eval mode the output at real pixels does not depend on the padding.
    The fastctx op has no mask: when padding is needed, ``mask_padding=True`` runs
    :func:`masked_interlaced_attention`, a plain-PyTorch path (so ``backend`` must then be
    None or "reference").

    Args:
        channels (int): ``C`` (mmseg's ``channels``, 512 in its configs).
        isa_channels (int): query/key channels (256 in mmseg's configs).
        down_factor (tuple[int, int]): ``(bh, bw)``. Default: ``(8, 8)``.
        conv_cfg (dict | None): Default: None.
        norm_cfg (dict | None): mmcv norm config. Default: ``dict(type='BN')``.
        act_cfg (dict | None): mmcv activation config. Default: ``dict(type='ReLU')``.
        mask_padding (bool): see above. Default: False (mmseg's behaviour).
        backend (str | None): passed to :func:`fastctx.interlaced_attention`. Default: None.

    Shape:
        ``[B, C, H, W] -> [B, C, H, W]`` (NCHW), any ``H``, ``W``.

    Example::

        >>> isa = fastctx.nn.InterlacedSparseAttention(64, 32).eval()
        >>> isa(torch.randn(2, 64, 97, 97)).shape
        torch.Size([2, 64, 97, 97])
    """

    def __init__(
        self,
        channels: int,
        isa_channels: int,
        down_factor: tuple[int, int] = (8, 8),
        conv_cfg: Mapping | None = None,
        norm_cfg: Mapping | None = BN,
        act_cfg: Mapping | None = RELU,
        *,
        mask_padding: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        where = "fastctx.nn.InterlacedSparseAttention"
        if (
            not isinstance(down_factor, (tuple, list))
            or len(down_factor) != 2
            or not all(isinstance(d, int) and d > 0 for d in down_factor)
        ):
            raise ValueError(f"{where}: down_factor must be two positive ints, got {down_factor!r}")
        if mask_padding and backend not in (None, "reference"):
            raise ValueError(
                f"{where}: mask_padding=True runs a plain-PyTorch masked path when padding is "
                f"needed (the interlaced_attention op has no mask), so backend must be None or "
                f"'reference', got {backend!r}"
            )
        self.channels = channels
        self.down_factor = tuple(down_factor)
        self.mask_padding = mask_padding
        self.backend = backend
        self.global_relation = ISASelfAttentionBlock(channels, isa_channels, conv_cfg, norm_cfg, act_cfg)
        self.local_relation = ISASelfAttentionBlock(channels, isa_channels, conv_cfg, norm_cfg, act_cfg)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"fastctx.nn.InterlacedSparseAttention: x must be [B, {self.channels}, H, W], got {shape}"
            )
        return interlaced_sparse_context(
            x, self.global_relation, self.local_relation, self.down_factor, self.mask_padding, self.backend
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, down_factor={self.down_factor}, "
            f"mask_padding={self.mask_padding}, backend={self.backend!r}"
        )


def interlaced_sparse_context(
    x: Tensor,
    global_relation: ISASelfAttentionBlock,
    local_relation: ISASelfAttentionBlock,
    down_factor: tuple[int, int],
    mask_padding: bool = False,
    backend: str | None = None,
) -> Tensor:
    """mmseg ``ISAHead.forward`` between ``in_conv`` and ``out_conv``: pad ``x`` to multiples of
    ``down_factor``, run ``global_relation`` on the long-range groups and ``local_relation`` on
    the blocks, crop (:class:`InterlacedSparseAttention` runs this; so does the head
    :func:`fastctx.swap` makes of an mmseg ``ISAHead``)."""
    h, w = x.shape[2:]
    bh, bw = down_factor
    pad_h, pad_w = math.ceil(h / bh) * bh - h, math.ceil(w / bw) * bw - w
    top, left = pad_h // 2, pad_w // 2
    valid = None
    if pad_h or pad_w:
        x = F.pad(x, (left, pad_w - left, top, pad_h - top))
        if mask_padding:
            valid = torch.zeros(x.shape[2:], dtype=torch.bool, device=x.device)
            valid[top : top + h, left : left + w] = True
    x = global_relation(x, (bh, bw), "long", valid, backend)
    x = local_relation(x, (bh, bw), "short", valid, backend)
    if pad_h or pad_w:
        x = x[:, :, top : top + h, left : left + w]
    return x
