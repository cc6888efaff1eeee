"""ANN's asymmetric pyramid non-local blocks (APNB, AFNB), with mmsegmentation's parameter layout."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastctx.nn._common import bare
from fastctx.nn._conv import BN, RELU, ConvModule
from fastctx.ops.pyramid import pyramid_attention

__all__ = ["AFNB", "APNB", "PyramidSelfAttentionBlock"]


def _check_scales(where: str, name: str, scales: object) -> tuple[int, ...]:
    if (
        not isinstance(scales, (tuple, list))
        or not scales
        or not all(isinstance(s, int) and s > 0 for s in scales)
    ):
        raise ValueError(f"{where}: {name} must be a non-empty sequence of positive ints, got {scales!r}")
    return tuple(scales)


class PyramidSelfAttentionBlock(nn.Module):
    """mmseg's ``ann_head.SelfAttentionBlock``: same submodules and state-dict keys.

    ``key_project`` / ``query_project``: ConvModule(1x1) to ``channels`` (one shared module
    when ``share_key_query``; the state dict then holds both names, as mmseg's does);
    ``value_project``: plain 1x1 conv to ``channels``; ``out_project``: plain 1x1 conv
    ``channels -> out_channels``, initialised to zero as mmseg does; ``query_downsample``:
    ``MaxPool2d(query_scale)`` or None. The pyramid pooling of the PROJECTED keys and values
    (mmseg's ``key_downsample``, a parameter-free ``PPMConcat``) and the attention run in
    :func:`fastctx.pyramid_attention`, with ``scale = channels ** -0.5``.

    ``query_scale > 1``: mmseg 1.2.2 max-pools the projected query and then reshapes the
    smaller context to the query's full size, which raises (so no mmseg checkpoint uses it).
    Here the context is upsampled back to the query's size instead (bilinear,
    ``align_corners=True``, as OCNet's ``_SelfAttentionBlock`` does), before ``out_project``
    (equal to upsampling after it: a 1x1 conv commutes with bilinear interpolation).

    Args:
        low_in_channels (int): channels of the key/value feature map.
        high_in_channels (int): channels of the query feature map.
        channels (int): query/key/value projection channels.
        out_channels (int): output channels.
        share_key_query (bool): one projection for queries and keys.
        query_scale (int): max-pool factor of the projected query.
        key_pool_scales (Sequence[int]): pyramid scales of the keys and values.
        conv_cfg, norm_cfg, act_cfg (dict | None): as mmcv's ``ConvModule``.
        backend (str | None): passed to :func:`fastctx.pyramid_attention`. Default: None.
    """

    def __init__(
        self,
        low_in_channels: int,
        high_in_channels: int,
        channels: int,
        out_channels: int,
        share_key_query: bool,
        query_scale: int,
        key_pool_scales: Sequence[int],
        conv_cfg: Mapping | None = None,
        norm_cfg: Mapping | None = BN,
        act_cfg: Mapping | None = RELU,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        where = "fastctx.nn.PyramidSelfAttentionBlock"
        if share_key_query and low_in_channels != high_in_channels:
            raise ValueError(
                f"{where}: share_key_query needs low_in_channels == high_in_channels, got "
                f"{low_in_channels} and {high_in_channels}"
            )
        if not isinstance(query_scale, int) or query_scale < 1:
            raise ValueError(f"{where}: query_scale must be a positive int, got {query_scale!r}")
        self.channels = channels
        self.share_key_query = share_key_query
        self.query_scale = query_scale
        self.key_pool_scales = _check_scales(where, "key_pool_scales", key_pool_scales)
        self.backend = backend
        cm = dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg)
        self.key_project = ConvModule(low_in_channels, channels, 1, **cm)
        if share_key_query:
            self.query_project = self.key_project
        else:
            self.query_project = ConvModule(high_in_channels, channels, 1, **cm)
        self.value_project = nn.Conv2d(low_in_channels, channels, 1)
        self.out_project = nn.Conv2d(channels, out_channels, 1)
        nn.init.zeros_(self.out_project.weight)  # mmseg: constant_init(out_project, 0)
        nn.init.zeros_(self.out_project.bias)
        self.query_downsample = nn.MaxPool2d(query_scale) if query_scale > 1 else None

    @classmethod
    def from_modules(
        cls,
        key_project: nn.Module,
        query_project: nn.Module,
        value_project: nn.Module,
        out_project: nn.Module,
        channels: int,
        key_pool_scales: Sequence[int],
        *,
        backend: str | None = None,
    ) -> PyramidSelfAttentionBlock:
        """A block around existing projections (the SAME modules, so the same ``Parameter`` and
        buffer objects, run by their own forward), with ``query_scale=1``: :func:`fastctx.swap`
        builds one from each stage of an mmseg ``AFNB`` / ``APNB``. ``query_project is
        key_project`` means ``share_key_query``. The projections must be pointwise and map to
        ``channels`` (the caller verifies it)."""
        block = bare(cls)
        block.channels = channels
        block.share_key_query = query_project is key_project
        block.query_scale = 1
        block.key_pool_scales = _check_scales(
            "fastctx.nn.PyramidSelfAttentionBlock", "key_pool_scales", key_pool_scales
        )
        block.backend = backend
        block.key_project = key_project
        block.query_project = query_project
        block.value_project = value_project
        block.out_project = out_project
        block.query_downsample = None
        return block

    def forward(self, query_feats: Tensor, key_feats: Tensor) -> Tensor:
        """``query_feats``: ``[B, high_in, Hq, Wq]``, ``key_feats``: ``[B, low_in, H, W]`` ->
        ``[B, out_channels, Hq, Wq]``."""
        key = self.key_project(key_feats)
        if self.share_key_query and query_feats is key_feats and not self.training:
            query = key  # the same conv + BN (eval) + act of the same map
        else:
            # In training mmseg calls the shared module twice: BN updates its running stats twice.
            query = self.query_project(query_feats)
        if self.query_downsample is not None:
            query = self.query_downsample(query)
        value = self.value_project(key_feats)
        context = pyramid_attention(
            query, key, value, self.key_pool_scales, self.channels**-0.5, backend=self.backend
        )
        if context.shape[2:] != query_feats.shape[2:]:
            context = F.interpolate(context, size=query_feats.shape[2:], mode="bilinear", align_corners=True)
        return self.out_project(context)


def _check_input(where: str, name: str, x: object, channels: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{where}: {name} must be [B, {channels}, H, W], got {shape}")


class AFNB(nn.Module):
    """Asymmetric fusion non-local block: mmseg's ``ann_head.AFNB``, same arguments and keys.

    Queries from the high-level map, keys/values from the low-level map (their sizes may
    differ); one :class:`PyramidSelfAttentionBlock` per query scale (``stages.N.*``), summed;
    then ``bottleneck`` = ConvModule(1x1, no activation) of ``cat([context, high_feats])``.

    Args:
        low_in_channels (int), high_in_channels (int), channels (int), out_channels (int).
        query_scales (Sequence[int]): Default: ``(1,)``.
        key_pool_scales (Sequence[int]): Default: ``(1, 3, 6, 8)``.
        conv_cfg, norm_cfg, act_cfg (dict | None): Default: None, ``BN``, ``ReLU``.
        backend (str | None): passed to :func:`fastctx.pyramid_attention`. Default: None.

    Shape:
        ``low_feats [B, low_in, H, W]``, ``high_feats [B, high_in, Hq, Wq]`` ->
        ``[B, out_channels, Hq, Wq]`` (NCHW).

    Example::

        >>> afnb = fastctx.nn.AFNB(32, 64, 16, 64).eval()
        >>> afnb(torch.randn(2, 32, 33, 65), torch.randn(2, 64, 33, 65)).shape
        torch.Size([2, 64, 33, 65])
    """

    def __init__(
        self,
        low_in_channels: int,
        high_in_channels: int,
        channels: int,
        out_channels: int,
        query_scales: Sequence[int] = (1,),
        key_pool_scales: Sequence[int] = (1, 3, 6, 8),
        conv_cfg: Mapping | None = None,
        norm_cfg: Mapping | None = BN,
        act_cfg: Mapping | None = RELU,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.low_in_channels, self.high_in_channels = low_in_channels, high_in_channels
        scales = _check_scales("fastctx.nn.AFNB", "query_scales", query_scales)
        self.stages = nn.ModuleList(
            PyramidSelfAttentionBlock(
                low_in_channels, high_in_channels, channels, out_channels, False, s,
                key_pool_scales, conv_cfg, norm_cfg, act_cfg, backend=backend,
            )
            for s in scales
        )
        self.bottleneck = ConvModule(
            out_channels + high_in_channels, out_channels, 1, conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=None
        )

    @classmethod
    def from_modules(
        cls, stages: Sequence[PyramidSelfAttentionBlock], bottleneck: nn.Module, low_in_channels: int,
        high_in_channels: int,
    ) -> AFNB:
        """An AFNB around existing stages and ``bottleneck`` (the SAME modules): used by
        :func:`fastctx.swap` for an mmseg ``AFNB``."""
        block = bare(cls)
        block.low_in_channels, block.high_in_channels = low_in_channels, high_in_channels
        block.stages = nn.ModuleList(stages)
        block.bottleneck = bottleneck
        return block

    def forward(self, low_feats: Tensor, high_feats: Tensor) -> Tensor:
        _check_input("fastctx.nn.AFNB", "low_feats", low_feats, self.low_in_channels)
        _check_input("fastctx.nn.AFNB", "high_feats", high_feats, self.high_in_channels)
        if low_feats.shape[0] != high_feats.shape[0]:
            raise ValueError(
                f"fastctx.nn.AFNB: low_feats {tuple(low_feats.shape)} and high_feats "
                f"{tuple(high_feats.shape)} must have the same batch size"
            )
        priors = [stage(high_feats, low_feats) for stage in self.stages]
        context = torch.stack(priors, dim=0).sum(dim=0)
        return self.bottleneck(torch.cat([context, high_feats], 1))


class APNB(nn.Module):
    """Asymmetric pyramid non-local block: mmseg's ``ann_head.APNB``, same arguments and keys.

    Self-attention of one map with a shared query/key projection; one
    :class:`PyramidSelfAttentionBlock` per query scale (``stages.N.*``), summed; then
    ``bottleneck`` = ConvModule(1x1) of ``cat([context, feats])`` (so ``out_channels`` must
    equal ``in_channels``, as the concatenation has ``2 * in_channels`` channels).

    Args:
        in_channels (int), channels (int), out_channels (int).
        query_scales (Sequence[int]): Default: ``(1,)``.
        key_pool_scales (Sequence[int]): Default: ``(1, 3, 6, 8)``.
        conv_cfg, norm_cfg, act_cfg (dict | None): Default: None, ``BN``, ``ReLU``.
        backend (str | None): passed to :func:`fastctx.pyramid_attention`. Default: None.

    Shape:
        ``[B, C, H, W] -> [B, C, H, W]`` (NCHW).

    Example::

        >>> apnb = fastctx.nn.APNB(64, 16, 64).eval()
        >>> apnb(torch.randn(2, 64, 33, 65)).shape
        torch.Size([2, 64, 33, 65])
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        out_channels: int,
        query_scales: Sequence[int] = (1,),
        key_pool_scales: Sequence[int] = (1, 3, 6, 8),
        conv_cfg: Mapping | None = None,
        norm_cfg: Mapping | None = BN,
        act_cfg: Mapping | None = RELU,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if out_channels != in_channels:
            raise ValueError(
                f"fastctx.nn.APNB: out_channels ({out_channels}) must equal in_channels "
                f"({in_channels}): the bottleneck takes cat([context, feats]), 2 * in_channels wide"
            )
        self.in_channels = in_channels
        scales = _check_scales("fastctx.nn.APNB", "query_scales", query_scales)
        self.stages = nn.ModuleList(
            PyramidSelfAttentionBlock(
                in_channels, in_channels, channels, out_channels, True, s,
                key_pool_scales, conv_cfg, norm_cfg, act_cfg, backend=backend,
            )
            for s in scales
        )
        self.bottleneck = ConvModule(
            2 * in_channels, out_channels, 1, conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg
        )

    @classmethod
    def from_modules(
        cls, stages: Sequence[PyramidSelfAttentionBlock], bottleneck: nn.Module, in_channels: int
    ) -> APNB:
        """An APNB around existing stages and ``bottleneck`` (the SAME modules): used by
        :func:`fastctx.swap` for an mmseg ``APNB``."""
        block = bare(cls)
        block.in_channels = in_channels
        block.stages = nn.ModuleList(stages)
        block.bottleneck = bottleneck
        return block

    def forward(self, feats: Tensor) -> Tensor:
        _check_input("fastctx.nn.APNB", "feats", feats, self.in_channels)
        priors = [stage(feats, feats) for stage in self.stages]
        context = torch.stack(priors, dim=0).sum(dim=0)
        return self.bottleneck(torch.cat([context, feats], 1))
