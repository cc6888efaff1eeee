"""fastctx.swap on sssegmentation 1.7.0's ISANet and ANNNet, and the plugin segmentors
``FastISANet`` / ``FastANNNet``.

ISANet: the segmentor becomes a subclass of ISANet holding the same submodules, its
``global_relation`` / ``local_relation`` (``isanet.SelfAttentionBlock``) rebuilt as fastctx
ISASelfAttentionBlocks around the original projections and its padding/permute forward replaced by
the fused interlaced attention (no permuted copies); a relation alone (outside a recognised ISANet)
becomes an ISASelfAttentionBlock attending over the map it is given. ANNNet: ``AFNBlock`` /
``APNBlock`` -> fastctx.nn.AFNB / APNB around the stages' own projections.

Needs sssegmentation (tests/toolboxes.py; FAILS when missing). Comparisons by tests/swap_support.py's
``parity`` (output, input and parameter gradients, BN running statistics after the step): float64,
relative error <= 1e-5 against the original; float32, compare_runs32 with the ReLU flips recorded.

Widths: sssegmentation's Cityscapes configs (tests/toolboxes.ssseg_isanet_cfg / ssseg_annnet_cfg)
narrowed from 2048 / 512 / 256 to a few dozen channels, some not powers of two: the 3x3 convs
around the context modules, which the swap does not touch, would cost minutes on two CPU cores.
Sizes: 33x65 (padded to 40x72 for ISA's (8, 8) groups) and 17x23 (padded to 24x24).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastctx
from fastctx.nn.interlaced import ISASelfAttentionBlock
from fastctx.swap import SwapError, recognisers, swap
from tests import toolboxes
from tests._utils import assert_close
from tests.swap_support import compare_runs, parity, run
from tests.toolboxes import randomize

SEG = "ssseg.modules.models.segmentors"
ISANET = f"{SEG}.isanet.isanet.ISANet"
ISA_BLOCK = f"{SEG}.isanet.isanet.SelfAttentionBlock"
AFN = f"{SEG}.annnet.afnblock.AFNBlock"
APN = f"{SEG}.annnet.apnblock.APNBlock"
FAST_ISANET = "fastctx.swap.FastISANet"
IN = 32  # ISANet's backbone channels, narrowed from 2048
LOW, HIGH = 24, 40  # ANNNet's two backbone maps, narrowed from 1024, 2048
SIZES = [(33, 65), (17, 23)]


@pytest.fixture(scope="module")
def ssseg():
    return toolboxes.ssseg_segmentor("isanet"), toolboxes.ssseg_segmentor("annnet")


def isanet(feats=48, isa=24, down_factor=(8, 8), mode="TEST", **cfg_overrides) -> nn.Module:
    from ssseg.modules.models.segmentors.isanet import ISANet

    cfg = toolboxes.ssseg_isanet_cfg("ISANet", IN, feats, isa, down_factor)
    cfg.update(cfg_overrides)
    segmentor = ISANet(cfg, mode)
    randomize(segmentor)
    toolboxes.ssseg_given_features(segmentor)
    return segmentor


def annnet(transform=16, feats=36, query_scales=(1,), mode="TEST") -> nn.Module:
    from ssseg.modules.models.segmentors.annnet import ANNNet

    segmentor = ANNNet(toolboxes.ssseg_annnet_cfg("ANNNet", (LOW, HIGH), transform, feats, query_scales), mode)
    randomize(segmentor)
    toolboxes.ssseg_given_split_features(segmentor, LOW, HIGH)
    return segmentor


def relation_inputs(segmentor) -> list:
    """Record the shapes of the maps ``global_relation`` is called with."""
    shapes = []
    segmentor.global_relation.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    return shapes


def test_registry_lists_isanet_and_annnet():
    assert {ISANET, ISA_BLOCK, AFN, APN} <= set(recognisers())


# ---------------------------------------------------------------------------------------------
# ISANet
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("size,feats,isa", [((33, 65), 64, 16), ((17, 23), 48, 24)], ids=["33x65", "17x23"])
def test_isanet_swapped_matches(ssseg, size, feats, isa, mode):
    from ssseg.modules.models.segmentors.isanet import ISANet

    torch.manual_seed(size[0] + feats)
    orig = isanet(feats, isa)
    orig.train(mode == "train")
    x = torch.randn(2, IN, *size, dtype=torch.float64)
    dout = torch.randn(2, 19, *size, dtype=torch.float64)
    padded = tuple(-(-s // 8) * 8 for s in size)
    seen = []

    def check_swapped(fast):
        assert isinstance(fast, ISANet) and fast.training == (mode == "train") and fast.mode == orig.mode
        assert type(fast.global_relation) is ISASelfAttentionBlock is type(fast.local_relation)
        seen.append(relation_inputs(fast))

    # the relations' ReLUs run on the whole padded map in the swapped segmentor, on the permuted
    # groups in the original: not paired by ReluFlips
    original, want = parity(orig, x, dout, 1, toolboxes.ssseg_logits, [("", ISANET, FAST_ISANET)],
                            f"ISANet {size} {mode}", check_swapped, reshaped=("global_relation", "local_relation"))
    # each run (float64, float32) gave the relation the whole padded map, not 64 permuted groups
    assert seen == [[(2, feats, *padded)]] * 2
    # the attention matters to these logits (so the comparison above could fail)
    with torch.no_grad():
        for rel in (original.global_relation, original.local_relation):
            rel.output_project[1].weight.zero_()
            rel.output_project[1].bias.zero_()
        torch.manual_seed(1)
        without = toolboxes.ssseg_logits(original)(x.float())
    assert float((without - want[0]).abs().max()) > 1e-3 * float(want[0].abs().max())


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_isa_relation_alone_matches(ssseg, mode):
    """isanet.SelfAttentionBlock(c, isa) alone: full attention over the map it is given."""
    from ssseg.modules.models.segmentors.isanet.isanet import SelfAttentionBlock

    norm, act = {"type": "SyncBatchNorm"}, {"type": "ReLU", "inplace": True}
    torch.manual_seed(3)
    orig = SelfAttentionBlock(40, 12, norm, act)
    randomize(orig)
    orig.train(mode == "train")
    x = torch.randn(2, 40, 17, 23, dtype=torch.float64)
    dout = torch.randn(2, 40, 17, 23, dtype=torch.float64)

    def check_swapped(fast):
        assert fast.backend == "cpu" and fast.training == (mode == "train")

    parity(orig, x, dout, 1, lambda m: m, [("", ISA_BLOCK, "fastctx.nn.interlaced.ISASelfAttentionBlock")],
           f"ISA relation {mode}", check_swapped, backend="cpu")
    assert fastctx.last_backend("interlaced_attention") == "cpu"  # the swapped float32 run, parity's last


def test_isa_relations_swapped_inside_an_unrecognised_isanet(ssseg):
    """A subclass of ISANet is not recognised (its forward may differ): its relations are swapped
    alone and run under ISANet's own permute forward, still exactly (train mode: BN statistics)."""
    from ssseg.modules.models.segmentors.isanet import ISANet

    class MyISANet(ISANet):
        pass

    torch.manual_seed(4)
    orig = isanet(40, 16)
    orig.__class__ = MyISANet
    orig.train()
    x = torch.randn(2, IN, 17, 23, dtype=torch.float64)
    dout = torch.randn(2, 19, 17, 23, dtype=torch.float64)
    original = copy.deepcopy(orig).double()
    want = run(original, x, dout, seed=1, forward=toolboxes.ssseg_logits(original))
    fast = copy.deepcopy(orig).double()
    same, report = swap(fast, strict=True)
    assert same is fast and type(fast) is MyISANet and not report.look_alikes
    assert [e.path for e in report.swapped] == ["global_relation", "local_relation"]
    seen = relation_inputs(fast)
    got = run(fast, x, dout, seed=1, forward=toolboxes.ssseg_logits(fast))
    assert seen == [(2 * 64, 40, 3, 3)]  # ssseg's 64 permuted groups of the 24x24 padded map
    compare_runs(got, want, torch.float64, "ISANet subclass, relations swapped")


