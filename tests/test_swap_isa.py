"""fastctx.swap on mmseg's ISAHead: the head becomes a subclass of ISAHead holding the same
submodules, its ``global_relation`` / ``local_relation`` rebuilt as fastctx
ISASelfAttentionBlocks around the original projections, its padding/permute forward replaced by
the fused interlaced attention; and the plugin head ``FastISAHead``.

Needs mmsegmentation (tests/toolboxes.py; FAILS when missing). Comparisons as in
tests/test_swap_ocr.py (float64: relative error <= 1e-5 against the original; float32:
compare_runs32; output, input and parameter gradients, BN buffers).

Widths: mmseg configs/_base_/models/isanet_r50-d8.py (ISAHead channels=512, isa_channels=256,
down_factor=(8, 8), 19 classes, dropout 0.1) with in_channels narrowed 2048 -> 32 (the 3x3
in_conv, which the swap does not touch, would cost minutes on two CPU cores). The 33x65 run keeps
the Cityscapes channels=512 / isa_channels=256; the 97x97 run narrows them to 48 / 24. Both sizes
need padding to multiples of 8 (40x72, 104x104), which mmseg's forward and fastctx's must agree on.
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

ISA = "mmseg.models.decode_heads.isa_head.ISAHead"
FAST_ISA = "fastctx.swap.FastISAHead"
IN = 32  # narrowed from 2048


@pytest.fixture(scope="module")
def mmseg():
    return toolboxes.mmseg()


def isa_cfg(**overrides) -> dict:
    cfg = dict(  # mmseg configs/_base_/models/isanet_r50-d8.py decode_head, BN for one process
        type="ISAHead", in_channels=IN, in_index=3, channels=512, isa_channels=256, down_factor=(8, 8),
        dropout_ratio=0.1, num_classes=19, norm_cfg=dict(type="BN", requires_grad=True),
        align_corners=False, loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    )
    cfg.update(overrides)
    return cfg


def isa_head(**overrides) -> nn.Module:
    from mmseg.registry import MODELS

    head = MODELS.build(isa_cfg(**overrides))
    randomize(head)
    return head


def forward(head):
    return lambda t: head([t, t, t, t])  # in_index=3 of the backbone's 4 stages


def test_registry_lists_isa():
    assert ISA in recognisers()


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("size,channels,isa_channels", [((33, 65), 512, 256), ((97, 97), 48, 24)],
                         ids=["33x65", "97x97"])
def test_mmseg_isahead_swapped_matches(mmseg, size, channels, isa_channels, mode):
    from mmseg.models.decode_heads import ISAHead

    torch.manual_seed(size[0] + channels)
    orig = isa_head(channels=channels, isa_channels=isa_channels)
    orig.train(mode == "train")
    batch = 1 if channels == 512 else 2  # one image at the full width: ~15 s a mode instead of ~30
    x = torch.randn(batch, IN, *size, dtype=torch.float64)
    dout = torch.randn(batch, 19, *size, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        original = copy.deepcopy(orig).to(dtype)
        want = run(original, x.to(dtype), dout, seed=1, forward=forward(original))
        want64 = want if dtype == torch.float64 else want64
        fast, report = swap(copy.deepcopy(orig).to(dtype), strict=True)
        assert [(e.path, e.original, e.replacement) for e in report.swapped] == [("", ISA, FAST_ISA)]
        assert isinstance(fast, ISAHead) and fast.training == (mode == "train")
        assert type(fast.global_relation) is fastctx.nn.interlaced.ISASelfAttentionBlock
        got = run(fast, x.to(dtype), dout, seed=1, forward=forward(fast))
        if dtype == torch.float64:
            compare_runs(got, want, dtype, f"ISAHead {size} {mode} {dtype}")
        else:
            compare_runs32(got, want, want64, f"ISAHead {size} {mode} {dtype}")
    # the attention matters to these logits (so the comparison above could fail)
    with torch.no_grad():
        for rel in (original.global_relation, original.local_relation):
            rel.output_project.bn.weight.zero_()
            rel.output_project.bn.bias.zero_()
        torch.manual_seed(1)
        without = forward(original)(x.float())
    assert float((without - want[0]).abs().max()) > 1e-3 * float(want[0].abs().max())


def test_swapped_isahead_shares_state_and_loads_checkpoints(mmseg):
    orig = isa_head(channels=24, isa_channels=8)
    params = dict(orig.named_parameters())
    keys = list(orig.state_dict())
    seen = []
    handle = orig.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    fast, _ = swap(orig)
    assert fast is not orig and type(orig).__name__ == "ISAHead"  # the original object is untouched
    assert orig.global_relation is not fast.global_relation
    assert fast.in_conv is orig.in_conv and fast.global_relation.key_project is orig.global_relation.key_project
    assert all(p is params[n] for n, p in fast.named_parameters())
    assert list(fast.state_dict()) == keys
    fast.eval()
    with torch.no_grad():
        fast([torch.randn(1, IN, 9, 13)] * 4)
    assert seen == [(1, 19, 9, 13)]  # hooks carry over
    handle.remove()
    other = isa_head(channels=24, isa_channels=8)  # another random head: its checkpoint loads
    fast.load_state_dict(other.state_dict(), strict=True)
    back = isa_head(channels=24, isa_channels=8)
    back.load_state_dict(fast.state_dict(), strict=True)
    assert all(torch.equal(back.state_dict()[k], other.state_dict()[k]) for k in keys)
    # a model holding the head: the slot is rewritten
    model = nn.ModuleDict({"decode_head": isa_head(channels=24, isa_channels=8)})
    same, report = swap(model)
    assert same is model and type(model["decode_head"]).__qualname__ == "FastISAHead"
    assert [e.path for e in report.swapped] == ["decode_head"]


def test_isa_structure_differences_are_left_alone(mmseg):
    conv3 = isa_head(channels=16, isa_channels=8)
    conv3.global_relation.value_project = nn.Conv2d(16, 16, 3, padding=1)
    shared = isa_head(channels=16, isa_channels=8)
    shared.local_relation.query_project = shared.local_relation.key_project
    shared.local_relation.share_key_query = True
    no_norm = isa_head(channels=16, isa_channels=8)
    no_norm.global_relation.matmul_norm = False
    odd_down = isa_head(channels=16, isa_channels=8, down_factor=(8, 0))
    patched = isa_head(channels=16, isa_channels=8)
    patched.forward = lambda inputs: inputs
    model = nn.Sequential(conv3, shared, no_norm, odd_down, patched)
    before = list(model)
    with pytest.raises(SwapError, match="recognised modules could not be swapped") as info:
        swap(model, strict=True)
    assert list(model) == before
    reasons = {e.path: e.reason for e in info.value.report.left_alone}
    assert set(reasons) == {"0", "1", "2", "3", "4"}
    assert "global_relation: value_project is Conv2d(in=16, out=16, kernel=(3, 3)" in reasons["0"]
    assert reasons["1"] == "local_relation: share_key_query is True, expected False"
    assert reasons["2"] == "global_relation: matmul_norm is False, expected True"
    assert reasons["3"] == "down_factor is (8, 0), expected two positive ints"
    assert reasons["4"] == "its forward is overridden on the instance"


class ISAHead(nn.Module):
    """A look-alike: mmseg's class name, defined elsewhere."""

    def forward(self, x):
        return x


