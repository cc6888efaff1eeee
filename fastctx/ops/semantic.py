"""ISNet's per-class semantic pooling.

Compiled CPU and Triton kernels as custom ops with registered autograd (as region_attention):

- ``fastctx::semantic_pool_fwd(feats, logits)`` -> ``regions`` (compute dtype), ``counts``,
  ``labels`` and ``w`` (each pixel's softmax weight within its class, compute dtype; saved for
  the backward); its backward ``fastctx::semantic_pool_bwd`` gives the gradients of feats and of
  logits (through ``w``; the argmax is piecewise constant).
- ``fastctx::semantic_pool_gather(regions, labels)`` -> ``pooled``; its backward
  ``fastctx::semantic_pool_scatter`` is the deterministic segmented sum of ``dpooled`` over the
  pixels of each class.

``semantic_pool`` is the gather of ``semantic_pool_regions``. The compute dtype is float32 for
float16 / bfloat16 / float32 inputs and float64 for float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

import python_ref
from fastctx import _validate
from fastctx.backends import OpSupport, choose_backend, register_op
from fastctx.ops._kernels import fused_op, kernels

register_op("semantic_pool", OpSupport(compiled="sp_fwd", triton=True))
register_op("semantic_pool_regions", OpSupport(compiled="sp_fwd", triton=True))

_TRITON = "fastctx.triton.semantic_pool"


def _check(op: str, feats: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    _validate.feats_logits(op, feats, logits)
    if feats.device.type == "meta":  # its output is shaped by the data: which classes are present
        raise ValueError(f"fastctx.{op}: meta tensors are not supported (the per-class pooling reads the logits' values)")
    _validate.no_posinf(op, "logits", logits, "only -inf is allowed")
    return _validate.autocast(feats, logits)


def semantic_pool(feats: Tensor, logits: Tensor, *, backend: str | None = None) -> Tensor:
    """Per image and class: softmax-weighted mean of the features of the pixels of that class.

    Args:
        feats (Tensor): ``[B, C, H, W]``.
        logits (Tensor): ``[B, K, H, W]``; each pixel's class is its argmax (ties: lowest index).
            ``-inf`` is allowed (a class whose logits are ``-inf`` at all its pixels pools to
            zeros); NaN and ``+inf`` are refused.
        backend (str | None): see :mod:`fastctx.backends`. Default: None.

    Returns:
        Tensor: ``[B, C, H, W]``: every pixel holds the pooled vector of its class.

    Example:
        >>> pooled = fastctx.semantic_pool(torch.randn(2, 512, 64, 128), torch.randn(2, 19, 64, 128))
    """
    op = "semantic_pool"
    feats, logits = _check(op, feats, logits)
    name = choose_backend(op, feats, backend)
    if name == "reference":
        return python_ref.semantic_pool(feats, logits)
    regions, _, labels, _ = _sp_fwd(feats, logits, name)
    return _sp_gather(regions, labels, feats.dtype, name)


def semantic_pool_regions(
    feats: Tensor, logits: Tensor, *, backend: str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The compact form of :func:`semantic_pool`.

    Args:
        feats (Tensor): ``[B, C, H, W]``.
        logits (Tensor): ``[B, K, H, W]`` (as in :func:`semantic_pool`).
        backend (str | None): see :mod:`fastctx.backends`. Default: None.

    Returns:
        tuple: ``regions [B, C, K]`` in the dtype of feats (zeros for absent classes),
        ``counts [B, K]`` (int64 pixel counts) and ``labels [B, H, W]`` (int64 class map).
        ``pooled[b, :, i, j] == regions[b, :, labels[b, i, j]]``.
    """
    op = "semantic_pool_regions"
    feats, logits = _check(op, feats, logits)
    name = choose_backend(op, feats, backend)
    if name == "reference":
        return python_ref.semantic_pool_regions(feats, logits)
    regions, counts, labels, _ = _sp_fwd(feats, logits, name)
    return regions.to(feats.dtype), counts, labels


# ----------------------------------------------------------------------------------------------
# regions: forward and backward
# ----------------------------------------------------------------------------------------------
def _sp_kernels(backend: str):
    return kernels("semantic_pool", backend, ("sp_fwd", "sp_bwd"), (_TRITON, "sp_fwd", "sp_bwd"))


