"""fastctx.swap on mmseg's OCRHead: ``SpatialGatherModule`` -> fastctx.nn.SpatialGather and
``ObjectAttentionBlock`` -> fastctx.nn.ObjectAttention (reusing the block's own ConvModules), and
the plugin head ``FastOCRHead``.

Needs mmsegmentation (tests/toolboxes.py; FAILS when missing). Comparisons (output, input and
parameter gradients, BN buffers) by tests/swap_support.py's ``parity``: float64 relative error
<= 1e-5 against the original; float32 by ``compare_runs32`` (against the original in float32,
the float32 row of fastctx.testing, with the fallbacks documented there).

Widths: the module test uses mmseg's Cityscapes OCRNet widths (configs/_base_/models/
ocrnet_r50-d8.py: OCRHead channels=512, ocr_channels=256, 19 classes). The cascade tests (the
FCNHead auxiliary feeding OCRHead, as in that config) take every other key from the config but
narrow FCNHead in_channels 1024 -> 24, channels 256 -> 16 and OCRHead in_channels 2048 -> 32,
channels 512 -> 24, ocr_channels 256 -> 12: the heads' 3x3 convolutions, which the swap does not
touch, would otherwise cost minutes per test on two CPU cores.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastctx
from fastctx.swap import SwapError, recognisers, swap
from tests.swap_support import (
    assert_look_alike_left_alone, assert_matters, assert_plugin_head_matches, assert_same_logits,
    left_alone_reasons, mmseg_config, original_and_plugin_models, parity, plugin_configs,
)
from tests.swap_support import mmseg_fixture  # noqa: F401 (the fixture "mmseg")
from tests.toolboxes import randomize

SGM = "mmseg.models.decode_heads.ocr_head.SpatialGatherModule"
OAB = "mmseg.models.decode_heads.ocr_head.ObjectAttentionBlock"
FAST_SG = "fastctx.nn.ocr.SpatialGather"
FAST_OA = "fastctx.nn.ocr.ObjectAttention"
SIZES = [(33, 65), (97, 97)]
AUX_IN, AUX_CH, OCR_IN, OCR_CH, OCR_OCR = 24, 16, 32, 24, 12  # narrowed (module docstring)


def test_registry_lists_ocr():
    assert {SGM, OAB} <= set(recognisers())


# ---------------------------------------------------------------------------------------------
# the two modules, at the Cityscapes widths
# ---------------------------------------------------------------------------------------------


class GatherThenAttend(nn.Module):
    """OCRHead's use of the two modules: ``object_context_block(feats, spatial_gather_module(
    feats, probs))``; the input is ``cat([feats, probs])``."""

    def __init__(self, channels: int, ocr_channels: int) -> None:
        super().__init__()
        from mmseg.models.decode_heads.ocr_head import ObjectAttentionBlock, SpatialGatherModule

        self.channels = channels
        self.gather = SpatialGatherModule(1)
        self.block = ObjectAttentionBlock(channels, ocr_channels, 1, conv_cfg=None,
                                          norm_cfg=dict(type="BN", requires_grad=True),
                                          act_cfg=dict(type="ReLU"))

    def forward(self, x):
        feats, probs = x[:, : self.channels], x[:, self.channels:]
        return self.block(feats, self.gather(feats, probs))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_ocr_modules_swapped_match(mmseg, mode):
    torch.manual_seed(3)
    orig = GatherThenAttend(512, 256)
    randomize(orig)
    orig.train(mode == "train")
    x = torch.randn(2, 512 + 19, 33, 65, dtype=torch.float64)
    x[:, 512:] *= 3  # logits of a few units: a peaked softmax over the pixels
    dout = torch.randn(2, 512, 33, 65, dtype=torch.float64)

    def swapped(fast):
        assert type(fast.gather) is fastctx.nn.SpatialGather and type(fast.block) is fastctx.nn.ObjectAttention
        assert fast.training == (mode == "train") and fast.block.training == (mode == "train")

    original, want = parity(orig, x, dout, 0, lambda m: m, [("gather", SGM, FAST_SG), ("block", OAB, FAST_OA)],
                            f"OCR modules {mode}", swapped)
    # the attention reaches the output (so the comparison above could fail)
    bn = original.block.out_project.bn
    assert_matters([bn.weight, bn.bias], lambda: original(x.float()), want[0], seed=0)


def test_swapped_block_holds_no_extra_map_at_its_inference_peak(mmseg):
    """Under no_grad the swapped ObjectAttention's peak is the original block's: its queries and
    the attention's output are freed before out_project and the bottleneck run, as mmseg's block
    frees them (held as locals they added one [B, Cc, H, W] map: 210 vs 194 MiB at OCRNet's size)."""
    from fastctx.bench.measure import peak_mib

    torch.manual_seed(0)
    B, C, Cc, K, H, W = 2, 64, 32, 19, 33, 65
    orig = GatherThenAttend(C, Cc).block
    fast, _ = swap(copy.deepcopy(orig))
    assert type(fast) is fastctx.nn.ObjectAttention
    feats, regions = torch.randn(B, C, H, W), torch.randn(B, C, K, 1)
    peaks = {}
    with torch.no_grad():  # peak_mib: after a warm-up call, the allocator's record of one call
        for name, m in (("original", orig), ("swapped", fast)):
            peaks[name] = peak_mib(lambda m=m: m(feats, regions), torch.device("cpu"))
    query_map = B * Cc * H * W * 4 / 2**20
    assert peaks["swapped"] - peaks["original"] < query_map / 2, (peaks, query_map)


def test_swapped_block_keeps_the_same_parameters_and_state_dict(mmseg):
    orig = GatherThenAttend(40, 12)
    randomize(orig)
    params = dict(orig.named_parameters())
    keys = list(orig.state_dict())
    opt = torch.optim.SGD(orig.parameters(), lr=0.1)
    fast, _ = swap(copy.copy(orig))  # shallow: the swap rewrites only the copy's slots
    assert type(fast.block) is fastctx.nn.ObjectAttention
    assert all(p is params[n] for n, p in fast.named_parameters())  # the optimiser still holds them
    assert fast.block.key_project is orig.block.key_project and fast.block.bottleneck is orig.block.bottleneck
    assert list(fast.state_dict()) == keys
    # the original's checkpoint loads into the swapped model and back
    other = copy.deepcopy(orig)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1)
    fast.load_state_dict(other.state_dict(), strict=True)
    assert all(torch.equal(orig.state_dict()[k], other.state_dict()[k]) for k in keys)
    back = GatherThenAttend(40, 12)
    back.load_state_dict(fast.state_dict(), strict=True)
    assert all(torch.equal(back.state_dict()[k], other.state_dict()[k]) for k in keys)
    del opt


