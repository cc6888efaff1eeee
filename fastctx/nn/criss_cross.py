"""CCNet's criss-cross attention block, with mmcv's parameter names."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastctx.nn._common import bare
from fastctx.ops.criss_cross import criss_cross_attention


class Scale(nn.Module):
    """Multiply by a learnable scalar (mmcv's ``Scale``: parameter ``scale``, a 0-d tensor).

    Args:
        scale (float): initial value. Default: ``1.0``.
    """

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class CrissCrossAttention(nn.Module):
    """Criss-cross attention block: ``x + gamma * CCA(q(x), k(x), v(x))``.

    Same parameters and state-dict keys as ``mmcv.ops.CrissCrossAttention``
    (``query_conv``, ``key_conv`` 1x1 ``C -> C // 8``, ``value_conv`` 1x1 ``C -> C``,
    ``gamma.scale`` initialised to 0), so an mmcv checkpoint loads unchanged.

    Args:
        in_channels (int): ``C``, at least 8.
        backend (str | None): passed to :func:`fastctx.criss_cross_attention`. Default: None.

    Shape:
        ``[B, C, H, W] -> [B, C, H, W]`` (NCHW).

    Example::

        >>> cca = fastctx.nn.CrissCrossAttention(64)
        >>> cca(torch.randn(2, 64, 33, 65)).shape
        torch.Size([2, 64, 33, 65])
    """

    def __init__(self, in_channels: int, backend: str | None = None) -> None:
        super().__init__()
        if in_channels < 8:
            raise ValueError(f"fastctx.nn.CrissCrossAttention: in_channels must be >= 8, got {in_channels}")
        self.in_channels = in_channels
        self.backend = backend
        self.query_conv = nn.Conv2d(in_channels, in_channels // 8, 1)
        self.key_conv = nn.Conv2d(in_channels, in_channels // 8, 1)
        self.value_conv = nn.Conv2d(in_channels, in_channels, 1)
        self.gamma = Scale(0.0)

    @classmethod
    def from_modules(
        cls,
        query_conv: nn.Module,
        key_conv: nn.Module,
        value_conv: nn.Module,
        gamma: nn.Module,
        backend: str | None = None,
    ) -> CrissCrossAttention:
        """Build the block around existing submodules, without copying them: its parameters are
        the same ``Parameter`` objects (what :func:`fastctx.swap` needs, so that optimisers, EMA
        copies and hooks that hold them keep working).

        Args:
            query_conv, key_conv (nn.Module): 1x1 convolutions ``C -> C // 8``.
            value_conv (nn.Module): 1x1 convolution ``C -> C``.
            gamma (nn.Module): ``x -> x * scale`` (this module's or mmcv's ``Scale``).
            backend (str | None): Default: None.

        The caller vouches for the structure (:func:`fastctx.swap` checks it first); only the
        channel count is checked here.
        """
        in_channels = value_conv.in_channels
        if in_channels < 8:
            raise ValueError(f"fastctx.nn.CrissCrossAttention: in_channels must be >= 8, got {in_channels}")
        self = bare(cls)
        self.in_channels = in_channels
        self.backend = backend
        self.query_conv = query_conv
        self.key_conv = key_conv
        self.value_conv = value_conv
        self.gamma = gamma
        return self

    def forward(self, x: Tensor) -> Tensor:
        out = criss_cross_attention(
            self.query_conv(x), self.key_conv(x), self.value_conv(x), backend=self.backend
        )
        return self.gamma(out) + x

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, backend={self.backend!r}"


class RCCA(nn.Module):
    """Recurrent criss-cross attention: one shared :class:`CrissCrossAttention`, applied
    ``recurrence`` times, as mmseg's ``CCHead`` does (state-dict keys ``cca.*``).

    Args:
        in_channels (int): ``C``.
        recurrence (int): Default: ``2``.
        backend (str | None): Default: None.
    """

    def __init__(self, in_channels: int, recurrence: int = 2, backend: str | None = None) -> None:
        super().__init__()
        if recurrence < 1:
            raise ValueError(f"fastctx.nn.RCCA: recurrence must be >= 1, got {recurrence}")
        self.recurrence = recurrence
        self.cca = CrissCrossAttention(in_channels, backend=backend)

    def forward(self, x: Tensor) -> Tensor:
        for _ in range(self.recurrence):
            x = self.cca(x)
        return x
