"""fastctx.models against the toolboxes' own classes: mmsegmentation 1.2.2's ResNetV1c, HRNet and
segmentors, sssegmentation 1.7.0's ISNet. Their state dicts load into ours strictly and the
outputs agree in eval mode.

Needs the toolboxes (``make install``; imported through tests/toolboxes.py); FAILS without them.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastctx.models as M
from tests import toolboxes
from tests.toolboxes import randomize

BN = {"type": "BN", "requires_grad": True}


def assert_close(got, want, atol, rtol):
    """float32 through a deep network: the absolute tolerance scales with the output's size."""
    torch.testing.assert_close(got, want, atol=atol * max(1.0, want.abs().max().item()), rtol=rtol)


def _mmseg_models():
    return toolboxes.mmseg().models


def _resnet_cfg(depth: int) -> dict:
    return dict(type="ResNetV1c", depth=depth, num_stages=4, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
                strides=(1, 2, 1, 1), norm_cfg=BN, norm_eval=False, style="pytorch", contract_dilation=True)  # fmt: skip


def _hrnet_cfg(width: int) -> dict:
    return dict(type="HRNet", norm_cfg=BN, norm_eval=False, extra=copy.deepcopy(M.hrnet_extra(width)))


def _fcn(in_channels, channels, K, **kw) -> dict:
    cfg = dict(type="FCNHead", in_channels=in_channels, in_index=2, channels=channels, num_convs=1,
               concat_input=False, dropout_ratio=0.1, num_classes=K, norm_cfg=BN, align_corners=False)  # fmt: skip
    cfg.update(kw)
    return cfg


def _mmseg_cfg(name: str, K: int) -> dict:
    """mmseg's own model config (configs/_base_/models/*.py; r18 as configs/*/*_r18-d8*)."""
    depth = {"r18": 18, "r50": 50, "r101": 101}.get(name.split("_")[1])
    if name.startswith("ocrnet_hr"):
        width = int(name[len("ocrnet_hr"):])
        cs = [width, 2 * width, 4 * width, 8 * width]
        common = dict(in_channels=cs, in_index=(0, 1, 2, 3), input_transform="resize_concat", dropout_ratio=-1,
                      num_classes=K, norm_cfg=BN, align_corners=False)  # fmt: skip
        return dict(type="CascadeEncoderDecoder", num_stages=2, backbone=_hrnet_cfg(width), decode_head=[
            dict(type="FCNHead", channels=sum(cs), kernel_size=1, num_convs=1, concat_input=False, **common),
            dict(type="OCRHead", channels=512, ocr_channels=256, **common),
        ])  # fmt: skip
    c3, c4 = (256, 512) if depth == 18 else (1024, 2048)
    ch, inner, aux = (128, 64, 64) if depth == 18 else (512, 256, 256)
    common = dict(num_classes=K, norm_cfg=BN, align_corners=False, dropout_ratio=0.1)
    kind = name.split("_")[0]
    if kind == "ocrnet":
        return dict(type="CascadeEncoderDecoder", num_stages=2, backbone=_resnet_cfg(depth), decode_head=[
            _fcn(c3, aux, K),
            dict(type="OCRHead", in_channels=c4, in_index=3, channels=ch, ocr_channels=inner, **common),
        ])  # fmt: skip
    head = {
        "ccnet": dict(type="CCHead", in_channels=c4, in_index=3, channels=ch, recurrence=2, **common),
        "isanet": dict(type="ISAHead", in_channels=c4, in_index=3, channels=ch, isa_channels=inner,
                       down_factor=(8, 8), **common),
        "ann": dict(type="ANNHead", in_channels=[c3, c4], in_index=[2, 3], channels=ch, project_channels=inner,
                    query_scales=(1,), key_pool_scales=(1, 3, 6, 8), **common),
    }[kind]  # fmt: skip
    return dict(type="EncoderDecoder", backbone=_resnet_cfg(depth), decode_head=head, auxiliary_head=_fcn(c3, aux, K))


def _build_mmseg(cfg: dict):
    from mmseg.registry import MODELS

    _mmseg_models()
    return MODELS.build(cfg)


