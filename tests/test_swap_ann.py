"""fastctx.swap on mmseg's ANNHead: ``AFNB`` (``fusion``) -> fastctx.nn.AFNB and ``APNB``
(``context``) -> fastctx.nn.APNB, reusing the stages' own projections; and ``FastANNHead``.

Needs mmsegmentation (tests/toolboxes.py; FAILS when missing). Comparisons as in
tests/test_swap_ocr.py (float64: relative error <= 1e-5 against the original; float32:
compare_runs32; output, input and parameter gradients, BN buffers).

Widths: mmseg configs/_base_/models/ann_r50-d8.py (in_channels=[1024, 2048], channels=512,
project_channels=256, query_scales=(1,), key_pool_scales=(1, 3, 6, 8), 19 classes, dropout 0.1)
narrowed to in_channels=[24, 40], channels=32, project_channels=16: the head's 3x3 bottleneck,
which the swap does not touch, would otherwise cost minutes per test on two CPU cores. mmseg
zero-initialises each stage's out_project (the attention would not reach the output): the tests
randomise it.
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
from tests.test_swap import compare_runs, run
from tests.test_swap_ocr import compare_runs32
from tests.toolboxes import randomize

MM_AFNB = "mmseg.models.decode_heads.ann_head.AFNB"
MM_APNB = "mmseg.models.decode_heads.ann_head.APNB"
LOW, HIGH, CH, PROJ = 24, 40, 32, 16  # narrowed (module docstring)
SIZES = [(33, 65), (97, 97)]


@pytest.fixture(scope="module")
def mmseg():
    return toolboxes.mmseg()


def ann_cfg(**overrides) -> dict:
    cfg = dict(  # mmseg configs/_base_/models/ann_r50-d8.py decode_head, narrowed, BN for one process
        type="ANNHead", in_channels=[LOW, HIGH], in_index=[2, 3], channels=CH, project_channels=PROJ,
        query_scales=(1,), key_pool_scales=(1, 3, 6, 8), dropout_ratio=0.1, num_classes=19,
        norm_cfg=dict(type="BN", requires_grad=True), align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    )
    cfg.update(overrides)
    return cfg


def randomize_ann(model: nn.Module) -> None:
    """randomize(), and random out_project weights (mmseg starts them at 0)."""
    randomize(model)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith("out_project"):
                m.weight.normal_(0, 0.3)
                m.bias.normal_(0, 0.1)


def ann_head(**overrides) -> nn.Module:
    from mmseg.registry import MODELS

    head = MODELS.build(ann_cfg(**overrides))
    randomize_ann(head)
    return head


def forward(head):
    """``x = cat([stage 2, stage 3])`` -> logits (in_index=[2, 3])."""
    return lambda t: head([None, None, t[:, :LOW], t[:, LOW:]])


def test_registry_lists_ann():
    assert {MM_AFNB, MM_APNB} <= set(recognisers())


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_mmseg_annhead_swapped_matches(mmseg, size, mode):
    torch.manual_seed(size[0] * 3 + size[1])
    orig = ann_head()
    orig.train(mode == "train")
    x = torch.randn(2, LOW + HIGH, *size, dtype=torch.float64)
    dout = torch.randn(2, 19, *size, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        original = copy.deepcopy(orig).to(dtype)
        want = run(original, x.to(dtype), dout, seed=1, forward=forward(original))
        want64 = want if dtype == torch.float64 else want64
        fast = copy.deepcopy(orig).to(dtype)
        same, report = swap(fast, strict=True)
        assert same is fast
        assert [(e.path, e.original) for e in report.swapped] == [("fusion", MM_AFNB), ("context", MM_APNB)]
        assert type(fast.fusion) is fastctx.nn.AFNB and type(fast.context) is fastctx.nn.APNB
        assert fast.context.stages[0].query_project is fast.context.stages[0].key_project
        got = run(fast, x.to(dtype), dout, seed=1, forward=forward(fast))
        if dtype == torch.float64:
            compare_runs(got, want, dtype, f"ANNHead {size} {mode} {dtype}")
        else:
            compare_runs32(got, want, want64, f"ANNHead {size} {mode} {dtype}")
    # each attention matters to these logits (so the comparison above could fail)
    for block in ("fusion", "context"):
        probe = copy.deepcopy(original)
        with torch.no_grad():
            getattr(probe, block).stages[0].out_project.weight.zero_()
            getattr(probe, block).stages[0].out_project.bias.zero_()
            torch.manual_seed(1)
            without = forward(probe)(x.float())
        assert float((without - want[0]).abs().max()) > 1e-3 * float(want[0].abs().max()), block


def test_swapped_annhead_keeps_parameters_and_loads_checkpoints(mmseg):
    orig = ann_head()
    params = dict(orig.named_parameters())
    keys = list(orig.state_dict())
    fast, _ = swap(copy.copy(orig))
    assert all(p is params[n] for n, p in fast.named_parameters())
    assert list(fast.state_dict()) == keys  # context.stages.0.query_project.* included, as mmseg's
    other = ann_head()
    fast.load_state_dict(other.state_dict(), strict=True)
    back = ann_head()
    back.load_state_dict(fast.state_dict(), strict=True)
    assert all(torch.equal(back.state_dict()[k], other.state_dict()[k]) for k in keys)


def test_ann_structure_differences_are_left_alone(mmseg):
    from mmseg.models.decode_heads.ann_head import AFNB as MmsegAFNB
    from mmseg.models.decode_heads.ann_head import APNB as MmsegAPNB

    bn, relu = dict(type="BN"), dict(type="ReLU")
    scaled = MmsegAPNB(16, 8, 16, (2,), (1, 3), None, bn, relu)  # query_scale=2: mmseg max-pools
    max_pool = MmsegAPNB(16, 8, 16, (1,), (1, 3), None, bn, relu)
    max_pool.stages[0].key_downsample[1] = nn.AdaptiveMaxPool2d(3)
    conv3 = MmsegAFNB(8, 16, 8, 16, (1,), (1, 3), None, bn, relu)
    conv3.stages[0].value_project = nn.Conv2d(8, 8, 3, padding=1)
    rect = MmsegAFNB(8, 16, 8, 16, (1,), (1, 3), None, bn, relu)
    rect.stages[0].key_downsample[0] = nn.AdaptiveAvgPool2d((1, 2))
    model = nn.Sequential(scaled, max_pool, conv3, rect)
    before = list(model)
    with pytest.raises(SwapError, match="recognised modules could not be swapped") as info:
        swap(model, strict=True)
    assert list(model) == before
    reasons = {e.path: e.reason for e in info.value.report.left_alone}
    assert set(reasons) == {"0", "1", "2", "3"}
    assert reasons["0"].startswith("stages.0: submodules") and "'query_downsample'" in reasons["0"]
    assert reasons["1"].startswith("stages.0: key_downsample.1 is AdaptiveMaxPool2d")
    assert "stages.0: value_project is Conv2d(in=8, out=8, kernel=(3, 3)" in reasons["2"]
    assert reasons["3"].startswith("stages.0: key_downsample.0 is AdaptiveAvgPool2d(output_size=(1, 2))")


class APNB(nn.Module):
    """A look-alike: mmseg's class name, defined elsewhere."""

    def forward(self, x):
        return x


