"""Decode heads on the fused ops, with mmsegmentation 1.2.2's state-dict layout.

Each head is mmseg's class of the same name (``FCNHead``, ``CCHead``, ``ISAHead``, ``ANNHead``,
``OCRHead``): the same submodule names (``convs``, ``conv_cat``, ``cca``, ``in_conv``,
``global_relation``, ``fusion``, ``context``, ``bottleneck``, ``object_context_block``,
``conv_seg``, ...), so the ``decode_head.*`` / ``auxiliary_head.*`` entries of an mmseg checkpoint
load unchanged. :class:`ISNetHead` is sssegmentation 1.7.0's ISNet head (``bottleneck``,
``ilc_net``, ``slc_net``, ``decoder_stage1``, ``decoder_stage2``); mmseg has no ISNet.

Every head that runs a fastctx op takes ``backend=`` and keeps it in the fastctx modules it holds
(their ``backend`` attribute); :attr:`fastctx.models.Segmentor.backend` sets them all at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastctx.nn import AFNB, APNB, ConvModule, CrissCrossAttention, ImageLevelContext, InterlacedSparseAttention
from fastctx.nn import ObjectAttention, SemanticLevelContext, SpatialGather
from fastctx.nn._conv import BN, RELU, build_act
from fastctx.nn.isnet import _norm as _ssseg_norm

__all__ = ["ANNHead", "CCHead", "FCNHead", "ISAHead", "ISNetHead", "OCRHead"]


class _DecodeHead:
    """The parts of mmseg's ``BaseDecodeHead`` the heads use: input selection (``in_index``,
    ``input_transform`` None / ``'resize_concat'`` / ``'multiple_select'``), ``dropout``
    (``Dropout2d``, None when ``dropout_ratio <= 0``) and ``conv_seg`` (1x1 conv to the classes,
    normal(std=0.01) init as mmseg's ``init_cfg``)."""

    def _setup(
        self,
        in_channels: int | Sequence[int],
        channels: int,
        num_classes: int,
        in_index: int | Sequence[int],
        input_transform: str | None,
        dropout_ratio: float,
        align_corners: bool,
    ) -> None:
        where = f"fastctx.models.{type(self).__name__}"
        if input_transform not in (None, "resize_concat", "multiple_select"):
            raise ValueError(
                f"{where}: input_transform must be None, 'resize_concat' or 'multiple_select', got {input_transform!r}"
            )
        if input_transform is None:
            if not isinstance(in_index, int) or not isinstance(in_channels, int):
                raise ValueError(f"{where}: in_index and in_channels must be ints without an input_transform")
        elif len(in_index) != len(in_channels):
            raise ValueError(f"{where}: in_index {in_index!r} and in_channels {in_channels!r} must have the same length")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"{where}: num_classes must be a positive int, got {num_classes!r}")
        self.in_index = in_index if input_transform is None else tuple(in_index)
        self.input_transform = input_transform
        self.in_channels = sum(in_channels) if input_transform == "resize_concat" else in_channels
        self.channels, self.num_classes, self.align_corners = channels, num_classes, align_corners
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None

    def _transform_inputs(self, inputs: Sequence[Tensor]) -> Tensor | list[Tensor]:
        if self.input_transform == "resize_concat":
            xs = [inputs[i] for i in self.in_index]
            size = xs[0].shape[2:]
            xs = [F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)
                  if x.shape[2:] != size else x for x in xs]  # fmt: skip
            return torch.cat(xs, dim=1)
        if self.input_transform == "multiple_select":
            return [inputs[i] for i in self.in_index]
        return inputs[self.in_index]

    def cls_seg(self, feat: Tensor) -> Tensor:
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg(feat)