def test_isa_look_alike_is_reported_not_touched():
    look = ISAHead()
    model = nn.Sequential(look)
    _, report = swap(model, strict=True)
    assert model[0] is look and not report.swapped
    [entry] = report.look_alikes
    assert entry.original == f"{__name__}.ISAHead" and ISA in entry.reason


# ---------------------------------------------------------------------------------------------
# the plugin: FastISAHead
# ---------------------------------------------------------------------------------------------


def test_fastisahead_takes_isahead_keys_and_state(mmseg):
    import fastctx.integrations.mmseg  # noqa: F401 (registers the heads)
    from mmseg.models.decode_heads import ISAHead as MmsegISAHead
    from mmseg.registry import MODELS

    cfg = isa_cfg(channels=24, isa_channels=8)
    original = isa_head(channels=24, isa_channels=8)
    fast = MODELS.build({**cfg, "type": "FastISAHead", "fastctx_backend": "reference"})
    assert isinstance(fast, MmsegISAHead) and type(fast).__name__ == "FastISAHead"
    assert type(fast.local_relation) is fastctx.nn.interlaced.ISASelfAttentionBlock
    assert list(fast.state_dict()) == list(original.state_dict())
    fast.load_state_dict(original.state_dict(), strict=True)
    original.eval()
    fast.eval()
    x = [torch.randn(2, IN, 13, 11)] * 4
    with torch.no_grad():
        want, got = original(x), fast(x)
    assert fastctx.last_backend("interlaced_attention") == "reference"
    assert_close(got, want.double(), torch.float32, "logits")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        MODELS.build({**cfg, "type": "FastISAHead", "fastctx_backend": "gpu"})