def test_ann_look_alike_is_reported_not_touched():
    look = APNB()
    model = nn.Sequential(look)
    _, report = swap(model, strict=True)
    assert model[0] is look and not report.swapped
    [entry] = report.look_alikes
    assert entry.original == f"{__name__}.APNB" and "mmseg.models.decode_heads.ann_head.APNB" in entry.reason


# ---------------------------------------------------------------------------------------------
# the plugin: FastANNHead
# ---------------------------------------------------------------------------------------------


def test_fastannhead_takes_annhead_keys_and_state(mmseg):
    import fastctx.integrations.mmseg  # noqa: F401 (registers the heads)
    from mmseg.models.decode_heads import ANNHead
    from mmseg.registry import MODELS

    original = ann_head()
    fast = MODELS.build(ann_cfg(type="FastANNHead", fastctx_backend="reference"))
    assert isinstance(fast, ANNHead) and type(fast).__name__ == "FastANNHead"
    assert type(fast.fusion) is fastctx.nn.AFNB and fast.fusion.stages[0].backend == "reference"
    assert list(fast.state_dict()) == list(original.state_dict())
    fast.load_state_dict(original.state_dict(), strict=True)
    original.eval()
    fast.eval()
    x = torch.randn(2, LOW + HIGH, 13, 11)
    with torch.no_grad():
        want, got = forward(original)(x), forward(fast)(x)
    assert fastctx.last_backend("pyramid_attention") == "reference"
    assert_close(got, want.double(), torch.float32, "logits")


def test_annnet_config_with_the_plugin_loads_the_original_checkpoint(mmseg, tmp_path):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint
    from mmseg.registry import MODELS

    base = os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs", "ann",
                        "ann_r50-d8_4xb2-40k_cityscapes-512x1024.py")
    original_cfg = Config.fromfile(base)
    original_cfg.model.pretrained = None  # random weights: nothing to download
    # Forget the plugin, so that what registers FastANNHead below is the config's custom_imports.
    sys.modules.pop("fastctx.integrations.mmseg", None)
    MODELS._module_dict.pop("FastANNHead", None)
    user_cfg = tmp_path / "ann_r50-d8_fastctx.py"
    user_cfg.write_text(
        f"_base_ = [{base!r}]\n"
        "custom_imports = dict(imports=['fastctx.integrations.mmseg'], allow_failed_imports=False)\n"
        "model = dict(pretrained=None, decode_head=dict(type='FastANNHead'))\n"
    )
    fast_cfg = Config.fromfile(str(user_cfg))
    assert "FastANNHead" in MODELS.module_dict
    assert fast_cfg.model.decode_head.project_channels == 256

    init_default_scope(fast_cfg.get("default_scope", "mmseg"))
    torch.manual_seed(0)
    original = MODELS.build(original_cfg.model)
    assert type(original.decode_head).__name__ == "ANNHead"
    randomize_ann(original)
    checkpoint = tmp_path / "ann_original.pth"
    torch.save({"meta": {}, "state_dict": original.state_dict()}, checkpoint)

    fast = MODELS.build(fast_cfg.model)
    assert type(fast.decode_head).__name__ == "FastANNHead"
    load_checkpoint(fast, str(checkpoint), map_location="cpu", strict=True)
    original.eval()
    fast.eval()
    image = torch.randn(1, 3, 65, 97)  # a 9x13 feature map at output stride 8
    with torch.no_grad():
        want = original(image, mode="tensor")
        got = fast(image, mode="tensor")
        assert got.shape == (1, 19, 9, 13)
        assert_close(got, want.double(), torch.float32, "logits")
        fast.decode_head.context.stages[0].out_project.weight.zero_()  # the attention matters here
        fast.decode_head.context.stages[0].out_project.bias.zero_()
        without = fast(image, mode="tensor")
    assert float((without - want).abs().max()) > 1e-3 * float(want.abs().max())
