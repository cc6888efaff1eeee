"""Asymmetric pyramid non-local (ANN): pyramid pooling and the APNB/AFNB attention core.

Only the "reference" backend so far.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

import python_ref
from fastctx import _validate
from fastctx.backends import OpSupport, choose_backend, register_op

register_op("pyramid_pool", OpSupport())
register_op("pyramid_attention", OpSupport())


def _scales(op: str, pool_scales: Sequence[int]) -> tuple[int, ...]:
    if (
        not isinstance(pool_scales, (tuple, list))
        or not pool_scales
        or not all(isinstance(s, int) and s > 0 for s in pool_scales)
    ):
        raise ValueError(f"fastctx.{op}: pool_scales must be a non-empty sequence of positive ints, got {pool_scales!r}")
    return tuple(pool_scales)


def pyramid_pool(x: Tensor, pool_scales: Sequence[int] = (1, 3, 6, 8), *, backend: str | None = None) -> Tensor:
    """Adaptive average pooling at every scale, flattened and concatenated.

    Args:
        x (Tensor): ``[B, C, H, W]``.
        pool_scales (Sequence[int]): Default: ``(1, 3, 6, 8)`` (``S = 110``).
        backend (str | None): see :mod:`fastctx.backends`. Default: None.

    Returns:
        Tensor: ``[B, C, S]`` with ``S = sum(s * s)``, bins row-major, scales in the given order.
    """
    op = "pyramid_pool"
    _validate.tensor(op, "x", x, 4, "[B, C, H, W]")
    scales = _scales(op, pool_scales)
    _validate.no_nan(op, x=x)
    (x,) = _validate.autocast(x)
    choose_backend(op, x, backend)
    return python_ref.pyramid_pool(x, scales)


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

    Args:
        q (Tensor): ``[B, Cqk, Hq, Wq]``.
        k (Tensor): ``[B, Cqk, H, W]``; v (Tensor): ``[B, Cv, H, W]``.
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
    choose_backend(op, q, backend)
    return python_ref.pyramid_attention(q, k, v, scales, scale)