class FCNHead(_DecodeHead, nn.Module):
    """mmseg's ``FCNHead``: ``num_convs`` ConvModules (``convs.N``), ``conv_cat`` when
    ``concat_input``, then ``cls_seg``. As the auxiliary head of mmseg's Cityscapes configs:
    ``FCNHead(1024, 256, K, in_index=2, num_convs=1, concat_input=False)``.

    Args:
        in_channels (int | Sequence[int]), channels (int), num_classes (int).
        in_index (int | Sequence[int]): Default: 2.
        num_convs (int): Default: 1. kernel_size (int): Default: 3.
        concat_input (bool): Default: False.
        dropout_ratio (float): Default: 0.1. input_transform (str | None): Default: None.
        norm_cfg (dict): Default: ``dict(type='BN')``. align_corners (bool): Default: False.
    """

    def __init__(
        self,
        in_channels: int | Sequence[int],
        channels: int,
        num_classes: int,
        in_index: int | Sequence[int] = 2,
        num_convs: int = 1,
        kernel_size: int = 3,
        concat_input: bool = False,
        dropout_ratio: float = 0.1,
        input_transform: str | None = None,
        norm_cfg: Mapping | None = BN,
        align_corners: bool = False,
    ) -> None:
        nn.Module.__init__(self)
        self._setup(in_channels, channels, num_classes, in_index, input_transform, dropout_ratio, align_corners)
        if num_convs < 1:
            raise ValueError(f"fastctx.models.FCNHead: num_convs must be >= 1, got {num_convs}")
        pad = kernel_size // 2
        cm = dict(norm_cfg=norm_cfg, act_cfg=RELU)
        convs = [ConvModule(self.in_channels, channels, kernel_size, pad, **cm)]
        convs += [ConvModule(channels, channels, kernel_size, pad, **cm) for _ in range(num_convs - 1)]
        self.convs = nn.Sequential(*convs)
        self.concat_input = concat_input
        if concat_input:
            self.conv_cat = ConvModule(self.in_channels + channels, channels, kernel_size, pad, **cm)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        x = self._transform_inputs(inputs)
        feats = self.convs(x)
        if self.concat_input:
            feats = self.conv_cat(torch.cat([x, feats], dim=1))
        return self.cls_seg(feats)


class CCHead(FCNHead):
    """mmseg's ``CCHead``: ``FCNHead(num_convs=2, concat_input=True)`` with recurrent criss-cross
    attention between the two convs: one shared :class:`fastctx.nn.CrissCrossAttention`
    (``cca.*``, the keys of mmcv's module) applied ``recurrence`` times.

    Args:
        in_channels (int), channels (int), num_classes (int).
        recurrence (int): Default: 2. in_index (int): Default: 3.
        dropout_ratio (float): Default: 0.1. norm_cfg (dict): Default: BN.
        backend (str | None): of :func:`fastctx.criss_cross_attention`. Default: None.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        recurrence: int = 2,
        in_index: int = 3,
        dropout_ratio: float = 0.1,
        norm_cfg: Mapping | None = BN,
        align_corners: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            in_channels, channels, num_classes, in_index, num_convs=2, concat_input=True,
            dropout_ratio=dropout_ratio, norm_cfg=norm_cfg, align_corners=align_corners,
        )  # fmt: skip
        if recurrence < 1:
            raise ValueError(f"fastctx.models.CCHead: recurrence must be >= 1, got {recurrence}")
        self.recurrence = recurrence
        self.cca = CrissCrossAttention(channels, backend=backend)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        x = self._transform_inputs(inputs)
        out = self.convs[0](x)
        for _ in range(self.recurrence):
            out = self.cca(out)
        out = self.convs[1](out)
        out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.cls_seg(out)


class ISAHead(_DecodeHead, InterlacedSparseAttention):
    """mmseg's ``ISAHead``: ``in_conv`` (3x3), the interlaced sparse attention of
    :class:`fastctx.nn.InterlacedSparseAttention` (this class IS one, so its ``global_relation`` /
    ``local_relation`` sit at the head's top level as in mmseg), ``out_conv`` (1x1 of
    ``cat([attended, in_conv output])``), ``cls_seg``.

    Args:
        in_channels (int), channels (int), isa_channels (int), num_classes (int).
        down_factor (tuple[int, int]): Default: ``(8, 8)``. in_index (int): Default: 3.
        dropout_ratio (float): Default: 0.1. norm_cfg (dict): Default: BN.
        backend (str | None): of :func:`fastctx.interlaced_attention`. Default: None.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        isa_channels: int,
        num_classes: int,
        down_factor: tuple[int, int] = (8, 8),
        in_index: int = 3,
        dropout_ratio: float = 0.1,
        norm_cfg: Mapping | None = BN,
        align_corners: bool = False,
        backend: str | None = None,
    ) -> None:
        InterlacedSparseAttention.__init__(self, channels, isa_channels, down_factor, None, norm_cfg, RELU, backend=backend)
        self._setup(in_channels, channels, num_classes, in_index, None, dropout_ratio, align_corners)
        self.in_conv = ConvModule(in_channels, channels, 3, 1, norm_cfg=norm_cfg)
        self.out_conv = ConvModule(channels * 2, channels, 1, 0, norm_cfg=norm_cfg)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        x = self.in_conv(self._transform_inputs(inputs))
        attended = InterlacedSparseAttention.forward(self, x)
        return self.cls_seg(self.out_conv(torch.cat([attended, x], dim=1)))