def test_isanet_config_with_the_plugin_loads_the_original_checkpoint(mmseg, tmp_path):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint
    from mmseg.registry import MODELS

    base = os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs", "isanet",
                        "isanet_r50-d8_4xb2-40k_cityscapes-512x1024.py")
    original_cfg = Config.fromfile(base)
    original_cfg.model.pretrained = None  # random weights: nothing to download
    # Forget the plugin, so that what registers FastISAHead below is the config's custom_imports.
    sys.modules.pop("fastctx.integrations.mmseg", None)
    MODELS._module_dict.pop("FastISAHead", None)
    user_cfg = tmp_path / "isanet_r50-d8_fastctx.py"
    user_cfg.write_text(
        f"_base_ = [{base!r}]\n"
        "custom_imports = dict(imports=['fastctx.integrations.mmseg'], allow_failed_imports=False)\n"
        "model = dict(pretrained=None, decode_head=dict(type='FastISAHead'))\n"
    )
    fast_cfg = Config.fromfile(str(user_cfg))
    assert "FastISAHead" in MODELS.module_dict
    assert fast_cfg.model.decode_head.isa_channels == 256 and fast_cfg.model.decode_head.down_factor == (8, 8)

    init_default_scope(fast_cfg.get("default_scope", "mmseg"))
    torch.manual_seed(0)
    original = MODELS.build(original_cfg.model)
    assert type(original.decode_head).__name__ == "ISAHead"
    randomize(original)
    checkpoint = tmp_path / "isanet_original.pth"
    torch.save({"meta": {}, "state_dict": original.state_dict()}, checkpoint)

    fast = MODELS.build(fast_cfg.model)
    assert type(fast.decode_head).__name__ == "FastISAHead"
    load_checkpoint(fast, str(checkpoint), map_location="cpu", strict=True)
    original.eval()
    fast.eval()
    image = torch.randn(1, 3, 65, 97)  # a 9x13 feature map at output stride 8: padded to 16x16
    with torch.no_grad():
        want = original(image, mode="tensor")
        got = fast(image, mode="tensor")
        assert got.shape == (1, 19, 9, 13)
        assert_close(got, want.double(), torch.float32, "logits")
        # swap() on the whole original model gives the same logits too
        swapped, report = swap(copy.deepcopy(original), strict=True)
        assert [e.path for e in report.swapped] == ["decode_head"]
        assert_close(swapped(image, mode="tensor"), want.double(), torch.float32, "logits")
        for rel in (fast.decode_head.global_relation, fast.decode_head.local_relation):
            rel.output_project.bn.weight.zero_()  # the attention matters here
            rel.output_project.bn.bias.zero_()
        without = fast(image, mode="tensor")
    assert float((without - want).abs().max()) > 1e-3 * float(want.abs().max())