# ---------------------------------------------------------------------------------------------
# structure differences and look-alikes
# ---------------------------------------------------------------------------------------------


def test_ocr_structure_differences_are_left_alone(mmseg):
    from mmcv.cnn import ConvModule
    from mmseg.models.decode_heads.ocr_head import ObjectAttentionBlock, SpatialGatherModule

    bn = dict(type="BN")
    downsampled = ObjectAttentionBlock(16, 8, 2, None, bn, dict(type="ReLU"))  # scale=2: MaxPool queries
    wide_value = ObjectAttentionBlock(16, 8, 1, None, bn, dict(type="ReLU"))
    wide_value.value_project = ConvModule(16, 8, 3, padding=1, norm_cfg=bn)  # a 3x3 projection
    three_keys = ObjectAttentionBlock(16, 8, 1, None, bn, dict(type="ReLU"))
    three_keys.key_project.append(ConvModule(8, 8, 1, norm_cfg=bn))
    plain_conv = ObjectAttentionBlock(16, 8, 1, None, bn, dict(type="ReLU"))
    plain_conv.out_project = nn.Conv2d(8, 16, 1)
    no_matmul_norm = ObjectAttentionBlock(16, 8, 1, None, bn, dict(type="ReLU"))
    no_matmul_norm.matmul_norm = False
    model = nn.Sequential(downsampled, wide_value, three_keys, plain_conv, no_matmul_norm,
                          SpatialGatherModule(0), SpatialGatherModule(-1.5))
    before = list(model)
    reasons = left_alone_reasons(model)
    assert set(reasons) == {"0", "1", "2", "3", "4", "5", "6"}
    assert "query_downsample" in reasons["0"]
    assert "value_project.conv is Conv2d(in=16, out=8, kernel=(3, 3)" in reasons["1"]
    assert "key_project holds 3 modules, expected 2" in reasons["2"]
    assert "out_project is torch.nn.modules.conv.Conv2d, expected " + "mmcv.cnn.bricks.conv_module.ConvModule" in reasons["3"]
    assert "matmul_norm is False, expected True" in reasons["4"]
    assert reasons["5"] == "scale is 0, expected a positive number"
    assert reasons["6"] == "scale is -1.5, expected a positive number"
    _, report = swap(model)  # not strict: reported, left alone
    assert list(model) == before and len(report.left_alone) == 7


class SpatialGatherModule(nn.Module):
    """A look-alike: mmseg's class name, defined elsewhere."""

    scale = 1

    def forward(self, feats, probs):
        return feats


def test_ocr_look_alike_is_reported_not_touched():
    assert_look_alike_left_alone(SpatialGatherModule(), SGM)


# ---------------------------------------------------------------------------------------------
# OCRHead with its FCNHead auxiliary (mmseg's Cityscapes OCRNet cascade), narrowed
# ---------------------------------------------------------------------------------------------