def _shapes(sd) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize(("cfg", "ours", "size"), [
    (_resnet_cfg(50), lambda: M.ResNetV1c(50), (1, 3, 61, 67)),
    (_resnet_cfg(18), lambda: M.ResNetV1c(18), (2, 3, 64, 48)),
    (_hrnet_cfg(18), lambda: M.HRNet(M.HRNET_W18), (1, 3, 33, 37)),
])  # fmt: skip
def test_backbone_loads_mmseg_state_dict_and_agrees(cfg, ours, size):
    """mmseg's own backbone class -> its state dict loads into ours strictly (no key mapping) and
    every output stage agrees in eval mode (odd image sizes: HRNet's fusion resizes twice)."""
    from mmseg.registry import MODELS

    _mmseg_models()
    ref = MODELS.build(cfg)
    randomize(ref)
    net = ours()
    assert _shapes(net.state_dict()) == _shapes(ref.state_dict())
    net.load_state_dict(ref.state_dict(), strict=True)
    ref.eval(), net.eval()
    x = torch.randn(size)
    with torch.no_grad():
        want, got = ref(x), net(x)
    assert len(want) == len(got) == 4
    for w, g in zip(want, got):
        assert_close(g, w, atol=1e-4, rtol=1e-4)
    # the loader: an mmseg segmentor checkpoint (backbone.* + head entries) on disk
    net2 = ours()
    full = {f"backbone.{k}": v for k, v in ref.state_dict().items()}
    full["decode_head.conv_seg.weight"] = torch.zeros(3, 8, 1, 1)
    M.load_backbone(net2, {"state_dict": full})
    want_sd = ref.state_dict()
    for k, v in net2.state_dict().items():
        assert torch.equal(v, want_sd[k]), k


@pytest.mark.parametrize("name", ["ccnet_r50_d8", "isanet_r50_d8", "ann_r50_d8", "ocrnet_r101_d8", "ocrnet_hr18", "ocrnet_hr48"])
def test_segmentor_keys_are_mmseg(name):
    """Every key (and shape) of the whole segmentor is the one mmseg's config builds."""
    ref = _build_mmseg(_mmseg_cfg(name, 19))
    ours = M.build(name, 19)
    want = _shapes(ref.state_dict())
    assert want, name
    assert _shapes(ours.state_dict()) == want


@pytest.mark.parametrize("name", ["ccnet_r18_d8", "isanet_r18_d8", "ann_r18_d8", "ocrnet_r18_d8", "ocrnet_hr18"])
def test_segmentor_loads_mmseg_and_agrees(name):
    """mmseg's segmentor (r18 config; HRNet-W18 OCRNet as configured) -> strict load into ours;
    the decode logits (and the auxiliary / first-stage logits) agree in eval mode, ours on the
    reference backend."""
    K = 5
    ref = _build_mmseg(_mmseg_cfg(name, K))
    randomize(ref)
    ours = M.build(name, K, backend="reference")
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.eval(), ours.eval()
    x = torch.randn(1, 3, 72, 56)  # 9 x 7 features: ISA pads, ANN pools unevenly
    with torch.no_grad():
        feats = ref.extract_feat(x)
        if name.startswith("ocrnet"):
            prev = ref.decode_head[0](feats)
            want_out, want_aux = ref.decode_head[1](feats, prev), prev
        else:
            want_out, want_aux = ref.decode_head(feats), ref.auxiliary_head(feats)
        got = ours(x)
        ours.train()
        for m in ours.modules():  # training outputs without training statistics / dropout
            if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.Dropout2d)):
                m.eval()
        got_train = ours(x)
    assert set(got) == {"out"} and set(got_train) == {"out", "aux"}
    assert_close(got["out"], want_out, atol=1e-4, rtol=1e-4)
    assert_close(got_train["out"], want_out, atol=1e-4, rtol=1e-4)
    assert_close(got_train["aux"], want_aux, atol=1e-4, rtol=1e-4)


def test_isnet_head_is_sssegmentation():
    """sssegmentation's ISNet segmentor (head part, fed the backbone features): its state dict is
    our ``decode_head.*``, loads strictly, and the logits of both stages agree in eval mode."""
    isnet_mod = toolboxes.ssseg_segmentor("isnet")
    K, cin, C, T = 5, 512, 128, 64
    cfg = {
        "type": "ISNet", "num_classes": K, "align_corners": False,
        "norm_cfg": {"type": "BatchNorm2d"}, "act_cfg": {"type": "ReLU", "inplace": True},
        "head": {"in_channels": cin, "feats_channels": C, "transform_channels": T, "concat_input": True,
                 "shortcut": {"is_on": False, "in_channels": 64, "feats_channels": 48}, "dropout": 0.1},
        "auxiliary": None,
    }  # fmt: skip
    ref = isnet_mod.ISNet(cfg, mode="TEST")
    toolboxes.ssseg_given_features(ref)
    randomize(ref)
    ours = M.build("isnet_r18_d8", K, backend="reference")
    head = ours.decode_head
    sd = {k: v for k, v in ref.state_dict().items()}
    assert _shapes(head.state_dict()) == _shapes(sd)
    head.load_state_dict(sd, strict=True)
    ref.eval(), head.eval()
    feats = torch.randn(1, cin, 9, 7)
    with torch.no_grad():
        want = toolboxes.ssseg_logits(ref)(feats)
        got = head([None, None, None, feats])
        # stage 1, as ssseg computes it inside its forward
        want1 = ref.decoder_stage1(ref.bottleneck(feats))
    assert_close(got["out"], want, atol=1e-4, rtol=1e-4)
    assert_close(got["stage1"], want1, atol=1e-4, rtol=1e-4)
