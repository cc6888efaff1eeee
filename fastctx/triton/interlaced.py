"""Interlaced sparse self-attention (ISANet) in Triton: the line-attention kernels
(:mod:`fastctx.triton._line`) over the groups of the interlaced pattern.

Contract (OPERATORS.md section 2): write ``i = I * bh + a``, ``j = J * bw + b``; "long" mode groups
the positions of equal ``(a, b)`` (``L = (H / bh) * (W / bw)`` members, ``G = bh * bw`` groups),
"short" mode the contiguous ``bh x bw`` blocks (``L = bh * bw``, ``G = (H / bh) * (W / bw)``).
Dense softmax attention inside each group, ``lse`` its logsumexp.

No permuted copies: a group is a line of the kernels with a two-level geometry (:func:`_geometry`):
group g has its origin at row ``(g // GW) * G_SH``, column ``(g % GW) * G_SW``, and member m sits
``(m // MW) * M_SH`` rows and ``(m % MW) * M_SW`` columns from it (long: GW = bw, G_S* = 1,
MW = W / bw, M_S* = (bh, bw); short: GW = W / bw, G_S* = (bh, bw), MW = bw, M_S* = 1); the
kernels read q, k, v and dout through their strides, channels-last copies of them by default
(``channels_last=True``, :func:`fastctx.triton._line.channels_last`). Outputs are allocated
NCHW-contiguous.
A key is only ever attended by its own group, so one pass writes the final gradients (no
partial sums, no atomics). The backward is the engine's scratch form (:func:`_config`): each
group's [L, L] weights and their gradient are stored once and dv, dk, dq are products with them.

16-bit inputs feed ``tl.dot`` directly, accumulation in float32; float32 uses "tf32x3"
(_common.F32_DOT); float64 inputs (a verification path) accumulate in float64 with "ieee" dots
and the delta computed by torch (the shared delta kernel accumulates in float32).
"""

from __future__ import annotations

import functools

import torch

from fastctx._validate import acc_dtype
from fastctx.triton import _line
from fastctx.triton._common import bwd_delta, check_extent

_OP = "fastctx.interlaced_attention"


def _geometry(H: int, W: int, bh: int, bw: int, long_mode: bool) -> tuple[int, ...]:
    """(G, L, GW, G_SH, G_SW, MW, M_SH, M_SW): the groups per sample, their size and the affine
    pattern of the module docstring."""
    gh, gw = H // bh, W // bw
    if long_mode:  # group (a, b) at row a, column b; member (I, J) at I * bh, J * bw from it
        return (bh * bw, gh * gw, bw, 1, 1, gw, bh, bw)
    # short: group (I, J) at row I * bh, column J * bw; member (a, b) at a, b from it
    return (gh * gw, bh * bw, gw, bh, bw, bw, 1, 1)


@functools.lru_cache(maxsize=256)
def _config(L: int, Cqk: int, Cv: int, dtype: torch.dtype) -> dict:
    """Block sizes per kernel for groups of L members (tl.dot needs every dim >= 16, so small
    groups pad to 16): "fwd", and the scratch backward of :func:`fastctx.triton._line.bwd`: "dq"
    (scores and <dout, v> once per group, p and dE stored; dq there too when Cqk fits one block)
    and "mm" (dv, dk, and dq otherwise, as products with the stored p and dE). ISANet's groups
    are short (64-169 members), so the two [L, L] matrices per group are small (B * G * L * L
    elements each, 4-15 MB together at ISANet's sizes in float16) while the channels are wide
    (Cqk 256, Cv 512): recomputing the scores per kernel and channel chunk, as the
    FlashAttention-style backward does, cost 4-16 recomputations here (H200, session 11:
    forward+backward 2.7-5.3x slower, bench/results/h200-session11). Groups too long for the
    scratch (:func:`fastctx.triton._line.scratch_fits`) take the recomputing "dq" and "dkdv"
    kernels, Cqk in one block up to 256 (1.8x faster than chunks of 64 at ISANet's 64x128 long,
    float16, same run). float32 keeps 32 x 32 tiles and channel chunks of 64 ("tf32x3" dots
    spill with more); float64 (the verification path): 32 x 32 tiles, all channels in one block.
    A "fwd_mm" config (:func:`_line.mm_blocks`) would switch the forward to the engine's scratch
    form (scores once, then softmax @ v): tested, not yet timed on a GPU, so not a default.
    Cached per shape (callers must not modify it).
    """
    blocks = functools.partial(_line.blocks, L, Cqk, Cv)
    mm = functools.partial(_line.mm_blocks, L)
    scratch = _line.scratch_fits(L, Cv)
    if dtype == torch.float64:  # all channels in one block
        one = blocks(32, 32, 1 << 30, 4, cqk_max=Cqk)
        return {"fwd": one, "dq": one, **({"mm": mm(32, 32, 32, 4)} if scratch else {"dkdv": one})}
    if dtype == torch.float32:
        f32 = functools.partial(blocks, cqk_max=64, cqk_chunk=64)
        if scratch:
            return {"fwd": f32(32, 32, 64, 4), "dq": f32(32, 32, 64, 4), "mm": mm(32, 32, 64, 4)}
        rec = blocks(32, 32, 32, 4, cqk_max=64, cqk_chunk=32)
        return {"fwd": f32(32, 32, 64, 4), "dq": rec, "dkdv": rec}
    if scratch:
        return {"fwd": blocks(64, 64, 128, 4), "dq": blocks(64, 64, 64, 4), "mm": mm(64, 64, 128, 4)}
    rec = blocks(64, 32, 128, 8, cqk_max=256)
    return {"fwd": blocks(64, 64, 128, 4), "dq": rec, "dkdv": rec}


