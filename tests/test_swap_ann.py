"""fastctx.swap on mmseg's ANNHead: ``AFNB`` (``fusion``) -> fastctx.nn.AFNB and ``APNB``
(``context``) -> fastctx.nn.APNB, reusing the stages' own projections; and ``FastANNHead``.

Needs mmsegmentation (tests/toolboxes.py; FAILS when missing). Comparisons by
tests/swap_support.py's ``parity`` (float64: relative error <= 1e-5 against the original;
float32: compare_runs32; output, input and parameter gradients, BN buffers).

Widths: mmseg configs/_base_/models/ann_r50-d8.py (in_channels=[1024, 2048], channels=512,
project_channels=256, query_scales=(1,), key_pool_scales=(1, 3, 6, 8), 19 classes, dropout 0.1)
narrowed to in_channels=[24, 40], channels=32, project_channels=16: the head's 3x3 bottleneck,
which the swap does not touch, would otherwise cost minutes per test on two CPU cores. mmseg
zero-initialises each stage's out_project (the attention would not reach the output): the tests
randomise it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastctx
from fastctx.swap import recognisers, swap
from tests.swap_support import (
    assert_look_alike_left_alone, assert_matters, assert_plugin_head_matches, assert_same_logits,
    left_alone_reasons, original_and_plugin_models, parity, plugin_configs,
)
from tests.swap_support import mmseg_fixture  # noqa: F401 (the fixture "mmseg")
from tests.toolboxes import randomize

MM_AFNB = "mmseg.models.decode_heads.ann_head.AFNB"
MM_APNB = "mmseg.models.decode_heads.ann_head.APNB"
FAST_AFNB = "fastctx.nn.ann.AFNB"
FAST_APNB = "fastctx.nn.ann.APNB"
LOW, HIGH, CH, PROJ = 24, 40, 32, 16  # narrowed (module docstring)
SIZES = [(33, 65), (97, 97)]


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

    def swapped(fast):
        assert type(fast.fusion) is fastctx.nn.AFNB and type(fast.context) is fastctx.nn.APNB
        assert fast.context.stages[0].query_project is fast.context.stages[0].key_project

    original, want = parity(orig, x, dout, 1, forward, [("fusion", MM_AFNB, FAST_AFNB), ("context", MM_APNB, FAST_APNB)],
                            f"ANNHead {size} {mode}", swapped)
    # each attention matters to these logits (so the comparison above could fail)
    for block in ("fusion", "context"):
        probe = copy.deepcopy(original)
        out_project = getattr(probe, block).stages[0].out_project
        assert_matters([out_project.weight, out_project.bias], lambda: forward(probe)(x.float()), want[0], seed=1)


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
    reasons = left_alone_reasons(nn.Sequential(scaled, max_pool, conv3, rect))
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
    assert_look_alike_left_alone(APNB(), MM_APNB)


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
    x = torch.randn(2, LOW + HIGH, 13, 11)
    assert_plugin_head_matches(original, fast, ([None, None, x[:, :LOW], x[:, LOW:]],), "pyramid_attention")


def test_annnet_config_with_the_plugin_loads_the_original_checkpoint(mmseg, tmp_path):
    original_cfg, fast_cfg = plugin_configs(mmseg, tmp_path, "ann/ann_r50-d8_4xb2-40k_cityscapes-512x1024.py",
                                            "FastANNHead", dict(type="FastANNHead"))
    assert fast_cfg.model.decode_head.project_channels == 256
    original, fast = original_and_plugin_models(original_cfg, fast_cfg, tmp_path, randomize_ann)
    assert type(original.decode_head).__name__ == "ANNHead"
    assert type(fast.decode_head).__name__ == "FastANNHead"
    image = torch.randn(1, 3, 65, 97)  # a 9x13 feature map at output stride 8
    out_project = fast.decode_head.context.stages[0].out_project  # the attention matters here
    assert_same_logits(original, fast, image, (1, 19, 9, 13), [out_project.weight, out_project.bias])
