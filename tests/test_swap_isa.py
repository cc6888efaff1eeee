"""fastctx.swap on mmseg's ISAHead: the head becomes a subclass of ISAHead holding the same
submodules, its ``global_relation`` / ``local_relation`` rebuilt as fastctx
ISASelfAttentionBlocks around the original projections, its padding/permute forward replaced by
the fused interlaced attention; and the plugin head ``FastISAHead``.

Needs mmsegmentation (tests/toolboxes.py; FAILS when missing). Comparisons by
tests/swap_support.py's ``parity`` (float64: relative error <= 1e-5 against the original;
float32: compare_runs32; output, input and parameter gradients, BN buffers).

Widths: mmseg configs/_base_/models/isanet_r50-d8.py (ISAHead channels=512, isa_channels=256,
down_factor=(8, 8), 19 classes, dropout 0.1) with in_channels narrowed 2048 -> 32 (the 3x3
in_conv, which the swap does not touch, would cost minutes on two CPU cores). The 33x65 run keeps
the Cityscapes channels=512 / isa_channels=256; the 97x97 run narrows them to 48 / 24. Both sizes
need padding to multiples of 8 (40x72, 104x104), which mmseg's forward and fastctx's must agree on.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastctx
from fastctx.swap import recognisers, swap
from tests._utils import assert_close
from tests.swap_support import (
    assert_look_alike_left_alone, assert_matters, assert_plugin_head_matches, assert_same_logits,
    left_alone_reasons, original_and_plugin_models, parity, plugin_configs,
)
from tests.swap_support import mmseg_fixture  # noqa: F401 (the fixture "mmseg")
from tests.toolboxes import randomize

ISA = "mmseg.models.decode_heads.isa_head.ISAHead"
FAST_ISA = "fastctx.swap.FastISAHead"
IN = 32  # narrowed from 2048


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

    def swapped(fast):
        assert isinstance(fast, ISAHead) and fast.training == (mode == "train")
        assert type(fast.global_relation) is fastctx.nn.interlaced.ISASelfAttentionBlock

    # the swapped head runs its relations on the grouped maps itself (a float32 ReLU flip near 0,
    # seen on an AVX-512 Xeon, is then excused like any other head's)
    original, want = parity(orig, x, dout, 1, forward, [("", ISA, FAST_ISA)], f"ISAHead {size} {mode}", swapped,
                            reshaped=("global_relation", "local_relation"))
    # the attention matters to these logits (so the comparison above could fail)
    bns = [rel.output_project.bn for rel in (original.global_relation, original.local_relation)]
    assert_matters([t for bn in bns for t in (bn.weight, bn.bias)], lambda: forward(original)(x.float()), want[0],
                   seed=1)


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
    reasons = left_alone_reasons(nn.Sequential(conv3, shared, no_norm, odd_down, patched))
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
    assert_look_alike_left_alone(ISAHead(), ISA)


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
    assert_plugin_head_matches(original, fast, ([torch.randn(2, IN, 13, 11)] * 4,), "interlaced_attention")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        MODELS.build({**cfg, "type": "FastISAHead", "fastctx_backend": "gpu"})


def test_isanet_config_with_the_plugin_loads_the_original_checkpoint(mmseg, tmp_path):
    original_cfg, fast_cfg = plugin_configs(mmseg, tmp_path, "isanet/isanet_r50-d8_4xb2-40k_cityscapes-512x1024.py",
                                            "FastISAHead", dict(type="FastISAHead"))
    assert fast_cfg.model.decode_head.isa_channels == 256 and fast_cfg.model.decode_head.down_factor == (8, 8)
    original, fast = original_and_plugin_models(original_cfg, fast_cfg, tmp_path, randomize)
    assert type(original.decode_head).__name__ == "ISAHead"
    assert type(fast.decode_head).__name__ == "FastISAHead"
    image = torch.randn(1, 3, 65, 97)  # a 9x13 feature map at output stride 8: padded to 16x16
    # swap() on the whole original model gives the same logits too
    swapped, report = swap(copy.deepcopy(original), strict=True)
    assert [e.path for e in report.swapped] == ["decode_head"]
    with torch.no_grad():
        assert_close(swapped(image, mode="tensor"), original(image, mode="tensor").double(), torch.float32, "logits")
    bns = [rel.output_project.bn for rel in (fast.decode_head.global_relation, fast.decode_head.local_relation)]
    assert_same_logits(original, fast, image, (1, 19, 9, 13), [t for bn in bns for t in (bn.weight, bn.bias)])