def _fwd(q, k, v, bh: int, bw: int, long_mode: bool, scale: float, cfg: dict,
         channels_last: bool = True):
    B, Cqk, H, W = q.shape
    Cv = v.shape[1]
    for t in (q, k, v):
        check_extent(_OP, t)
    if channels_last:
        q, k, v = _line.channels_last(q, k, v)
    out = torch.empty((B, Cv, H, W), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, W), dtype=acc_dtype(q.dtype), device=q.device)
    check_extent(_OP, out)
    geometry = _geometry(H, W, bh, bw, long_mode)
    if "fwd_mm" in cfg:  # the scores once per group, then softmax @ v as a product
        _line.fwd_scratch(q, k, v, out, lse, scale, geometry, True, False, cfg["fwd"], cfg["fwd_mm"])
    else:
        _line.fwd(q, k, v, out, lse, out, lse, scale, geometry, True, False, False, cfg["fwd"])
    return out, lse


def _bwd(dout, q, k, v, out, lse, bh: int, bw: int, long_mode: bool, scale: float, cfg: dict,
         channels_last: bool = True):
    B, Cqk, H, W = q.shape
    if dout.dtype != v.dtype:
        dout = dout.to(v.dtype)
    for t in (q, k, v, dout, out):
        check_extent(_OP, t)
    if channels_last:
        q, k, v, dout = _line.channels_last(q, k, v, dout)
    lse = lse.contiguous()
    if q.dtype == torch.float64:  # the shared delta kernel accumulates in float32
        delta = torch.einsum("bchw,bchw->bhw", dout, out)
    else:
        delta = bwd_delta(dout, out)
    grads = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    _line.bwd(q, k, v, dout, lse, delta, grads, None, scale, _geometry(H, W, bh, bw, long_mode),
              True, False, cfg)
    return grads


def isa_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bh: int, bw: int,
            long_mode: bool, scale: float, keep_p: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Interlaced sparse self-attention forward (the caller validates shapes and divisibility),
    with the signature of the compiled ``isa_fwd``.

    Args:
        q (Tensor): [B, Cqk, H, W] queries, any strides.
        k (Tensor): [B, Cqk, H, W] keys, any strides.
        v (Tensor): [B, Cv, H, W] values, any strides; q, k, v share one dtype.
        bh, bw (int): the block; ``H % bh == 0`` and ``W % bw == 0``.
        long_mode (bool): True: groups of equal ``(i % bh, j % bw)``; False: ``bh x bw`` blocks.
        scale (float): multiplies the energies ``<q, k>``.
        keep_p (bool): ignored: the backward recomputes the weights from ``lse`` (the compiled
            kernels keep them instead), so p is always empty.

    Returns:
        out [B, Cv, H, W] (dtype of q, NCHW-contiguous), lse [B, H, W] (float32; float64 for
        float64 inputs), and an empty p.
    """
    B, Cqk, H, W = q.shape
    L = (H // bh) * (W // bw) if long_mode else bh * bw
    out, lse = _fwd(q, k, v, bh, bw, long_mode, scale, _config(L, Cqk, v.shape[1], q.dtype))
    return out, lse, lse.new_empty((0,))


def isa_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, p: torch.Tensor, bh: int, bw: int,
            long_mode: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Interlaced sparse self-attention backward from the saved ``out`` and ``lse`` (no atomics),
    with the signature of the compiled ``isa_bwd``.

    Args:
        dout (Tensor): [B, Cv, H, W] gradient of ``out``, any strides.
        q, k, v (Tensor): the forward inputs.
        out (Tensor): [B, Cv, H, W] and lse (Tensor): [B, H, W] from :func:`isa_fwd`.
        p (Tensor): :func:`isa_fwd`'s empty p, not read.
        bh, bw, long_mode, scale: the forward's arguments.

    Returns:
        dq, dk, dv: NCHW-contiguous, shapes and dtypes of q, k, v.
    """
    B, Cqk, H, W = q.shape
    L = (H // bh) * (W // bw) if long_mode else bh * bw
    cfg = _config(L, Cqk, v.shape[1], q.dtype)
    return _bwd(dout, q, k, v, out, lse, bh, bw, long_mode, scale, cfg)