def test_swapped_isanet_shares_state_keeps_mode_and_loads_checkpoints(ssseg):
    orig = isanet(24, 8)
    assert orig.training and orig.mode == "TEST"  # built for TEST, never .eval(): a mode swap keeps
    params = dict(orig.named_parameters())
    keys = list(orig.state_dict())
    assert "global_relation.key_project.0.1.running_mean" in keys  # ssseg's nn.Sequential keys
    calls = []
    handle = orig.register_forward_hook(lambda m, i, o: calls.append(o.seg_logits.shape))
    fast, _ = swap(orig)
    assert fast is not orig and type(orig).__name__ == "ISANet" and orig.global_relation is not fast.global_relation
    assert fast.mode == "TEST" and fast.training
    assert fast.in_conv is orig.in_conv and fast.global_relation.key_project is orig.global_relation.key_project
    assert all(p is params[n] for n, p in fast.named_parameters())
    assert list(fast.state_dict()) == keys
    fast.eval()
    assert fast.mode == "TEST" and not fast.training
    with torch.no_grad():
        toolboxes.ssseg_logits(fast)(torch.randn(1, IN, 9, 13))
    assert calls == [(1, 19, 9, 13)]  # hooks carry over
    handle.remove()
    other = isanet(24, 8)
    fast.load_state_dict(other.state_dict(), strict=True)
    back = isanet(24, 8)
    back.load_state_dict(fast.state_dict(), strict=True)
    assert all(torch.equal(back.state_dict()[k], other.state_dict()[k]) for k in keys)
    develop, _ = swap(isanet(24, 8, mode="TRAIN_DEVELOP"))
    assert develop.mode == "TRAIN_DEVELOP"
    model = nn.ModuleDict({"segmentor": isanet(24, 8)})  # a model holding it: the slot is rewritten
    same, report = swap(model)
    assert same is model and type(model["segmentor"]).__qualname__ == "FastISANet"
    assert [e.path for e in report.swapped] == ["segmentor"]


