"""Segmentation models on the fused ops: backbones, heads and segmentors, as mmsegmentation
configures them for Cityscapes, with mmseg's state-dict keys.

>>> model = fastctx.models.build("ccnet_r18_d8", num_classes=19)
>>> model.eval()(torch.randn(1, 3, 64, 64))["out"].shape
torch.Size([1, 19, 8, 8])

Registry (:func:`names`); ``_d8``: ResNet-V1c with output stride 8, every model with the FCN
auxiliary head of mmseg's configs (OCRNet: its first cascade stage):

=================  ===========================================================================
ccnet_r50_d8       mmseg ``ccnet_r50-d8``: ``CCHead(2048, 512, recurrence=2)`` + FCN(1024, 256)
isanet_r50_d8      mmseg ``isanet_r50-d8``: ``ISAHead(2048, 512, isa 256, (8, 8))`` + FCN
ann_r50_d8         mmseg ``ann_r50-d8``: ``ANNHead((1024, 2048), 512, project 256)`` + FCN
ocrnet_r101_d8     mmseg ``ocrnet_r101-d8``: cascade FCN(1024, 256) -> ``OCRHead(2048, 512, 256)``
ocrnet_hr18        mmseg ``ocrnet_hr18``: HRNetV2-W18, cascade FCN(270 resize_concat, 1x1, no
                   dropout) -> ``OCRHead(270, 512, 256)``
ocrnet_hr48        mmseg ``ocrnet_hr48``: the same on W48 (720 channels)
isnet_r50_d8       sssegmentation's ISNet head (feats 512, transform 256, concat_input) on
                   ResNet-50-D8 + FCN(1024, 256); training outputs also ``"stage1"``
*_r18_d8           ResNet-18-D8 variants as mmseg's r18 configs scale them (decode
                   ``channels`` 512 -> 128, aux FCN(256, 64)); the inner widths mmseg's r18
                   configs leave unset are scaled by the same 1/4: isa_channels 64,
                   project_channels 64, ocr_channels 64, ISNet transform 64
=================  ===========================================================================

The images the models take are normalised by the caller (mmseg's mean/std). The norm layers are
``BatchNorm2d`` (mmseg's configs say ``SyncBN``: same keys; the trainer converts for DDP).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from torch import Tensor

from fastctx.models.backbones import HRNET_W18, HRNET_W48, HRNet, ResNetV1c, hrnet_extra
from fastctx.models.heads import ANNHead, CCHead, FCNHead, ISAHead, ISNetHead, OCRHead
from fastctx.models.segmentors import CascadeEncoderDecoder, EncoderDecoder, Segmentor, load_backbone

__all__ = [
    "ANNHead", "CCHead", "CascadeEncoderDecoder", "EncoderDecoder", "FCNHead", "HRNET_W18", "HRNET_W48",
    "HRNet", "ISAHead", "ISNetHead", "OCRHead", "ResNetV1c", "Segmentor", "build", "hrnet_extra",
    "load_backbone", "names",
]  # fmt: skip


def _resnet(depth: int) -> tuple[ResNetV1c, int, int]:
    """ResNet-V1c-D8 and the (stage-3, stage-4) channels."""
    net = ResNetV1c(depth)
    return net, net.out_channels[2], net.out_channels[3]


def _widths(depth: int) -> dict[str, int]:
    """Head widths: mmseg's r50/r101 configs, or its r18 scaling (decode 128, aux 64)."""
    if depth == 18:
        return {"channels": 128, "inner": 64, "aux": 64}
    return {"channels": 512, "inner": 256, "aux": 256}


def _aux(c3: int, w: dict[str, int], K: int) -> FCNHead:
    return FCNHead(c3, w["aux"], K, in_index=2, num_convs=1, concat_input=False, dropout_ratio=0.1)


def _ccnet(depth: int, K: int, backend: str | None) -> Segmentor:
    net, c3, c4 = _resnet(depth)
    w = _widths(depth)
    return EncoderDecoder(net, CCHead(c4, w["channels"], K, recurrence=2, backend=backend), _aux(c3, w, K), backend)


def _isanet(depth: int, K: int, backend: str | None) -> Segmentor:
    net, c3, c4 = _resnet(depth)
    w = _widths(depth)
    head = ISAHead(c4, w["channels"], w["inner"], K, down_factor=(8, 8), backend=backend)
    return EncoderDecoder(net, head, _aux(c3, w, K), backend)


