"""OCR: spatial gather (soft region pooling) and pixel-region attention.

Both have compiled CPU and Triton kernels: custom ops with a fake implementation and registered
autograd (the forward returns a log-sum-exp that the backward uses; region_attention's compiled
forward also keeps the softmax weights for its backward when one can follow).
"""

from __future__ import annotations

import torch
from torch import Tensor

import python_ref
from fastctx import _validate
from fastctx.backends import OpSupport, choose_backend, register_op
from fastctx.ops._kernels import fused_op, keep_weights, kernels

register_op("spatial_gather", OpSupport(compiled="sg_fwd", triton=True))
register_op("region_attention", OpSupport(compiled="ra_fwd", triton=True))


def spatial_gather(feats: Tensor, logits: Tensor, scale: float = 1.0, *, backend: str | None = None) -> Tensor:
    """OCR's soft region pooling: per class, a softmax over the PIXELS weights the features.

    Args:
        feats (Tensor): ``[B, C, H, W]``.
        logits (Tensor): ``[B, K, H, W]`` raw class logits (``-inf`` allowed, ``+inf`` and NaN
            refused; a class whose logits are all ``-inf`` gets a zero region and zero
            gradients).
        scale (float): multiplies the logits. Default: ``1.0``.
        backend (str | None): see :mod:`fastctx.backends`. Default: None.

    Returns:
        Tensor: ``[B, C, K]`` (mmseg returns it as ``[B, C, K, 1]``).

    The "cpu" and "triton" backends stream the pixels once with an online softmax per class and
    keep no ``[B, K, H, W]`` weights; the backward recomputes them from the saved log-sum-exp.
    The "cpu" backend reads NCHW and channels_last float32 / float64 inputs in place and copies
    other strided and 16-bit inputs once (16-bit to float32); the Triton kernels read any
    strides.
    """
    op = "spatial_gather"
    _validate.feats_logits(op, feats, logits)
    _validate.no_posinf(op, "logits", logits, "only -inf is allowed")
    scale = _validate.scale(op, scale)
    if scale <= 0:
        raise ValueError(f"fastctx.{op}: scale must be positive (it multiplies logits that may be -inf), got {scale}")
    feats, logits = _validate.autocast(feats, logits)
    name = choose_backend(op, feats, backend)
    if name == "reference":
        return python_ref.spatial_gather(feats, logits, scale)
    out, _ = _sg_fwd(feats, logits, scale, name)
    return out


def _sg_kernels(backend: str):
    return kernels("spatial_gather", backend, ("sg_fwd", "sg_bwd"), ("fastctx.triton.spatial_gather", "sg_fwd", "sg_bwd"))