@pytest.mark.parametrize("mode", ["TRAIN", "TRAIN_DEVELOP"])
def test_swapped_isanet_training_outputs_match(ssseg, mode):
    """ssseg's training forward: the loss (and the logits in TRAIN_DEVELOP) as ISANet's."""
    from ssseg.modules.utils import SSSegInputStructure

    torch.manual_seed(5)
    orig = isanet(24, 8, mode=mode).double()
    fast, _ = swap(copy.deepcopy(orig), strict=True)
    images = torch.randn(2, IN, 9, 13, dtype=torch.float64)
    targets = torch.randint(0, 19, (2, 9, 13))
    targets[0, 0, :4] = 255
    outs = []
    for segmentor in (orig, fast):
        torch.manual_seed(1)
        outs.append(segmentor(SSSegInputStructure(mode=mode, images=images, seg_targets=targets)))
    want, got = outs
    assert type(got) is type(want) and got.mode == want.mode == mode
    assert_close(got.loss, want.loss, torch.float64, "loss")
    assert got.losses_log_dict.keys() == want.losses_log_dict.keys()
    if mode == "TRAIN":
        assert got.seg_logits is None is want.seg_logits
    else:
        assert_close(got.seg_logits, want.seg_logits, torch.float64, "seg_logits")


def test_isanet_structure_differences_are_left_alone(ssseg):
    group_norm = isanet(16, 8, norm_cfg={"type": "GroupNorm", "num_groups": 4})
    conv3 = isanet(16, 8)
    conv3.global_relation.value_project = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    shared = isanet(16, 8)
    shared.local_relation.query_project = shared.local_relation.key_project
    no_norm = isanet(16, 8)
    no_norm.global_relation.matmul_norm = False
    odd_down = isanet(16, 8, down_factor=(8, 0))
    patched = isanet(16, 8)
    patched.forward = lambda data_meta: data_meta
    model = nn.Sequential(group_norm, conv3, shared, no_norm, odd_down, patched)
    before = list(model)
    with pytest.raises(SwapError, match="recognised modules could not be swapped") as info:
        swap(model, strict=True)
    assert list(model) == before
    reasons = {e.path: e.reason for e in info.value.report.left_alone}
    assert reasons["0"].startswith("global_relation: key_project.0.1 is torch.nn.modules.normalization.GroupNorm")
    assert reasons["1"].startswith("global_relation: value_project is Conv2d(in=16, out=16, kernel=(3, 3)")
    assert reasons["2"] == "local_relation: query_project is key_project (shared), expected two projections"
    assert reasons["3"] == "global_relation: matmul_norm is False, expected True"
    assert reasons["4"] == "down_factor is (8, 0), expected two positive ints"
    assert reasons["5"] == "its forward is overridden on the instance"
    # each left-alone ISANet's relations are then tried alone: the group-normed ones and the
    # different ones are left alone too, the others swapped (they are exact under any forward)
    assert "0.local_relation" in reasons and "1.global_relation" in reasons
    swapped = {e.path for e in info.value.report.swapped}
    assert {"1.local_relation", "4.global_relation", "4.local_relation"} <= swapped