class ANNHead(_DecodeHead, nn.Module):
    """mmseg's ``ANNHead``: ``fusion`` (:class:`fastctx.nn.AFNB` of stages ``in_index`` =
    (low, high)), dropout, ``bottleneck`` (3x3), ``context`` (:class:`fastctx.nn.APNB`),
    ``cls_seg`` (mmseg applies the dropout twice: after the fusion and in ``cls_seg``; so here).

    Args:
        in_channels (Sequence[int]): (low, high). channels (int), project_channels (int),
        num_classes (int). query_scales: Default ``(1,)``. key_pool_scales: Default
        ``(1, 3, 6, 8)``. in_index: Default ``(2, 3)``. dropout_ratio: Default 0.1.
        norm_cfg: Default BN. backend (str | None): of :func:`fastctx.pyramid_attention`.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        project_channels: int,
        num_classes: int,
        query_scales: Sequence[int] = (1,),
        key_pool_scales: Sequence[int] = (1, 3, 6, 8),
        in_index: Sequence[int] = (2, 3),
        dropout_ratio: float = 0.1,
        norm_cfg: Mapping | None = BN,
        align_corners: bool = False,
        backend: str | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self._setup(in_channels, channels, num_classes, in_index, "multiple_select", dropout_ratio, align_corners)
        if len(in_channels) != 2:
            raise ValueError(f"fastctx.models.ANNHead: in_channels must be (low, high), got {in_channels!r}")
        low, high = in_channels
        self.project_channels = project_channels
        cm = dict(conv_cfg=None, norm_cfg=norm_cfg, act_cfg=RELU, backend=backend)
        self.fusion = AFNB(low, high, project_channels, high, query_scales, key_pool_scales, **cm)
        self.bottleneck = ConvModule(high, channels, 3, 1, norm_cfg=norm_cfg)
        self.context = APNB(channels, project_channels, channels, query_scales, key_pool_scales, **cm)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        low, high = self._transform_inputs(inputs)
        out = self.fusion(low, high)
        if self.dropout is not None:
            out = self.dropout(out)
        out = self.context(self.bottleneck(out))
        return self.cls_seg(out)


class OCRHead(_DecodeHead, nn.Module):
    """mmseg's ``OCRHead`` (a cascade head: it takes the previous head's logits):
    ``bottleneck`` (3x3), ``spatial_gather_module`` (:class:`fastctx.nn.SpatialGather` of the
    previous logits), ``object_context_block`` (:class:`fastctx.nn.ObjectAttention`), ``cls_seg``.

    Args:
        in_channels (int | Sequence[int]), channels (int), ocr_channels (int), num_classes (int).
        in_index: Default 3. input_transform: Default None (``'resize_concat'`` on HRNet).
        dropout_ratio: Default 0.1. norm_cfg: Default BN.
        backend (str | None): of :func:`fastctx.spatial_gather` and :func:`fastctx.region_attention`.
    """

    def __init__(
        self,
        in_channels: int | Sequence[int],
        channels: int,
        ocr_channels: int,
        num_classes: int,
        in_index: int | Sequence[int] = 3,
        input_transform: str | None = None,
        dropout_ratio: float = 0.1,
        norm_cfg: Mapping | None = BN,
        align_corners: bool = False,
        backend: str | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self._setup(in_channels, channels, num_classes, in_index, input_transform, dropout_ratio, align_corners)
        self.ocr_channels = ocr_channels
        self.object_context_block = ObjectAttention(channels, ocr_channels, 1, None, norm_cfg, RELU, backend=backend)
        self.spatial_gather_module = SpatialGather(1, backend=backend)
        self.bottleneck = ConvModule(self.in_channels, channels, 3, 1, norm_cfg=norm_cfg)

    def forward(self, inputs: Sequence[Tensor], prev_output: Tensor) -> Tensor:
        feats = self.bottleneck(self._transform_inputs(inputs))
        if prev_output.shape[2:] != feats.shape[2:]:
            raise ValueError(
                f"fastctx.models.OCRHead: prev_output {tuple(prev_output.shape)} must be at the "
                f"resolution of the head's features {tuple(feats.shape)}"
            )
        context = self.spatial_gather_module(feats, prev_output)
        return self.cls_seg(self.object_context_block(feats, context))


class ISNetHead(nn.Module):
    """sssegmentation 1.7.0's ISNet head (``segmentors/isnet/isnet.py``, without the shortcut
    branch, as its ResNet configs): ``bottleneck`` (3x3 conv + norm + act) of the last stage,
    ``ilc_net`` (:class:`fastctx.nn.ImageLevelContext`), ``decoder_stage1`` (1x1 conv + norm + act
    + dropout + 1x1 conv to the classes: the first prediction), ``slc_net``
    (:class:`fastctx.nn.SemanticLevelContext` guided by that prediction), ``decoder_stage2``
    (dropout + 1x1 conv). Same submodule names and keys as sssegmentation's segmentor.

    Returns ``{"out": stage-2 logits, "stage1": stage-1 logits}`` (sssegmentation puts a loss of
    weight 1.0 on each, ``loss_cls_stage1`` and ``loss_cls_stage2``).

    Args:
        in_channels (int), feats_channels (int), transform_channels (int), num_classes (int).
        concat_input (bool): Default: True. dropout (float): Default: 0.1.
        in_index (int): Default: 3.
        norm_cfg (dict): sssegmentation's names. Default: ``dict(type='BatchNorm2d')``.
        act_cfg (dict): Default: ``dict(type='ReLU', inplace=True)``.
        align_corners (bool): Default: False.
        backend (str | None): of :func:`fastctx.semantic_pool_regions` and
            :func:`fastctx.region_attention`. Default: None.
    """

    def __init__(
        self,
        in_channels: int,
        feats_channels: int,
        transform_channels: int,
        num_classes: int,
        concat_input: bool = True,
        dropout: float = 0.1,
        in_index: int = 3,
        norm_cfg: Mapping | None = None,
        act_cfg: Mapping | None = None,
        align_corners: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        who = "fastctx.models.ISNetHead"
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"{who}: num_classes must be a positive int, got {num_classes!r}")
        norm_cfg = {"type": "BatchNorm2d"} if norm_cfg is None else dict(norm_cfg)
        act_cfg = {"type": "ReLU", "inplace": True} if act_cfg is None else dict(act_cfg)
        self.in_index, self.num_classes, self.align_corners = in_index, num_classes, align_corners
        C = feats_channels

        def norm_act() -> list[nn.Module]:
            return [_ssseg_norm(who, C, norm_cfg), build_act(act_cfg, who)]

        self.bottleneck = nn.Sequential(nn.Conv2d(in_channels, C, 3, 1, 1, bias=False), *norm_act())
        ctx = dict(concat_input=concat_input, norm_cfg=dict(norm_cfg), act_cfg=dict(act_cfg))
        self.ilc_net = ImageLevelContext(C, transform_channels, align_corners=align_corners, **ctx)
        self.slc_net = SemanticLevelContext(C, transform_channels, backend=backend, **ctx)
        self.decoder_stage1 = nn.Sequential(
            nn.Conv2d(C, C, 1, bias=False), *norm_act(), nn.Dropout2d(dropout), nn.Conv2d(C, num_classes, 1)
        )
        self.decoder_stage2 = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(C, num_classes, 1))

    def forward(self, inputs: Sequence[Tensor]) -> dict[str, Tensor]:
        feats = self.bottleneck(inputs[self.in_index])
        feats_il = self.ilc_net(feats)
        stage1 = self.decoder_stage1(feats)
        feats_sl = self.slc_net(feats, stage1, feats_il)
        return {"out": self.decoder_stage2(feats_sl), "stage1": stage1}