@fused_op("fastctx::spatial_gather_fwd")
def _sg_fwd(feats: Tensor, logits: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    return _sg_kernels(backend)[0](feats, logits, scale)


@_sg_fwd.register_fake
def _(feats, logits, scale, backend):
    B, C = feats.shape[:2]
    K = logits.shape[1]
    return feats.new_empty((B, C, K)), feats.new_empty((B, K), dtype=_validate.acc_dtype(feats.dtype))


@fused_op("fastctx::spatial_gather_bwd")
def _sg_bwd(
    dout: Tensor, feats: Tensor, logits: Tensor, out: Tensor, lse: Tensor, scale: float, backend: str
) -> tuple[Tensor, Tensor]:
    return _sg_kernels(backend)[1](dout, feats, logits, out, lse, scale)


@_sg_bwd.register_fake
def _(dout, feats, logits, out, lse, scale, backend):
    return feats.new_empty(feats.shape), logits.new_empty(logits.shape)


def _sg_setup_context(ctx, inputs, output):
    feats, logits, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(feats, logits, out, lse)
    ctx.scale, ctx.backend = scale, backend
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # their gradients: None, not tensors of zeros


def _sg_backward(ctx, dout, _dlse):
    if dout is None:  # an undefined gradient (gradcheck tries one): nothing flows back
        return (None,) * 4
    feats, logits, out, lse = ctx.saved_tensors
    dfeats, dlogits = _sg_bwd(dout.contiguous(), feats, logits, out, lse, ctx.scale, ctx.backend)
    return dfeats, dlogits, None, None


_sg_fwd.register_autograd(_sg_backward, setup_context=_sg_setup_context)


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
        Tensor: ``[B, Cv, H, W]`` (NCHW-contiguous from the "cpu" backend).

    The "cpu" backend reads an NCHW or channels_last float32 / float64 ``q`` (and gradient of the
    output) in place and copies other strided and 16-bit ones once; the Triton kernels read any
    strides.
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
        _validate.no_posinf(op, "bias", bias, "only -inf masks a key")
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
    out, _, _ = _ra_fwd(q, k, v, bias, scale, name, ra_keep_weights(name, k.shape[2], q, k, v, bias))
    return out


# The CPU backward reads the weights P [B, S, H*W] when the forward kept them; else it recomputes
# them from lse and runs lean (smaller pixel blocks, one partial sum per thread). With few keys,
# P, the per-thread scratch and the partial sums are what put a call above the reference's
# memory, which keeps only P besides the results: OCR's S = 19, C = 512, 64 x 128, fwd+bwd on
# 2 threads held 67.11 MiB with P kept, 65.16 MiB lean, the reference 65.34. The lean backward
# costs time (fwd+bwd 1.11-1.19x of the kept path at S = 8 and 19), well inside the margin over
# the reference there (about 2x). From RA_KEEP_MIN_KEYS keys on, P is kept (S = 150: 81.3 MiB
# against the reference's 88.9, and the recompute would cost 1.10-1.15x).
RA_KEEP_MIN_KEYS = 32


def ra_keep_weights(backend: str, num_keys: int, *inputs: Tensor) -> bool:
    """Whether region attention's forward keeps its weights for the backward (see
    RA_KEEP_MIN_KEYS)."""
    return num_keys >= RA_KEEP_MIN_KEYS and keep_weights(backend, *inputs)


def _ra_kernels(backend: str):
    return kernels("region_attention", backend, ("ra_fwd", "ra_bwd"), ("fastctx.triton.region_attention", "ra_fwd", "ra_bwd"))


# Outputs (out, lse, p): p [B, S, H*W] holds the weights when keep_p is set for the cpu
# backend, else it is empty (the backward recomputes them). Every backend's host
# functions take the compiled ops' schema (csrc/ops/region_attention.cpp).
@fused_op("fastctx::region_attention_fwd")
def _ra_fwd(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float, backend: str, keep_p: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return _ra_kernels(backend)[0](q, k, v, bias, scale, keep_p)


@_ra_fwd.register_fake
def _(q, k, v, bias, scale, backend, keep_p):
    B, _, H, W = q.shape
    stat_dtype = _validate.acc_dtype(q.dtype)
    p_shape = (B, k.shape[2], H * W) if keep_p and backend == "cpu" else (0,)
    return (v.new_empty((B, v.shape[1], H, W)), q.new_empty((B, H, W), dtype=stat_dtype),
            q.new_empty(p_shape, dtype=stat_dtype))


@fused_op("fastctx::region_attention_bwd")
def _ra_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, out: Tensor, lse: Tensor, p: Tensor, scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _ra_kernels(backend)[1](dout, q, k, v, bias, out, lse, p, scale)


@_ra_bwd.register_fake
def _(dout, q, k, v, bias, out, lse, p, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(bias)


def _ra_setup_context(ctx, inputs, output):
    q, k, v, bias, scale, backend, _keep_p = inputs
    out, lse, p = output
    ctx.save_for_backward(q, k, v, bias, out, lse, p)
    ctx.scale, ctx.backend = scale, backend
    ctx.mark_non_differentiable(lse, p)
    ctx.set_materialize_grads(False)  # their gradients: None, not tensors of zeros


def _ra_backward(ctx, dout, _dlse, _dp):
    if dout is None:  # an undefined gradient (gradcheck tries one): nothing flows back
        return (None,) * 7
    q, k, v, bias, out, lse, p = ctx.saved_tensors
    dq, dk, dv, dbias = _ra_bwd(dout, q, k, v, bias, out, lse, p, ctx.scale, ctx.backend)  # (both backends take its strides)
    return dq, dk, dv, dbias, None, None, None


_ra_fwd.register_autograd(_ra_backward, setup_context=_ra_setup_context)