class ISANet(nn.Module):
    """A look-alike: sssegmentation's class name, defined elsewhere."""

    def forward(self, x):
        return x


class AFNBlock(ISANet):
    """Another look-alike."""


def test_isanet_and_afnblock_look_alikes_are_reported_not_touched():
    model = nn.Sequential(ISANet(), AFNBlock())
    before = list(model)
    _, report = swap(model, strict=True)
    assert list(model) == before and not report.swapped
    assert [(e.path, e.original) for e in report.look_alikes] == [
        ("0", f"{__name__}.ISANet"), ("1", f"{__name__}.AFNBlock")]
    assert ISANET in report.look_alikes[0].reason and AFN in report.look_alikes[1].reason


# ---------------------------------------------------------------------------------------------
# ANNNet
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_annnet_swapped_matches(ssseg, size, mode):
    torch.manual_seed(size[0] * 3 + size[1])
    orig = annnet()
    orig.train(mode == "train")
    x = torch.randn(2, LOW + HIGH, *size, dtype=torch.float64)
    dout = torch.randn(2, 19, *size, dtype=torch.float64)

    def check_swapped(fast):  # parity: the swapped model is the copy itself (no root swap)
        assert fast.apn_block.stages[0].query_project is fast.apn_block.stages[0].key_project
        assert fast.afn_block.stages[0].key_pool_scales == (1, 3, 6, 8)

    original, want = parity(
        orig, x, dout, 1, toolboxes.ssseg_logits,
        [("afn_block", AFN, "fastctx.nn.ann.AFNB"), ("apn_block", APN, "fastctx.nn.ann.APNB")],
        f"ANNNet {size} {mode}", check_swapped)
    # each attention matters to these logits (so the comparison above could fail)
    for block in ("afn_block", "apn_block"):
        probe = copy.deepcopy(original)
        with torch.no_grad():
            getattr(probe, block).stages[0].out_project.weight.zero_()
            torch.manual_seed(1)
            without = toolboxes.ssseg_logits(probe)(x.float())
        assert float((without - want[0]).abs().max()) > 1e-3 * float(want[0].abs().max()), block


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_afnblock_and_apnblock_alone_match(ssseg, mode):
    """Two stages each, other pool scales, keys/values at another size than the queries (AFNB)."""
    _, annnet_module = ssseg
    norm, act = {"type": "SyncBatchNorm"}, {"type": "ReLU", "inplace": True}
    torch.manual_seed(6)
    afn = annnet_module.AFNBlock(20, 28, 12, 28, (1, 1), (1, 2, 5), norm, act)
    apn = annnet_module.APNBlock(28, 12, 28, (1, 1), (1, 2, 5), norm, act)
    for m in (afn, apn):
        randomize(m)
        m.train(mode == "train")
    low = torch.randn(2, 20, 17, 23, dtype=torch.float64)
    high = torch.randn(2, 28, 33, 65, dtype=torch.float64)
    dout = torch.randn(2, 28, 33, 65, dtype=torch.float64)

    def check_swapped(fast):
        assert len(fast.stages) == 2 and fast.stages[1].key_pool_scales == (1, 2, 5)

    for name, orig, forward, x, swapped in (
        ("AFNBlock", afn, lambda m: lambda t: m(t, high.to(t.dtype)), low, ("", AFN, "fastctx.nn.ann.AFNB")),
        ("APNBlock", apn, lambda m: m, high, ("", APN, "fastctx.nn.ann.APNB")),
    ):
        parity(orig, x, dout, 1, forward, [swapped], f"{name} {mode}", check_swapped)


