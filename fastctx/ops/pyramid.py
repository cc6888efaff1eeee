"""Asymmetric pyramid non-local (ANN): pyramid pooling and the APNB/AFNB attention core.

``pyramid_pool`` has compiled CPU and Triton kernels (custom ops with autograd, as
region_attention); ``pyramid_attention`` is that pooling of k and v followed by region_attention's
kernels, both on the backend chosen for the call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

import python_ref
from fastctx import _validate
from fastctx.backends import OpSupport, choose_backend, register_op
from fastctx.ops._kernels import fused_op, kernels
from fastctx.ops.ocr import _ra_fwd, ra_keep_weights

register_op("pyramid_pool", OpSupport(compiled="pp_fwd", triton=True))
register_op("pyramid_attention", OpSupport(compiled="pp_fwd", triton=True))


#: pooled keys per call at most (the kernels index keys with 32-bit ints)
_MAX_KEYS = 2**31 - 1


def _scales(op: str, pool_scales: Sequence[int]) -> tuple[int, ...]:
    if (
        not isinstance(pool_scales, (tuple, list))
        or not pool_scales
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pool_scales)
    ):
        raise ValueError(f"fastctx.{op}: pool_scales must be a non-empty sequence of positive ints, got {pool_scales!r}")
    S = sum(s * s for s in pool_scales)
    if S > _MAX_KEYS:
        raise ValueError(f"fastctx.{op}: pool_scales {tuple(pool_scales)} give S = {S} pooled keys; at most {_MAX_KEYS} are supported")
    return tuple(pool_scales)


def pyramid_pool(x: Tensor, pool_scales: Sequence[int] = (1, 3, 6, 8), *, backend: str | None = None) -> Tensor:
    """Adaptive average pooling at every scale, flattened and concatenated.

    At scale ``s``, bin ``(i, j)`` averages rows ``floor(i * H / s)`` to ``ceil((i + 1) * H / s)``
    (exclusive) and the same columns, exactly as ``adaptive_avg_pool2d`` (bins overlap when
    ``H % s != 0``; a scale larger than the map repeats pixels). The compiled kernels read ``x``
    once for all scales, through its strides (NCHW, channels_last or any other layout: no copy).

    Args:
        x (Tensor): ``[B, C, H, W]``.
        pool_scales (Sequence[int]): positive ints, duplicates allowed. Default: ``(1, 3, 6, 8)``
            (``S = 110``).
        backend (str | None): see :mod:`fastctx.backends`. Default: None.

    Returns:
        Tensor: ``[B, C, S]`` with ``S = sum(s * s)``, bins row-major, scales in the given order.

    Example:
        >>> fastctx.pyramid_pool(torch.randn(2, 256, 64, 128)).shape
        torch.Size([2, 256, 110])
    """
    op = "pyramid_pool"
    _validate.tensor(op, "x", x, 4, "[B, C, H, W]")
    scales = _scales(op, pool_scales)
    _validate.no_nan(op, x=x)
    (x,) = _validate.autocast(x)
    name = choose_backend(op, x, backend)
    if name == "reference":
        return python_ref.pyramid_pool(x, scales)
    return _pp_fwd(x, list(scales), name)


def pyramid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pool_scales: Sequence[int] = (1, 3, 6, 8),
    scale: float | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """Pixels of ``q`` attend to the pyramid-pooled keys and values (APNB/AFNB core).

    ``out = softmax(scale * q^T pyramid_pool(k)) pyramid_pool(v)``, the softmax over the ``S``
    pooled keys. The backend chosen runs both the pooling and the attention.

    Args:
        q (Tensor): ``[B, Cqk, Hq, Wq]``.
        k (Tensor): ``[B, Cqk, H, W]``; v (Tensor): ``[B, Cv, H, W]`` (``H, W`` may differ from
            ``Hq, Wq``: AFNB).
        pool_scales (Sequence[int]): Default: ``(1, 3, 6, 8)``.
        scale (float | None): Default: ``Cqk ** -0.5``.
        backend (str | None): see :mod:`fastctx.backends`. Default: None.

    Returns:
        Tensor: ``[B, Cv, Hq, Wq]``.
    """
    op = "pyramid_attention"
    _validate.tensor(op, "q", q, 4, "[B, Cqk, Hq, Wq]")
    _validate.tensor(op, "k", k, 4, "[B, Cqk, H, W]")
    _validate.tensor(op, "v", v, 4, "[B, Cv, H, W]")
    _validate.same(op, q=q, k=k, v=v)
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(f"fastctx.{op}: q and k must agree in batch and channels, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if (v.shape[0], v.shape[2], v.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"fastctx.{op}: v must match k in batch and spatial size, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    scales = _scales(op, pool_scales)
    scale = _validate.scale(op, scale, q.shape[1] ** -0.5)
    _validate.no_nan(op, q=q, k=k, v=v)
    q, k, v = _validate.autocast(q, k, v)
    name = choose_backend(op, q, backend)
    if name == "reference":
        return python_ref.pyramid_attention(q, k, v, scales, scale)
    kp = _pp_fwd(k, list(scales), name)  # [B, Cqk, S]
    vp = _pp_fwd(v, list(scales), name)  # [B, Cv, S]
    bias = q.new_zeros((kp.shape[0], kp.shape[2]))
    out, _, _ = _ra_fwd(q, kp, vp, bias, scale, name, ra_keep_weights(name, kp.shape[2], q, k, v))
    return out


def _pp_kernels(backend: str):
    return kernels("pyramid_pool", backend, ("pp_fwd", "pp_bwd"), ("fastctx.triton.pyramid_pool", "pp_fwd", "pp_bwd"))


@fused_op("fastctx::pyramid_pool_fwd")
def _pp_fwd(x: Tensor, scales: list[int], backend: str) -> Tensor:
    return _pp_kernels(backend)[0](x, scales)


@_pp_fwd.register_fake
def _(x, scales, backend):
    return x.new_empty((x.shape[0], x.shape[1], sum(s * s for s in scales)))


@fused_op("fastctx::pyramid_pool_bwd")
def _pp_bwd(dout: Tensor, scales: list[int], H: int, W: int, backend: str) -> Tensor:
    return _pp_kernels(backend)[1](dout, scales, H, W)


@_pp_bwd.register_fake
def _(dout, scales, H, W, backend):
    return dout.new_empty((dout.shape[0], dout.shape[1], H, W))


def _pp_setup_context(ctx, inputs, output):
    x, scales, backend = inputs
    ctx.scales, ctx.hw, ctx.backend = scales, (x.shape[2], x.shape[3]), backend


def _pp_backward(ctx, dout):
    return _pp_bwd(dout, ctx.scales, *ctx.hw, ctx.backend), None, None


_pp_fwd.register_autograd(_pp_backward, setup_context=_pp_setup_context)


# The backward is linear in dout, and its adjoint is the forward: double backward.
def _pp_bwd_setup_context(ctx, inputs, output):
    _, scales, _, _, backend = inputs
    ctx.scales, ctx.backend = scales, backend


def _pp_bwd_backward(ctx, ddx):
    return _pp_fwd(ddx, ctx.scales, ctx.backend), None, None, None, None


_pp_bwd.register_autograd(_pp_bwd_backward, setup_context=_pp_bwd_setup_context)