def _ann(depth: int, K: int, backend: str | None) -> Segmentor:
    net, c3, c4 = _resnet(depth)
    w = _widths(depth)
    head = ANNHead((c3, c4), w["channels"], w["inner"], K, (1,), (1, 3, 6, 8), backend=backend)
    return EncoderDecoder(net, head, _aux(c3, w, K), backend)


def _ocrnet_resnet(depth: int, K: int, backend: str | None) -> Segmentor:
    net, c3, c4 = _resnet(depth)
    w = _widths(depth)
    head = OCRHead(c4, w["channels"], w["inner"], K, in_index=3, backend=backend)
    return CascadeEncoderDecoder(net, _aux(c3, w, K), head, backend)


def _ocrnet_hrnet(width: int, K: int, backend: str | None) -> Segmentor:
    net = HRNet(hrnet_extra(width))
    cs = net.out_channels
    first = FCNHead(cs, sum(cs), K, in_index=(0, 1, 2, 3), num_convs=1, kernel_size=1, concat_input=False,
                    dropout_ratio=-1, input_transform="resize_concat")  # fmt: skip
    head = OCRHead(cs, 512, 256, K, in_index=(0, 1, 2, 3), input_transform="resize_concat", dropout_ratio=-1,
                   backend=backend)  # fmt: skip
    return CascadeEncoderDecoder(net, first, head, backend)


def _isnet(depth: int, K: int, backend: str | None) -> Segmentor:
    net, c3, c4 = _resnet(depth)
    w = _widths(depth)
    head = ISNetHead(c4, w["channels"], w["inner"], K, concat_input=True, dropout=0.1, backend=backend)
    return EncoderDecoder(net, head, _aux(c3, w, K), backend)


_REGISTRY: dict[str, Callable[[int, str | None], Segmentor]] = {
    "ccnet_r50_d8": lambda K, b: _ccnet(50, K, b),
    "isanet_r50_d8": lambda K, b: _isanet(50, K, b),
    "ann_r50_d8": lambda K, b: _ann(50, K, b),
    "ocrnet_hr18": lambda K, b: _ocrnet_hrnet(18, K, b),
    "ocrnet_hr48": lambda K, b: _ocrnet_hrnet(48, K, b),
    "ocrnet_r101_d8": lambda K, b: _ocrnet_resnet(101, K, b),
    "isnet_r50_d8": lambda K, b: _isnet(50, K, b),
    "ccnet_r18_d8": lambda K, b: _ccnet(18, K, b),
    "isanet_r18_d8": lambda K, b: _isanet(18, K, b),
    "ann_r18_d8": lambda K, b: _ann(18, K, b),
    "ocrnet_r18_d8": lambda K, b: _ocrnet_resnet(18, K, b),
    "isnet_r18_d8": lambda K, b: _isnet(18, K, b),
}


def names() -> list[str]:
    """The registered model names, in registry order."""
    return list(_REGISTRY)


def build(
    name: str,
    num_classes: int,
    backbone: str | os.PathLike | Mapping[str, Tensor] | None = None,
    backend: str | None = None,
) -> Segmentor:
    """Build a registered model.

    Args:
        name (str): one of :func:`names`.
        num_classes (int): K, at least 1.
        backbone (path | state dict | None): a backbone checkpoint on disk (or a state dict) to
            load into ``model.backbone`` with :func:`load_backbone`; None: random init (mmseg's).
            Nothing is ever downloaded.
        backend (str | None): of every fastctx op in the model (``model.backend`` changes it).

    Returns:
        Segmentor: ``model(img)`` -> ``{"out": ...}`` (eval) / ``{"out", "aux", ...}`` (train);
        ``model.name`` and ``model.num_classes`` say what was built.
    """
    if name not in _REGISTRY:
        raise ValueError(f"fastctx.models.build: unknown model {name!r}; registered: {', '.join(_REGISTRY)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"fastctx.models.build: num_classes must be a positive int, got {num_classes!r}")
    model = _REGISTRY[name](num_classes, backend)
    model.name, model.num_classes = name, num_classes
    if backbone is not None:
        load_backbone(model.backbone, backbone)
    return model