def test_swapped_annnet_keeps_parameters_and_loads_checkpoints(ssseg):
    orig = annnet()
    params = dict(orig.named_parameters())
    keys = list(orig.state_dict())
    assert "apn_block.stages.0.query_project.1.running_var" in keys  # shared, listed twice as in ssseg
    fast, _ = swap(copy.copy(orig))
    assert all(p is params[n] for n, p in fast.named_parameters())
    assert list(fast.state_dict()) == keys
    other = annnet()
    fast.load_state_dict(other.state_dict(), strict=True)
    back = annnet()
    back.load_state_dict(fast.state_dict(), strict=True)
    assert all(torch.equal(back.state_dict()[k], other.state_dict()[k]) for k in keys)


def test_ann_structure_differences_are_left_alone(ssseg):
    _, annnet_module = ssseg
    norm, act = {"type": "SyncBatchNorm"}, {"type": "ReLU", "inplace": True}
    scaled = annnet_module.APNBlock(16, 8, 16, (1, 2), (1, 3), norm, act)
    max_pool = annnet_module.APNBlock(16, 8, 16, (1,), (1, 3), norm, act)
    max_pool.stages[0].key_downsample.pool_nets[1] = nn.AdaptiveMaxPool2d(3)
    conv3 = annnet_module.AFNBlock(8, 16, 8, 16, (1,), (1, 3), norm, act)
    conv3.stages[0].value_project = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    with_act = annnet_module.AFNBlock(8, 16, 8, 16, (1,), (1, 3), norm, act)
    with_act.bottleneck.append(nn.ReLU())
    unshared = annnet_module.APNBlock(16, 8, 16, (1,), (1, 3), norm, act)
    unshared.stages[0].query_project = copy.deepcopy(unshared.stages[0].key_project)
    model = nn.Sequential(scaled, max_pool, conv3, with_act, unshared)
    before = list(model)
    with pytest.raises(SwapError, match="recognised modules could not be swapped") as info:
        swap(model, strict=True)
    assert list(model) == before
    reasons = {e.path: e.reason for e in info.value.report.left_alone}
    assert set(reasons) == {"0", "1", "2", "3", "4"}
    assert reasons["0"].startswith("stages.1: query_downsample is MaxPool2d(kernel_size=2")
    assert "query_scales > 1" in reasons["0"]
    assert reasons["1"].startswith("stages.0: key_downsample.pool_nets.1 is AdaptiveMaxPool2d")
    assert reasons["2"].startswith("stages.0: value_project is Conv2d(in=8, out=8, kernel=(3, 3)")
    assert reasons["3"] == "bottleneck holds 3 modules, expected Conv2d, norm"
    assert reasons["4"] == "stages.0: query_project is not key_project, expected the opposite"


# ---------------------------------------------------------------------------------------------
# the plugin: FastISANet, FastANNNet
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builder(ssseg):
    builder = toolboxes.ssseg_segmentor("builder")
    import fastctx.integrations.sssegmentation  # noqa: F401 (registers the segmentors)

    return builder