def ocr_cascade() -> nn.ModuleList:
    """``[FCNHead, OCRHead]`` from mmseg configs/_base_/models/ocrnet_r50-d8.py (BN for one
    process), narrowed (see the module docstring)."""
    from mmseg.registry import MODELS

    norm_cfg = dict(type="BN", requires_grad=True)
    aux = MODELS.build(dict(
        type="FCNHead", in_channels=AUX_IN, in_index=2, channels=AUX_CH, num_convs=1,
        concat_input=False, dropout_ratio=0.1, num_classes=19, norm_cfg=norm_cfg, align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4)))
    ocr = MODELS.build(dict(
        type="OCRHead", in_channels=OCR_IN, in_index=3, channels=OCR_CH, ocr_channels=OCR_OCR,
        dropout_ratio=0.1, num_classes=19, norm_cfg=norm_cfg, align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)))
    heads = nn.ModuleList([aux, ocr])
    randomize(heads)
    return heads


def cascade_forward(heads):
    """``x = cat([stage 2, stage 3])`` -> ``cat([auxiliary logits, OCR logits])``, as
    CascadeEncoderDecoder runs them."""

    def forward(x):
        inputs = [None, None, x[:, :AUX_IN], x[:, AUX_IN:]]
        aux = heads[0](inputs)
        return torch.cat([aux, heads[1](inputs, aux)], dim=1)

    return forward


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_mmseg_ocr_cascade_swapped_matches(mmseg, size, mode):
    torch.manual_seed(size[0] + size[1])
    orig = ocr_cascade()
    orig.train(mode == "train")
    x = torch.randn(2, AUX_IN + OCR_IN, *size, dtype=torch.float64)
    dout = torch.randn(2, 38, *size, dtype=torch.float64)
    original, want = parity(orig, x, dout, 1, cascade_forward,
                            [("1.object_context_block", OAB, FAST_OA), ("1.spatial_gather_module", SGM, FAST_SG)],
                            f"OCR cascade {size} {mode}")
    # the object attention matters to the OCR logits
    bn = original[1].object_context_block.out_project.bn
    assert_matters([bn.weight, bn.bias], lambda: cascade_forward(original)(x.float()), want[0], seed=1)


# ---------------------------------------------------------------------------------------------
# the plugin: FastOCRHead
# ---------------------------------------------------------------------------------------------


def test_fastocrhead_takes_ocrhead_keys_and_state(mmseg):
    import fastctx.integrations.mmseg  # noqa: F401 (registers the heads)
    from mmseg.models.decode_heads import OCRHead
    from mmseg.registry import MODELS

    cfg = dict(type="OCRHead", in_channels=OCR_IN, in_index=3, channels=OCR_CH, ocr_channels=OCR_OCR,
               dropout_ratio=0.1, num_classes=19, norm_cfg=dict(type="BN", requires_grad=True),
               align_corners=False)
    original = MODELS.build(cfg)
    randomize(original)
    fast = MODELS.build({**cfg, "type": "FastOCRHead", "fastctx_backend": "reference"})
    assert isinstance(fast, OCRHead) and type(fast).__name__ == "FastOCRHead"
    assert type(fast.object_context_block) is fastctx.nn.ObjectAttention
    assert type(fast.spatial_gather_module) is fastctx.nn.SpatialGather
    assert fast.object_context_block.backend == "reference" == fast.spatial_gather_module.backend
    inputs = ([torch.randn(2, OCR_IN, 13, 11)] * 4, torch.randn(2, 19, 13, 11))
    assert_plugin_head_matches(original, fast, inputs, "region_attention")
    with pytest.raises(SwapError, match="query_downsample"):  # scale=2: mmseg's block max-pools
        MODELS.build({**cfg, "type": "FastOCRHead", "scale": 2})


def test_ocrnet_config_with_the_plugin_loads_the_original_checkpoint(mmseg, tmp_path):
    from mmengine.config import Config

    config = "ocrnet/ocrnet_hr18s_4xb2-40k_cityscapes-512x1024.py"  # the smallest Cityscapes OCRNet
    heads = [d.to_dict() for d in Config.fromfile(mmseg_config(mmseg, config)).model.decode_head]
    assert [h["type"] for h in heads] == ["FCNHead", "OCRHead"]
    heads[1]["type"] = "FastOCRHead"
    original_cfg, fast_cfg = plugin_configs(mmseg, tmp_path, config, "FastOCRHead", heads)
    assert fast_cfg.model.decode_head[1].ocr_channels == 256 and fast_cfg.model.decode_head[1].channels == 512
    assert fast_cfg.model.decode_head[1].type == "FastOCRHead"
    original, fast = original_and_plugin_models(original_cfg, fast_cfg, tmp_path, randomize)
    assert type(original.decode_head[1]).__name__ == "OCRHead"
    assert type(fast.decode_head[1]).__name__ == "FastOCRHead"
    assert type(fast.decode_head[1].object_context_block) is fastctx.nn.ObjectAttention
    image = torch.randn(1, 3, 65, 97)  # a 17x25 feature map at HRNet's output stride 4
    bn = fast.decode_head[1].object_context_block.out_project.bn  # the object attention matters here
    assert_same_logits(original, fast, image, (1, 19, 17, 25), [bn.weight, bn.bias])
