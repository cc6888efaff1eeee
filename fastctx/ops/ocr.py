"""OCR: spatial gather (soft region pooling) and pixel-region attention.

``region_attention`` has compiled CPU and Triton kernels (custom ops with autograd, as
criss-cross); ``spatial_gather`` only the "reference" backend so far.
"""

from __future__ import annotations

import torch
from torch import Tensor

import python_ref
from fastctx import _validate
from fastctx.backends import OpSupport, choose_backend, register_op
from fastctx.ops._kernels import kernels

register_op("spatial_gather", OpSupport())
register_op("region_attention", OpSupport(compiled="ra_fwd", triton=True))


def spatial_gather(feats: Tensor, logits: Tensor, scale: float = 1.0, *, backend: str | None = None) -> Tensor:
    """OCR's soft region pooling: per class, a softmax over the PIXELS weights the features.

    Args:
        feats (Tensor): ``[B, C, H, W]``.
        logits (Tensor): ``[B, K, H, W]`` raw class logits (``-inf`` allowed; a class whose
            logits are all ``-inf`` gets a zero region).
        scale (float): multiplies the logits. Default: ``1.0``.
        backend (str | None): see :mod:`fastctx.backends`. Default: None.

    Returns:
        Tensor: ``[B, C, K]`` (mmseg returns it as ``[B, C, K, 1]``).
    """
    op = "spatial_gather"
    _validate.feats_logits(op, feats, logits)
    scale = _validate.scale(op, scale)
    if scale <= 0:
        raise ValueError(f"fastctx.{op}: scale must be positive (it multiplies logits that may be -inf), got {scale}")
    feats, logits = _validate.autocast(feats, logits)
    choose_backend(op, feats, backend)
    return python_ref.spatial_gather(feats, logits, scale)


def region_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    bias: Tensor | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """Every pixel attends to a few keys (OCR's regions, ANN's pooled positions, ISNet's classes).

    Args:
        q (Tensor): pixels ``[B, Cqk, H, W]``.
        k (Tensor): keys ``[B, Cqk, S]``; v (Tensor): values ``[B, Cv, S]``.
        scale (float | None): Default: ``Cqk ** -0.5``.
        bias (Tensor | None): ``[B, S]`` added to the logits; ``-inf`` masks a key, and a pixel
            whose keys are all masked gets zeros. Default: None.
        backend (str | None): see :mod:`fastctx.backends`. Default: None.

    Returns:
        Tensor: ``[B, Cv, H, W]``.
    """
    op = "region_attention"
    _validate.tensor(op, "q", q, 4, "[B, Cqk, H, W]")
    _validate.tensor(op, "k", k, 3, "[B, Cqk, S]")
    _validate.tensor(op, "v", v, 3, "[B, Cv, S]")
    _validate.same(op, q=q, k=k, v=v)
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(f"fastctx.{op}: q and k must agree in batch and channels, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if (v.shape[0], v.shape[2]) != (k.shape[0], k.shape[2]):
        raise ValueError(f"fastctx.{op}: v must match k in batch and number of keys, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if bias is not None:
        _validate.tensor(op, "bias", bias, 2, "[B, S]")
        _validate.same(op, q=q, bias=bias)
        if tuple(bias.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(f"fastctx.{op}: bias must be [B, S] = {(k.shape[0], k.shape[2])}, got {tuple(bias.shape)}")
        _validate.no_nan(op, allow_inf=True, bias=bias)
        if _validate.check_nan_enabled() and bool(torch.isposinf(bias).any()):
            raise ValueError(f"fastctx.{op}: bias (shape {tuple(bias.shape)}) contains +inf; only -inf masks a key")
    scale = _validate.scale(op, scale, q.shape[1] ** -0.5)
    _validate.no_nan(op, q=q, k=k, v=v)
    q, k, v = _validate.autocast(q, k, v)
    if bias is not None:
        bias = bias.to(q.dtype)
    name = choose_backend(op, q, backend)
    if name == "reference":
        return python_ref.region_attention(q, k, v, scale, bias)
    if bias is None:
        bias = q.new_zeros((k.shape[0], k.shape[2]))
    out, _ = _ra_fwd(q, k, v, bias, scale, name)
    return out


def _ra_kernels(backend: str):
    return kernels("region_attention", backend, ("ra_fwd", "ra_bwd"), ("fastctx.triton.region_attention", "ra_fwd", "ra_bwd"))


@torch.library.custom_op("fastctx::region_attention_fwd", mutates_args=())
def _ra_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    return _ra_kernels(backend)[0](q, k, v, bias, scale)


@_ra_fwd.register_fake
def _(q, k, v, bias, scale, backend):
    B, _, H, W = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return v.new_empty((B, v.shape[1], H, W)), q.new_empty((B, H, W), dtype=lse_dtype)


@torch.library.custom_op("fastctx::region_attention_bwd", mutates_args=())
def _ra_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, out: Tensor, lse: Tensor, scale: float, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _ra_kernels(backend)[1](dout, q, k, v, bias, out, lse, scale)


@_ra_bwd.register_fake
def _(dout, q, k, v, bias, out, lse, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(bias)


def _ra_setup_context(ctx, inputs, output):
    q, k, v, bias, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse)
    ctx.scale, ctx.backend = scale, backend
    ctx.mark_non_differentiable(lse)


def _ra_backward(ctx, dout, _dlse):
    q, k, v, bias, out, lse = ctx.saved_tensors
    dq, dk, dv, dbias = _ra_bwd(dout.contiguous(), q, k, v, bias, out, lse, ctx.scale, ctx.backend)
    return dq, dk, dv, dbias, None, None


_ra_fwd.register_autograd(_ra_backward, setup_context=_ra_setup_context)