@fused_op("fastctx::semantic_pool_fwd")
def _sp_fwd(feats: Tensor, logits: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _sp_kernels(backend)[0](feats, logits)


@_sp_fwd.register_fake
def _(feats, logits, backend):
    B, C, H, W = feats.shape
    K = logits.shape[1]
    ct = _validate.acc_dtype(feats.dtype)
    return (
        feats.new_empty((B, C, K), dtype=ct),
        feats.new_empty((B, K), dtype=torch.int64),
        feats.new_empty((B, H, W), dtype=torch.int64),
        feats.new_empty((B, H, W), dtype=ct),
    )


@fused_op("fastctx::semantic_pool_bwd")
def _sp_bwd(
    dregions: Tensor, feats: Tensor, labels: Tensor, w: Tensor, regions: Tensor, backend: str
) -> tuple[Tensor, Tensor]:
    return _sp_kernels(backend)[1](dregions, feats, labels, w, regions)


@_sp_bwd.register_fake
def _(dregions, feats, labels, w, regions, backend):
    B, _, H, W = feats.shape
    return torch.empty_like(feats, memory_format=torch.contiguous_format), feats.new_empty((B, regions.shape[2], H, W))


def _sp_setup_context(ctx, inputs, output):
    feats, _, backend = inputs
    regions, counts, labels, w = output
    ctx.save_for_backward(feats, labels, w, regions)
    ctx.backend = backend
    ctx.mark_non_differentiable(counts, labels, w)
    ctx.set_materialize_grads(False)  # their gradients: None, not tensors of zeros


def _sp_backward(ctx, dregions, _dcounts, _dlabels, _dw):
    if dregions is None:  # an undefined gradient (gradcheck tries one): nothing flows back
        return (None,) * 3
    feats, labels, w, regions = ctx.saved_tensors
    dfeats, dlogits = _sp_bwd(dregions.contiguous(), feats, labels, w, regions, ctx.backend)
    return dfeats, dlogits, None


_sp_fwd.register_autograd(_sp_backward, setup_context=_sp_setup_context)


# ----------------------------------------------------------------------------------------------
# pooled = regions gathered by labels; its backward is the segmented sum
# ----------------------------------------------------------------------------------------------
def _gs_kernels(backend: str):
    return kernels("semantic_pool", backend, ("sp_gather", "sp_scatter"), (_TRITON, "sp_gather", "sp_scatter"))


@fused_op("fastctx::semantic_pool_gather")
def _sp_gather(regions: Tensor, labels: Tensor, dtype: torch.dtype, backend: str) -> Tensor:
    return _gs_kernels(backend)[0](regions, labels, dtype)


@_sp_gather.register_fake
def _(regions, labels, dtype, backend):
    B, C, _ = regions.shape
    return regions.new_empty((B, C, labels.shape[1], labels.shape[2]), dtype=dtype)


@fused_op("fastctx::semantic_pool_scatter")
def _sp_scatter(dpooled: Tensor, labels: Tensor, K: int, backend: str) -> Tensor:
    return _gs_kernels(backend)[1](dpooled, labels, K)


@_sp_scatter.register_fake
def _(dpooled, labels, K, backend):
    return dpooled.new_empty((dpooled.shape[0], dpooled.shape[1], K), dtype=_validate.acc_dtype(dpooled.dtype))


def _gather_setup_context(ctx, inputs, output):
    regions, labels, _, backend = inputs
    ctx.save_for_backward(labels)
    ctx.K, ctx.backend = regions.shape[2], backend
    ctx.regions_dtype = regions.dtype


def _gather_backward(ctx, dpooled):
    (labels,) = ctx.saved_tensors
    # as it comes (a channels-last model's is channels-last): the CPU kernel reads it in place,
    # the Triton host function and the CUDA launch sequence make it contiguous
    dregions = _sp_scatter(dpooled, labels, ctx.K, ctx.backend)
    return dregions.to(ctx.regions_dtype), None, None, None


_sp_gather.register_autograd(_gather_backward, setup_context=_gather_setup_context)
