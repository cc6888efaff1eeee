"""Criss-cross attention (CCNet): the op, its autograd and its backends.

Layers (STYLE.md): kernel host functions ``cc_fwd``/``cc_bwd`` per backend (C++ and CUDA in
``torch.ops.fastctx``, Triton in :mod:`fastctx.triton.criss_cross`); one pair of torch.library
custom ops with a fake implementation and registered autograd; the public
:func:`criss_cross_attention`.
"""

from __future__ import annotations

import torch
from torch import Tensor

import python_ref
from fastctx import _validate
from fastctx.backends import OpSupport, choose_backend, register_op
from fastctx.ops._kernels import fused_op, kernels

OP = "criss_cross_attention"
register_op(OP, OpSupport(compiled="cc_fwd", triton=True))


def _kernels(backend: str):
    return kernels(OP, backend, ("cc_fwd", "cc_bwd"), ("fastctx.triton.criss_cross", "cc_fwd", "cc_bwd"))


@fused_op("fastctx::criss_cross_fwd")
def _fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    fwd, _ = _kernels(backend)
    return fwd(q, k, v, scale)


@_fwd.register_fake
def _(q, k, v, scale, backend):
    B, _, H, W = q.shape
    out = v.new_empty((B, v.shape[1], H, W))
    lse = q.new_empty((B, H, W), dtype=_validate.acc_dtype(q.dtype))
    return out, lse


@fused_op("fastctx::criss_cross_bwd")
def _bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    _, bwd = _kernels(backend)
    return bwd(dout, q, k, v, out, lse, scale)


@_bwd.register_fake
def _(dout, q, k, v, out, lse, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.backend = scale, backend
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # their gradients: None, not tensors of zeros


def _backward(ctx, dout, _dlse):
    if dout is None:  # an undefined gradient (gradcheck tries one): nothing flows back
        return (None,) * 5
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _bwd(dout, q, k, v, out, lse, ctx.scale, ctx.backend)  # (every backend takes its strides)
    return dq, dk, dv, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def criss_cross_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float = 1.0, *, backend: str | None = None
) -> Tensor:
    """Criss-cross attention of CCNet: each pixel attends to its row and its column.

    Pixel ``(i, j)`` attends to the ``H + W - 1`` positions ``(i', j), i' != i`` and
    ``(i, j')``, with one softmax over ``scale * <q[:, i, j], k[:, pos]>``.

    Args:
        q (Tensor): queries ``[B, Cqk, H, W]`` (NCHW; channels_last and other strides work).
        k (Tensor): keys ``[B, Cqk, H, W]``.
        v (Tensor): values ``[B, Cv, H, W]``; ``Cv`` may differ from ``Cqk``.
        scale (float): multiplies the energies. Default: ``1.0`` (CCNet uses no scaling).
        backend (str | None): "reference", "cpu", "cuda" or "triton"; None chooses (see
            :mod:`fastctx.backends`). Default: None.

    Returns:
        Tensor: ``[B, Cv, H, W]`` in the inputs' dtype (float32 accumulation). The compiled
        backends return it NCHW-contiguous. The "cpu" kernels read NCHW and channels_last
        float32 / float64 inputs in place and copy others to NCHW first, the "cuda" kernels copy
        every non-NCHW input to NCHW first, the Triton kernels read any strides.

    Example::

        >>> q, k, v = torch.randn(2, 8, 13, 9), torch.randn(2, 8, 13, 9), torch.randn(2, 16, 13, 9)
        >>> fastctx.criss_cross_attention(q, k, v).shape
        torch.Size([2, 16, 13, 9])
    """
    _validate.qkv_map(OP, q, k, v)
    scale = _validate.scale(OP, scale)
    _validate.no_nan(OP, q=q, k=k, v=v)
    q, k, v = _validate.autocast(q, k, v)
    name = choose_backend(OP, q, backend)
    if name == "reference":
        return python_ref.criss_cross_attention(q, k, v, scale)
    out, _ = _fwd(q, k, v, scale, name)
    return out