@pytest.mark.parametrize("name", ["ISANet", "ANNNet"])
def test_plugin_builds_from_the_original_config_and_loads_its_state(builder, name):
    from ssseg.modules.models.segmentors.annnet import ANNNet as SssegANNNet
    from ssseg.modules.models.segmentors.isanet import ISANet as SssegISANet

    if name == "ISANet":
        cfg = toolboxes.ssseg_isanet_cfg("ISANet", IN, 24, 8)
        give, channels, swapped = toolboxes.ssseg_given_features, IN, ("global_relation", "local_relation")
    else:
        cfg = toolboxes.ssseg_annnet_cfg("ANNNet", (LOW, HIGH), 12, 20)
        give, channels = (lambda s: toolboxes.ssseg_given_split_features(s, LOW, HIGH)), LOW + HIGH
        swapped = ("afn_block", "apn_block")
    assert f"Fast{name}" in builder.SegmentorBuilder.REGISTERED_MODULES
    torch.manual_seed(7)
    original = builder.BuildSegmentor(segmentor_cfg=copy.deepcopy(cfg), mode="TEST")
    randomize(original)
    with torch.no_grad():  # larger out_project weights than ssseg's default init: the attention matters
        for n, m in original.named_modules():
            if n.endswith("out_project"):
                m.weight.normal_(0, 0.3)
    fast_cfg = {**copy.deepcopy(cfg), "type": f"Fast{name}", "fastctx_backend": "reference"}
    fast = builder.BuildSegmentor(segmentor_cfg=fast_cfg, mode="TEST")
    assert isinstance(fast, SssegISANet if name == "ISANet" else SssegANNNet) and type(fast).__name__ == f"Fast{name}"
    assert list(fast.state_dict()) == list(original.state_dict())
    fast.load_state_dict(original.state_dict(), strict=True)
    for segmentor in (original, fast):
        give(segmentor)
        segmentor.eval()
    if name == "ISANet":
        assert all(type(getattr(fast, p)) is ISASelfAttentionBlock and getattr(fast, p).backend == "reference"
                   for p in swapped)
        seen = relation_inputs(fast)
    else:
        assert type(fast.afn_block) is fastctx.nn.AFNB and type(fast.apn_block) is fastctx.nn.APNB
        assert fast.apn_block.stages[0].backend == "reference"
    x = torch.randn(2, channels, 13, 11)
    with torch.no_grad():
        want, got = toolboxes.ssseg_logits(original)(x), toolboxes.ssseg_logits(fast)(x)
    op = "interlaced_attention" if name == "ISANet" else "pyramid_attention"
    assert fastctx.last_backend(op) == "reference"
    if name == "ISANet":
        assert seen == [(2, 24, 16, 16)]  # the fused path on the padded map, not permuted groups
    assert_close(got, want.double(), torch.float32, "logits")
    probe = copy.deepcopy(fast)  # the attention matters to these logits
    with torch.no_grad():
        if name == "ISANet":
            parts = (probe.global_relation.output_project[1], probe.local_relation.output_project[1])
        else:
            parts = (probe.afn_block.stages[0].out_project, probe.apn_block.stages[0].out_project)
        for part in parts:
            part.weight.zero_()
        without = toolboxes.ssseg_logits(probe)(x)
    assert float((without - want).abs().max()) > 1e-3 * float(want.abs().max())
    back = builder.BuildSegmentor(segmentor_cfg=copy.deepcopy(cfg), mode="TEST")
    back.load_state_dict(fast.state_dict(), strict=True)  # and back into the original
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in back.state_dict().items())


def test_plugin_that_cannot_swap_fails_to_build(builder):
    cfg = toolboxes.ssseg_annnet_cfg("FastANNNet", (LOW, HIGH), 12, 20, query_scales=(1, 2))
    with pytest.raises(SwapError, match="stages.1: query_downsample is MaxPool2d"):
        builder.BuildSegmentor(segmentor_cfg=cfg, mode="TEST")
    cfg = toolboxes.ssseg_isanet_cfg("FastISANet", IN, 24, 8)
    cfg["norm_cfg"] = {"type": "GroupNorm", "num_groups": 4}
    with pytest.raises(SwapError, match="key_project.0.1 is torch.nn.modules.normalization.GroupNorm"):
        builder.BuildSegmentor(segmentor_cfg=cfg, mode="TEST")
