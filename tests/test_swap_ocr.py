"""fastctx.swap on mmseg's OCRHead: ``SpatialGatherModule`` -> fastctx.nn.SpatialGather and
``ObjectAttentionBlock`` -> fastctx.nn.ObjectAttention (reusing the block's own ConvModules), and
the plugin head ``FastOCRHead``.

Needs mmsegmentation (tests/toolboxes.py; FAILS when missing). Comparisons (output, input and
parameter gradients, BN buffers): float64 as in tests/test_swap.py (relative error <= 1e-5
against the original); float32 by :func:`compare_runs32` (against the original in float32, the
float32 row of fastctx.testing, or, where that row is beaten by rounding in long sums, no more
than F32_FACTOR times the original's own float32 error off the float64 result, or, after a ReLU
flip in train mode, within F32_FLIP of the float64 result's largest element).

Widths: the module test uses mmseg's Cityscapes OCRNet widths (configs/_base_/models/
ocrnet_r50-d8.py: OCRHead channels=512, ocr_channels=256, 19 classes). The cascade tests (the
FCNHead auxiliary feeding OCRHead, as in that config) take every other key from the config but
narrow FCNHead in_channels 1024 -> 24, channels 256 -> 16 and OCRHead in_channels 2048 -> 32,
channels 512 -> 24, ocr_channels 256 -> 12: the heads' 3x3 convolutions, which the swap does not
touch, would otherwise cost minutes per test on two CPU cores.
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch import nn

import fastctx
from fastctx.swap import SwapError, recognisers, swap
from tests import toolboxes
from tests._utils import assert_close
from tests.test_swap import check, compare_runs, run
from tests.toolboxes import randomize

SGM = "mmseg.models.decode_heads.ocr_head.SpatialGatherModule"
OAB = "mmseg.models.decode_heads.ocr_head.ObjectAttentionBlock"
FAST_SG = "fastctx.nn.ocr.SpatialGather"
FAST_OA = "fastctx.nn.ocr.ObjectAttention"
SIZES = [(33, 65), (97, 97)]
AUX_IN, AUX_CH, OCR_IN, OCR_CH, OCR_OCR = 24, 16, 32, 24, 12  # narrowed (module docstring)


@pytest.fixture(scope="module")
def mmseg():
    return toolboxes.mmseg()


#: A float32 tensor of the swapped model may miss the float32 row of fastctx.testing against the
#: original's float32 result when both are long sums that cancel (the gradients of the key and
#: value projections: sums over B * H * W pixels). It must then be at most F32_FACTOR times as far
#: from the float64 result as the original's float32 result is (measured worst: 4.3x, the
#: value projection's BN weight of the OCR cascade at 33x65, at 6.7e-7 of its largest element).
#: As in tests/test_swap.py, an expected gradient at noise level (1e-4 of the largest quantity
#: compared) need only be matched to that level.
F32_FACTOR = 8.0
#: In train mode a ReLU after a batch-statistics BN whose float32 input rounds across 0 in one
#: model and not the other passes or blocks one gradient element, and every gradient upstream of
#: it moves (measured: the OCR cascade at 97x97 in train mode, one such flip in the
#: object-context bottleneck: its BN bias gradient 0.6 off of 146, the input gradient 0.10 off of
#: 5.1, while the swapped model's float64 run matches the original to 1e-5). A float32 tensor
#: beyond both rules above must then still be within F32_FLIP of its largest float64 element.
#: This is a loose bound: the float64 comparison is the exactness test.
F32_FLIP = 5e-2


def compare_runs32(got, want32, want64, what):
    """``got`` (swapped, float32) against ``want32`` (original, float32) and ``want64`` (original,
    float64): outputs, gradients and buffers; see F32_FACTOR."""
    names = [("output", got[0], want32[0], want64[0])]
    assert got[1].keys() == want32[1].keys() == want64[1].keys()
    names += [(f"grad {n}", got[1][n], want32[1][n], want64[1][n]) for n in want64[1]]
    assert got[2].keys() == want32[2].keys()
    for n in want64[2]:
        if not want64[2][n].is_floating_point():
            assert torch.equal(got[2][n], want32[2][n]), f"{what} buffer {n}"
        else:
            names.append((f"buffer {n}", got[2][n], want32[2][n], want64[2][n]))
    scale = max(float(t.abs().max()) for t in [want32[0], *want32[1].values()])
    for name, g, w32, w64 in names:
        assert g is not None, f"{what}: no {name}"
        try:
            check(g, w32, torch.float32, f"{what} {name}", scale if not name.startswith("buffer") else 0.0)
        except (AssertionError, pytest.fail.Exception) as row:
            e_orig = float((w32.double() - w64).abs().max())
            e_fast = float((g.double() - w64).abs().max())
            assert e_fast <= F32_FACTOR * e_orig or e_fast <= F32_FLIP * float(w64.abs().max()), (
                f"{what} {name}: {e_fast:.3g} off float64, more than {F32_FACTOR} x the original's "
                f"float32 error {e_orig:.3g}; {row}")


def paths(report):
    return [(e.path, e.original, e.replacement) for e in report.swapped]


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
    for dtype in (torch.float64, torch.float32):
        original = copy.deepcopy(orig).to(dtype)
        want = run(original, x.to(dtype), dout, seed=0)
        want64 = want if dtype == torch.float64 else want64
        fast = copy.deepcopy(orig).to(dtype)
        same, report = swap(fast, strict=True)
        assert same is fast
        assert paths(report) == [("gather", SGM, FAST_SG), ("block", OAB, FAST_OA)]
        assert type(fast.gather) is fastctx.nn.SpatialGather and type(fast.block) is fastctx.nn.ObjectAttention
        assert fast.training == (mode == "train") and fast.block.training == (mode == "train")
        got = run(fast, x.to(dtype), dout, seed=0)
        if dtype == torch.float64:
            compare_runs(got, want, dtype, f"OCR modules {mode} {dtype}")
        else:
            compare_runs32(got, want, want64, f"OCR modules {mode} {dtype}")
    # the attention reaches the output (so the comparison above could fail)
    with torch.no_grad():
        original.block.out_project.bn.weight.zero_()
        original.block.out_project.bn.bias.zero_()
        original.eval()
        without = original(x.float())
    assert float((without - want[0]).abs().max()) > 1e-3 * float(want[0].abs().max())


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
    with pytest.raises(SwapError, match="recognised modules could not be swapped") as info:
        swap(model, strict=True)
    assert list(model) == before
    report = info.value.report
    reasons = {e.path: e.reason for e in report.left_alone}
    assert set(reasons) == {"0", "1", "2", "3", "4", "5", "6"} and not report.swapped
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
    look = SpatialGatherModule()
    model = nn.Sequential(look)
    _, report = swap(model, strict=True)
    assert model[0] is look and not report.swapped
    [entry] = report.look_alikes
    assert entry.original == f"{__name__}.SpatialGatherModule" and SGM in entry.reason


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
    for dtype in (torch.float64, torch.float32):
        original = copy.deepcopy(orig).to(dtype)
        want = run(original, x.to(dtype), dout, seed=1, forward=cascade_forward(original))
        want64 = want if dtype == torch.float64 else want64
        fast = copy.deepcopy(orig).to(dtype)
        _, report = swap(fast, strict=True)
        assert paths(report) == [("1.object_context_block", OAB, FAST_OA),
                                 ("1.spatial_gather_module", SGM, FAST_SG)]
        got = run(fast, x.to(dtype), dout, seed=1, forward=cascade_forward(fast))
        if dtype == torch.float64:
            compare_runs(got, want, dtype, f"OCR cascade {size} {mode} {dtype}")
        else:
            compare_runs32(got, want, want64, f"OCR cascade {size} {mode} {dtype}")
    # the object attention matters to the OCR logits
    with torch.no_grad():
        block = original[1].object_context_block
        block.out_project.bn.weight.zero_()
        block.out_project.bn.bias.zero_()
        torch.manual_seed(1)
        without = cascade_forward(original)(x.float())
    assert float((without - want[0]).abs().max()) > 1e-3 * float(want[0].abs().max())


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
    assert list(fast.state_dict()) == list(original.state_dict())
    fast.load_state_dict(original.state_dict(), strict=True)
    original.eval()
    fast.eval()
    x = [torch.randn(2, OCR_IN, 13, 11)] * 4
    prev = torch.randn(2, 19, 13, 11)
    with torch.no_grad():
        want, got = original(x, prev), fast(x, prev)
    assert fastctx.last_backend("region_attention") == "reference"
    assert_close(got, want.double(), torch.float32, "logits")
    with pytest.raises(SwapError, match="query_downsample"):  # scale=2: mmseg's block max-pools
        MODELS.build({**cfg, "type": "FastOCRHead", "scale": 2})


def test_ocrnet_config_with_the_plugin_loads_the_original_checkpoint(mmseg, tmp_path):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint
    from mmseg.registry import MODELS

    base = os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs", "ocrnet",
                        "ocrnet_hr18s_4xb2-40k_cityscapes-512x1024.py")  # the smallest Cityscapes OCRNet
    original_cfg = Config.fromfile(base)
    original_cfg.model.pretrained = None  # random weights: nothing to download
    heads = [d.to_dict() for d in original_cfg.model.decode_head]
    assert [h["type"] for h in heads] == ["FCNHead", "OCRHead"]
    heads[1]["type"] = "FastOCRHead"
    # Forget the plugin, so that what registers FastOCRHead below is the config's custom_imports.
    sys.modules.pop("fastctx.integrations.mmseg", None)
    MODELS._module_dict.pop("FastOCRHead", None)
    user_cfg = tmp_path / "ocrnet_r50-d8_fastctx.py"
    user_cfg.write_text(
        f"_base_ = [{base!r}]\n"
        "custom_imports = dict(imports=['fastctx.integrations.mmseg'], allow_failed_imports=False)\n"
        f"model = dict(pretrained=None, decode_head={heads!r})\n"
    )
    fast_cfg = Config.fromfile(str(user_cfg))
    assert "FastOCRHead" in MODELS.module_dict
    assert fast_cfg.model.decode_head[1].ocr_channels == 256 and fast_cfg.model.decode_head[1].channels == 512
    assert fast_cfg.model.decode_head[1].type == "FastOCRHead"

    init_default_scope(fast_cfg.get("default_scope", "mmseg"))
    torch.manual_seed(0)
    original = MODELS.build(original_cfg.model)
    assert type(original.decode_head[1]).__name__ == "OCRHead"
    randomize(original)
    checkpoint = tmp_path / "ocrnet_original.pth"
    torch.save({"meta": {}, "state_dict": original.state_dict()}, checkpoint)

    fast = MODELS.build(fast_cfg.model)
    assert type(fast.decode_head[1]).__name__ == "FastOCRHead"
    assert type(fast.decode_head[1].object_context_block) is fastctx.nn.ObjectAttention
    load_checkpoint(fast, str(checkpoint), map_location="cpu", strict=True)
    original.eval()
    fast.eval()
    image = torch.randn(1, 3, 65, 97)  # a 17x25 feature map at HRNet's output stride 4
    with torch.no_grad():
        want = original(image, mode="tensor")
        got = fast(image, mode="tensor")
        assert got.shape == (1, 19, 17, 25)
        assert_close(got, want.double(), torch.float32, "logits")
        block = fast.decode_head[1].object_context_block  # the object attention matters here
        block.out_project.bn.weight.zero_()
        block.out_project.bn.bias.zero_()
        without = fast(image, mode="tensor")
    assert float((without - want).abs().max()) > 1e-3 * float(want.abs().max())
