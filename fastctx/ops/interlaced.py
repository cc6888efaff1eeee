"""Interlaced sparse self-attention (ISANet): compiled CPU kernels (custom ops with autograd, as
region_attention), and the "reference" backend."""

from __future__ import annotations

import torch
from torch import Tensor

import python_ref
from fastctx import _validate
from fastctx.backends import OpSupport, choose_backend, register_op
from fastctx.ops._kernels import fused_op, keep_weights, kernels

OP = "interlaced_attention"
register_op(OP, OpSupport(compiled="isa_fwd", triton=True))


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
        q (Tensor): ``[B, Cqk, H, W]``; k (Tensor): ``[B, Cqk, H, W]``; v (Tensor): ``[B, Cv, H, W]``
            (NCHW; any strides: the compiled kernels read each group's members in place, without
            a permuted copy).
        block (tuple[int, int]): ``(bh, bw)``, mmseg's ``down_factor``; ``H % bh == 0`` and
            ``W % bw == 0`` are required (the module pads). Default: ``(8, 8)``.
        mode (str): "long" groups positions of equal ``(i % bh, j % bw)``; "short" groups
            contiguous ``bh x bw`` blocks. Default: "long".
        scale (float | None): Default: ``Cqk ** -0.5``.
        backend (str | None): see :mod:`fastctx.backends`. Default: None.

    Returns:
        Tensor: ``[B, Cv, H, W]``, contiguous.

    Example:
        >>> q, k, v = torch.randn(2, 256, 64, 128), torch.randn(2, 256, 64, 128), torch.randn(2, 512, 64, 128)
        >>> out = fastctx.interlaced_attention(q, k, v, block=(8, 8), mode="long")  # global relation
        >>> out = fastctx.interlaced_attention(q, k, out, block=(8, 8), mode="short")  # local relation
    """
    _validate.qkv_map(OP, q, k, v)
    if (
        not isinstance(block, (tuple, list))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
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
    name = choose_backend(OP, q, backend)
    if name == "reference":
        return python_ref.interlaced_attention(q, k, v, (bh, bw), mode, scale)
    out, _, _ = _isa_fwd(q, k, v, bh, bw, mode == "long", scale, name, keep_weights(name, q, k, v))
    return out


def _isa_kernels(backend: str):
    return kernels(OP, backend, ("isa_fwd", "isa_bwd"), ("fastctx.triton.interlaced", "isa_fwd", "isa_bwd"))


# Outputs (out, lse, p). keep_p (set when a backward can follow): the compiled forward also keeps
# every group's softmax weights, p [B, groups, L, L], which the compiled backward reads instead of
# recomputing them; Triton's backward recomputes them from lse, its p is empty. Every backend's
# host functions take the compiled ops' schema (csrc/ops/interlaced_attention.cpp).
@fused_op("fastctx::interlaced_attention_fwd")
def _isa_fwd(
    q: Tensor, k: Tensor, v: Tensor, bh: int, bw: int, long_mode: bool, scale: float, backend: str, keep_p: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return _isa_kernels(backend)[0](q, k, v, bh, bw, long_mode, scale, keep_p)


@_isa_fwd.register_fake
def _(q, k, v, bh, bw, long_mode, scale, backend, keep_p):
    B, _, H, W = q.shape
    stat_dtype = _validate.acc_dtype(q.dtype)
    L = (H // bh) * (W // bw) if long_mode else bh * bw
    p_shape = (B, H * W // L, L, L) if keep_p and backend == "cpu" else (0,)
    return (v.new_empty((B, v.shape[1], H, W)), q.new_empty((B, H, W), dtype=stat_dtype),
            q.new_empty(p_shape, dtype=stat_dtype))


@fused_op("fastctx::interlaced_attention_bwd")
def _isa_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    p: Tensor,
    bh: int,
    bw: int,
    long_mode: bool,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _isa_kernels(backend)[1](dout, q, k, v, out, lse, p, bh, bw, long_mode, scale)


@_isa_bwd.register_fake
def _(dout, q, k, v, out, lse, p, bh, bw, long_mode, scale, backend):
    # The kernels return contiguous gradients whatever the strides of the inputs.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _isa_setup_context(ctx, inputs, output):
    q, k, v, bh, bw, long_mode, scale, backend, _keep_p = inputs
    out, lse, p = output
    ctx.save_for_backward(q, k, v, out, lse, p)
    ctx.args = (bh, bw, long_mode, scale)
    ctx.backend = backend
    ctx.mark_non_differentiable(lse, p)
    ctx.set_materialize_grads(False)  # their gradients: None, not tensors of zeros


def _isa_backward(ctx, dout, _dlse, _dp):
    if dout is None:  # an undefined gradient (gradcheck tries one): nothing flows back
        return (None,) * 9
    q, k, v, out, lse, p = ctx.saved_tensors
    dq, dk, dv = _isa_bwd(dout, q, k, v, out, lse, p, *ctx.args, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None


_isa_fwd.register_autograd(_isa_backward, setup_context=_isa_setup_context)
