"""OCRNet's object-contextual blocks, with mmsegmentation 1.2.2's module layout.

:class:`SpatialGather` is mmseg's ``SpatialGatherModule`` and :class:`ObjectAttention` its
``ObjectAttentionBlock`` (``mmseg/models/decode_heads/ocr_head.py``), the projections built as
mmcv's ``ConvModule`` (submodules ``conv``, ``bn``/``gn``, ``activate``), so the state-dict keys of
those submodules are mmseg's and a checkpoint loads unchanged (strip the ``decode_head.
object_context_block.`` prefix). The pixel-region attention runs as :func:`fastctx.region_attention`
and the soft region pooling as :func:`fastctx.spatial_gather`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastctx.nn._common import bare
from fastctx.nn._conv import ConvModule
from fastctx.ops.ocr import region_attention, spatial_gather

__all__ = ["ObjectAttention", "SpatialGather"]

class SpatialGather(nn.Module):
    """mmseg's ``SpatialGatherModule``: one soft-pooled region per class, via
    :func:`fastctx.spatial_gather` (softmax of ``scale * probs`` over the PIXELS).

    Args:
        scale (float): multiplies the logits; must be positive. Default: ``1``.
        backend (str | None): passed to :func:`fastctx.spatial_gather`. Default: None.

    Shape:
        ``feats [B, C, H, W]``, ``probs [B, K, H, W]`` (the auxiliary head's raw logits)
        -> ``[B, C, K, 1]`` (mmseg's layout).

    Example::

        >>> gather = fastctx.nn.SpatialGather(1)
        >>> gather(torch.randn(2, 64, 33, 65), torch.randn(2, 19, 33, 65)).shape
        torch.Size([2, 64, 19, 1])
    """

    def __init__(self, scale: float = 1, backend: str | None = None) -> None:
        super().__init__()
        self.scale = scale
        self.backend = backend

    @classmethod
    def from_modules(cls, scale: float, backend: str | None = None) -> SpatialGather:
        """The fastctx module for an mmseg ``SpatialGatherModule`` of this ``scale`` (it holds no
        parameters); used by :func:`fastctx.swap`."""
        return cls(scale, backend=backend)

    def forward(self, feats: Tensor, probs: Tensor) -> Tensor:
        return spatial_gather(feats, probs, self.scale, backend=self.backend).unsqueeze(3)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, backend={self.backend!r}"


def _project(in_channels: int, channels: int, num_convs: int, conv_cfg, norm_cfg, act_cfg) -> nn.Module:
    """mmseg ``SelfAttentionBlock.build_project`` with ``use_conv_module=True``: one ConvModule,
    or an ``nn.Sequential`` of ``num_convs`` of them."""
    convs = [ConvModule(in_channels, channels, 1, conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg)]
    convs += [
        ConvModule(channels, channels, 1, conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg)
        for _ in range(num_convs - 1)
    ]
    return nn.Sequential(*convs) if len(convs) > 1 else convs[0]


class ObjectAttention(nn.Module):
    """mmseg's ``ObjectAttentionBlock`` (OCRHead): pixels attend to the class regions.

    ``q = query_project(x)`` (2 x ConvModule, ``in -> channels``), ``k = key_project(regions)``
    (2 x ConvModule), ``v = value_project(regions)`` (ConvModule), ``context =
    out_project(region_attention(q, k, v, scale=channels ** -0.5))`` (ConvModule, ``channels ->
    in``), ``out = bottleneck(cat([context, x]))`` (ConvModule, ``2 * in -> in``). State-dict keys
    as mmseg: ``key_project.{0,1}.conv.weight``, ``key_project.{0,1}.bn.*``, ``query_project.*``,
    ``value_project.conv.weight``, ``value_project.bn.*``, ``out_project.*``, ``bottleneck.*``.
    The key/value projections run on the ``[B, C, K, 1]`` regions as in mmseg (so their BN, in
    training, takes its statistics over the ``B * K`` regions, as mmseg's does).

    Args:
        in_channels (int): ``C`` of the pixel features and of the regions.
        channels (int): ``ocr_channels`` of the attention (256 in OCRNet).
        scale (int): mmseg's OCRHead ``scale``. Only ``1`` runs: for ``scale > 1`` mmseg's block
            max-pools the queries and its own forward then fails, so it is refused here.
            Default: ``1``.
        conv_cfg, norm_cfg, act_cfg (dict | None): as mmcv's ``ConvModule``.
            Default: None, ``dict(type='BN')``, ``dict(type='ReLU')`` (mmseg's OCRNet configs use
            ``SyncBN``, whose single-process forward is BN's).
        backend (str | None): passed to :func:`fastctx.region_attention`. Default: None.

    Shape:
        ``query_feats [B, C, H, W]``, ``key_feats [B, C, K, 1]`` (or ``[B, C, K]``) ->
        ``[B, C, H, W]``.

    Example::

        >>> block = fastctx.nn.ObjectAttention(64, 32)
        >>> x = torch.randn(2, 64, 33, 65)
        >>> regions = fastctx.nn.SpatialGather()(x, torch.randn(2, 19, 33, 65))
        >>> block(x, regions).shape
        torch.Size([2, 64, 33, 65])
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        scale: int = 1,
        conv_cfg: dict | None = None,
        norm_cfg: dict | None = {"type": "BN"},  # noqa: B006 (never mutated)
        act_cfg: dict | None = {"type": "ReLU"},  # noqa: B006
        backend: str | None = None,
    ) -> None:
        super().__init__()
        who = "fastctx.nn.ObjectAttention"
        if scale > 1:
            raise ValueError(
                f"{who}: scale={scale} is not supported: mmseg 1.2.2's ObjectAttentionBlock then "
                "max-pools the queries and its forward fails (it reshapes the pooled context to the "
                "full size and calls resize without a size); OCRHead's default scale=1 runs"
            )
        self.key_in_channels = self.query_in_channels = self.out_channels = in_channels
        self.in_channels = in_channels
        self.channels = channels
        self.scale = scale
        self.share_key_query = False
        self.conv_cfg, self.norm_cfg, self.act_cfg = conv_cfg, norm_cfg, act_cfg
        self.backend = backend
        self.key_project = _project(in_channels, channels, 2, conv_cfg, norm_cfg, act_cfg)
        self.query_project = _project(in_channels, channels, 2, conv_cfg, norm_cfg, act_cfg)
        self.value_project = _project(in_channels, channels, 1, conv_cfg, norm_cfg, act_cfg)
        self.out_project = _project(channels, in_channels, 1, conv_cfg, norm_cfg, act_cfg)
        self.query_downsample = None
        self.key_downsample = None
        self.matmul_norm = True
        self.bottleneck = ConvModule(in_channels * 2, in_channels, 1, conv_cfg=conv_cfg, norm_cfg=norm_cfg, act_cfg=act_cfg)

    @classmethod
    def from_modules(
        cls,
        key_project: nn.Module,
        query_project: nn.Module,
        value_project: nn.Module,
        out_project: nn.Module,
        bottleneck: nn.Module,
        in_channels: int,
        channels: int,
        conv_cfg: dict | None = None,
        norm_cfg: dict | None = None,
        act_cfg: dict | None = None,
        backend: str | None = None,
    ) -> ObjectAttention:
        """An ObjectAttention around existing projections (the SAME modules, so the same
        ``Parameter`` and buffer objects, and their own forward): :func:`fastctx.swap` builds one
        from an mmseg ``ObjectAttentionBlock`` (ConvModule projections, a 1x1 ConvModule
        ``bottleneck``) or an sssegmentation ``ObjectContextBlock`` (``nn.Sequential(conv, norm,
        act)`` projections, a 3x3 ``bottleneck``). ``query_project`` / ``key_project`` /
        ``value_project`` must map ``in_channels -> channels`` pointwise, ``out_project``
        ``channels -> in_channels`` and ``bottleneck`` ``2 * in_channels -> in_channels`` keeping
        the spatial size (the caller verifies it). The cfg dicts are only recorded."""
        block = bare(cls)
        block.key_in_channels = block.query_in_channels = block.out_channels = in_channels
        block.in_channels = in_channels
        block.channels = channels
        block.scale = 1
        block.share_key_query = False
        block.conv_cfg, block.norm_cfg, block.act_cfg = conv_cfg, norm_cfg, act_cfg
        block.backend = backend
        block.key_project = key_project
        block.query_project = query_project
        block.value_project = value_project
        block.out_project = out_project
        block.query_downsample = None
        block.key_downsample = None
        block.matmul_norm = True
        block.bottleneck = bottleneck
        return block

    def _check(self, query_feats: object, key_feats: object) -> Tensor:
        who = "fastctx.nn.ObjectAttention"
        for name, t in (("query_feats", query_feats), ("key_feats", key_feats)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if query_feats.dim() != 4 or query_feats.shape[1] != self.in_channels:
            raise ValueError(
                f"{who}: query_feats must be [B, {self.in_channels}, H, W], got {tuple(query_feats.shape)}"
            )
        regions = key_feats.squeeze(3) if key_feats.dim() == 4 and key_feats.shape[3] == 1 else key_feats
        if regions.dim() != 3 or regions.shape[:2] != query_feats.shape[:2]:
            raise ValueError(
                f"{who}: key_feats must be the regions [B, {self.in_channels}, K, 1] (or [B, C, K]) of "
                f"query_feats {tuple(query_feats.shape)}, got {tuple(key_feats.shape)}"
            )
        return regions.unsqueeze(3)

    def forward(self, query_feats: Tensor, key_feats: Tensor) -> Tensor:
        key_feats = self._check(query_feats, key_feats)
        key = self.key_project(key_feats).flatten(2)  # [B, Cc, K]
        value = self.value_project(key_feats).flatten(2)  # [B, Cc, K]
        # The queries [B, Cc, H, W] and the attention's output are temporaries, not locals: held
        # through out_project and the bottleneck they added a [B, Cc, H, W] map to the inference
        # peak (mmseg's block frees them when its attention returns): 210 vs 194 MiB at OCRNet's
        # 64x128, 512 channels.
        context = self.out_project(
            region_attention(self.query_project(query_feats), key, value, scale=self.channels**-0.5, backend=self.backend)
        )
        return self.bottleneck(torch.cat([context, query_feats], dim=1))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, channels={self.channels}, backend={self.backend!r}"
