"""Helpers every reference shares."""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype a reference computes in: float32 for 16-bit floats, else the promoted dtype."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def _softmax_or_zero(e: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax of ``e`` over ``dim``; a slice that is entirely ``-inf`` gives zeros.

    ``F.softmax`` returns NaN for such a slice (``exp(-inf - -inf)``). Here the running max of an
    all ``-inf`` slice is replaced by 0, so every ``exp`` is ``exp(-inf) = 0``, and the division
    is guarded. Autograd through this formulation gives exactly zero gradient for the whole slice
    (``d exp(x) / dx = exp(x) = 0``, the max is detached, the guarded branch of ``where`` gets
    nothing), never NaN. Positions at ``-inf`` in a partly finite slice get weight 0 and zero
    gradient, as with ``F.softmax``.
    """
    m = e.amax(dim, keepdim=True).detach()
    m = m.masked_fill(m == _NEG_INF, 0.0)
    p = torch.exp(e - m)
    s = p.sum(dim, keepdim=True)
    return p / torch.where(s > 0, s, torch.ones_like(s))
