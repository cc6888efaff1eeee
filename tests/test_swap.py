"""fastctx.swap: recognise the toolboxes' context modules, replace them in place, change no number.

The toolbox tests build the real modules (mmcv-lite, mmsegmentation, sssegmentation, installed
by `make install`; see tests/toolboxes.py) and FAIL when a toolbox is missing. Each parity test
runs a copy of the original and a swapped copy on the same input and upstream gradient, and
compares the output, the gradient of the input and of every parameter, and the buffers (BN
running statistics in train mode):
- float64: swapped against the original, relative error <= 1e-5 (the issue's target);
- float32: swapped against the original run in float32, the float32 row of fastctx.testing.
  Not against float64: a whole head in float32 is ~1e-2 off its float64 self at a few
  elements (ReLUs whose input rounds across 0 pass or block a gradient), the original exactly
  as much as the swapped one (measured: 23059 vs 23053 elements of dx beyond the row at 97x97);
  what the swap must keep is the original's float32 numbers.

Widths: the module test uses mmseg's Cityscapes CCNet width (channels=512). The whole-head tests
take every other key from the Cityscapes configs (mmseg configs/_base_/models/ccnet_r50-d8.py,
ssseg configs/ccnet/ccnet_resnet50os8_cityscapes.py) but narrow in_channels 2048 -> 64 and
channels 512 -> 64: the head's 3x3 convolutions, which the swap does not touch, would otherwise
cost ~100 GFLOP a forward and minutes per test on two CPU cores.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastctx
from fastctx.swap import SwapError, recognisers, swap
from tests import toolboxes
from tests._utils import assert_close
from tests.swap_support import check, compare_runs, parity, run
from tests.swap_support import mmseg_fixture  # noqa: F401 (the fixture "mmseg")
from tests.toolboxes import randomize

MMCV_CCA = "mmcv.ops.cc_attention.CrissCrossAttention"
FAST_CCA = "fastctx.nn.criss_cross.CrissCrossAttention"
SIZES = [(33, 65), (97, 97)]
HEAD_IN, HEAD_CH = 64, 64  # narrowed from 2048, 512 (see the module docstring)


# ---------------------------------------------------------------------------------------------
# toolbox-free: the machinery
# ---------------------------------------------------------------------------------------------


class CrissCrossAttention(nn.Module):
    """A look-alike: the name of mmcv's class, defined elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.query_conv = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return x


def test_nothing_recognised_leaves_the_model_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    before = model.state_dict(keep_vars=True)
    out, report = swap(model)
    assert out is model and list(model) == list(model)
    assert (report.swapped, report.left_alone, report.look_alikes) == ([], [], [])
    after = model.state_dict(keep_vars=True)
    assert all(after[k] is before[k] for k in before)
    assert str(report).startswith("fastctx.swap: 0 swapped, 0 left alone, 0 look-alikes")


def test_look_alike_is_reported_not_touched():
    look = CrissCrossAttention()
    model = nn.Sequential(nn.Conv2d(16, 16, 1), look)
    out, report = swap(model, strict=True)  # look-alikes are not recognised: strict does not raise
    assert out is model and model[1] is look and not report.swapped
    [entry] = report.look_alikes
    assert entry.path == "1" and entry.original == f"{__name__}.CrissCrossAttention"
    assert MMCV_CCA in entry.reason


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"fastctx.swap: model must be a torch.nn.Module, got list"):
        swap([nn.Conv2d(1, 1, 1)])
    with pytest.raises(ValueError, match=r"fastctx.swap: unknown backend 'gpu'"):
        swap(nn.Conv2d(1, 1, 1), backend="gpu")
    with pytest.raises(TypeError, match=r"fastctx.swap: strict must be a bool"):
        swap(nn.Conv2d(1, 1, 1), strict="yes")


def test_registry_lists_criss_cross():
    assert MMCV_CCA in recognisers()


def test_a_converter_that_breaks_the_state_contract_is_caught(monkeypatch):
    import importlib

    swap_module = importlib.import_module("fastctx.swap")  # the module (fastctx.swap is the function)

    def bad_convert(m, backend):
        return nn.Conv2d(16, 2, 1)  # fresh parameters: optimisers and checkpoints would break

    path = swap_module.class_path(CrissCrossAttention)
    monkeypatch.setitem(swap_module._REGISTRY, path, swap_module.Recogniser(path, "test", bad_convert))
    with pytest.raises(RuntimeError, match="broke the contract"):
        swap(nn.Sequential(CrissCrossAttention()))


# ---------------------------------------------------------------------------------------------
# mmcv CrissCrossAttention (mmseg CCHead.cca, sssegmentation CCNet.cca)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mmcv_cca():
    toolboxes.mmseg()
    from mmcv.ops import CrissCrossAttention as MmcvCCA

    return MmcvCCA


# 33x65 only at this width: the 97x97 maps run through the same module in the head tests below
# (a 512-wide 97x97 float64 run of mmcv's einsum costs ~20 s of this suite's ~60 s budget).
@pytest.mark.parametrize("size", SIZES[:1], ids=lambda s: f"{s[0]}x{s[1]}")
def test_mmcv_cca_swapped_matches(mmcv_cca, size):
    torch.manual_seed(size[0])
    orig = mmcv_cca(512)  # CCHead's channels in mmseg's Cityscapes config
    randomize(orig)
    x = torch.randn(1, 512, *size, dtype=torch.float64)
    dout = torch.randn_like(x)
    for dtype in (torch.float64, torch.float32):
        xd = x.to(dtype)
        want = run(copy.deepcopy(orig).to(dtype), xd, dout, seed=0)
        fast, report = swap(copy.deepcopy(orig).to(dtype))
        assert type(fast).__module__ + "." + type(fast).__qualname__ == FAST_CCA
        assert [(e.path, e.original, e.replacement) for e in report.swapped] == [("", MMCV_CCA, FAST_CCA)]
        got = run(fast, xd, dout, seed=0)
        compare_runs(got, want, dtype, f"cca {dtype}")
        attn = want[0] - xd  # the attention's part of the output, compared on its own too
        check(got[0] - xd, attn, dtype, f"cca {dtype} attention part")
        assert float(attn.abs().max()) > 0.1  # the attention reaches the output


# ---------------------------------------------------------------------------------------------
# mmseg CCHead
# ---------------------------------------------------------------------------------------------


def mmseg_cchead(in_channels: int = HEAD_IN, channels: int = HEAD_CH, **overrides) -> nn.Module:
    from mmseg.registry import MODELS

    cfg = dict(  # mmseg configs/_base_/models/ccnet_r50-d8.py decode_head, BN for one process
        type="CCHead", in_channels=in_channels, in_index=3, channels=channels, recurrence=2,
        dropout_ratio=0.1, num_classes=19, norm_cfg=dict(type="BN", requires_grad=True),
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    )
    cfg.update(overrides)
    head = MODELS.build(cfg)
    randomize(head)
    return head


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_mmseg_cchead_swapped_matches(mmseg, size, mode):
    torch.manual_seed(size[1])
    orig = mmseg_cchead()
    orig.train(mode == "train")
    x = torch.randn(2, HEAD_IN, *size, dtype=torch.float64)
    dout = torch.randn(2, 19, *size, dtype=torch.float64)
    forward = lambda m: (lambda t: m([t, t, t, t]))  # noqa: E731 (in_index=3 of the backbone's 4 stages)
    for dtype in (torch.float64, torch.float32):
        original = copy.deepcopy(orig).to(dtype)
        want = run(original, x.to(dtype), dout, seed=1, forward=forward(original))
        fast = copy.deepcopy(orig).to(dtype)
        same, report = swap(fast)
        assert same is fast and type(fast.cca).__name__ == "CrissCrossAttention"
        assert [e.path for e in report.swapped] == ["cca"] and not report.left_alone
        got = run(fast, x.to(dtype), dout, seed=1, forward=forward(fast))
        compare_runs(got, want, dtype, f"CCHead {mode} {dtype}")
    # the criss-cross attention matters to these logits (so the comparison above could fail)
    with torch.no_grad():
        original.cca.gamma.scale.zero_()
        torch.manual_seed(1)
        without = original([x.float()] * 4)
    assert float((without - want[0]).abs().max()) > 1e-3 * float(want[0].abs().max())


# ---------------------------------------------------------------------------------------------
# sssegmentation CCNet
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ssseg_ccnet():
    return toolboxes.ssseg_segmentor("ccnet")


def build_ssseg_ccnet(ccnet_module) -> nn.Module:
    seg = ccnet_module.CCNet(toolboxes.ssseg_ccnet_cfg("CCNet", HEAD_IN, HEAD_CH), mode="TEST")
    toolboxes.ssseg_given_features(seg)
    randomize(seg)
    return seg


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_ssseg_ccnet_swapped_matches(ssseg_ccnet, size, mode):
    torch.manual_seed(size[0] + 7)
    orig = build_ssseg_ccnet(ssseg_ccnet)
    assert type(orig.cca).__module__ + "." + type(orig.cca).__qualname__ == MMCV_CCA
    orig.train(mode == "train")
    x = torch.randn(2, HEAD_IN, *size, dtype=torch.float64)
    dout = torch.randn(2, 19, *size, dtype=torch.float64)
    # float64: the exactness test; float32: compare_runs32, which excuses a ReLU input rounding
    # across 0 in one model and not the other (train-mode BN spreads it over the channel: seen at
    # 33x65 on an AVX-512 machine, 27157 of 274560 elements of grad x beyond the float32 row)
    parity(orig, x, dout, 2, toolboxes.ssseg_logits, [("cca", MMCV_CCA, FAST_CCA)], f"ssseg CCNet {size} {mode}")


# ---------------------------------------------------------------------------------------------
# state, optimisers, hooks, sharing
# ---------------------------------------------------------------------------------------------


def test_state_dict_round_trip_and_same_parameters(mmseg):
    orig = mmseg_cchead(32, 16)
    params_before = dict(orig.named_parameters())
    opt = torch.optim.SGD(orig.parameters(), lr=0.1)
    fast = copy.deepcopy(orig)
    fast_params = dict(fast.named_parameters())
    opt_fast = torch.optim.SGD(fast.parameters(), lr=0.1)  # built before the swap
    swap(fast)
    assert list(fast.state_dict()) == list(orig.state_dict())
    assert all(p is fast_params[n] for n, p in fast.named_parameters())  # the same Parameter objects
    # the original's checkpoint loads into the swapped head, and the swapped head's into an original
    fast.load_state_dict(orig.state_dict(), strict=True)
    back = mmseg_cchead(32, 16)
    back.load_state_dict(fast.state_dict(), strict=True)
    for k, v in orig.state_dict().items():
        assert torch.equal(back.state_dict()[k], v) and torch.equal(fast.state_dict()[k], v), k
    # the optimiser built before the swap still trains the swapped head
    x = [torch.randn(1, 32, 9, 11)] * 4
    for model, o in ((orig, opt), (fast, opt_fast)):
        model.train()
        torch.manual_seed(3)
        model(x).square().mean().backward()
        o.step()
    for n, p in fast.named_parameters():
        assert_close(p, params_before[n].double(), torch.float32, f"after a step: {n}")
    assert not torch.equal(fast.cca.gamma.scale, torch.tensor(0.8))  # the step reached the swapped cca


def cca_variant(mmcv_cca, change: str) -> nn.Module:
    m = mmcv_cca(32)
    if change == "query_conv 3x3":
        m.query_conv = nn.Conv2d(32, 4, 3, padding=1)
    elif change == "key_conv C/4":
        m.key_conv = nn.Conv2d(32, 8, 1)
    elif change == "value_conv no bias":
        m.value_conv = nn.Conv2d(32, 32, 1, bias=False)
    elif change == "extra submodule":
        m.norm = nn.BatchNorm2d(32)
    elif change == "gamma not Scale":
        m.gamma = nn.Identity()
    elif change == "too narrow":
        m = mmcv_cca(4)
    elif change == "forward overridden":
        m.forward = lambda x: x
    return m


VARIANTS = {
    "query_conv 3x3": "query_conv is Conv2d(in=32, out=4, kernel=(3, 3)",
    "key_conv C/4": "key_conv is Conv2d(in=32, out=8",
    "value_conv no bias": "bias=False), expected",
    "extra submodule": "submodules ['query_conv', 'key_conv', 'value_conv', 'gamma', 'norm']",
    "gamma not Scale": "gamma is torch.nn.modules.linear.Identity, expected mmcv.cnn.bricks.scale.Scale",
    "too narrow": "4 channels: fastctx.nn.CrissCrossAttention needs at least 8",
    "forward overridden": "its forward is overridden on the instance",
}


@pytest.mark.parametrize("change", list(VARIANTS))
def test_look_alike_structure_left_alone_and_reported(mmcv_cca, change):
    variant = cca_variant(mmcv_cca, change)
    model = nn.Sequential(nn.Conv2d(32, 32, 1), variant, cca_variant(mmcv_cca, "none"))
    keep = model[2]
    with pytest.raises(SwapError, match="could not be swapped") as info:
        swap(model, strict=True)
    assert model[1] is variant and model[2] is keep  # strict: nothing changed
    assert [e.path for e in info.value.report.left_alone] == ["1"]
    out, report = swap(model)
    assert out is model and model[1] is variant  # left alone
    assert type(model[2]).__module__ + "." + type(model[2]).__qualname__ == FAST_CCA
    [entry] = report.left_alone
    assert (entry.path, entry.original, entry.replacement) == ("1", MMCV_CCA, None)
    assert VARIANTS[change] in entry.reason, entry.reason
    assert VARIANTS[change] in str(report)


def test_hooks_mode_and_sharing_carry_over(mmcv_cca):
    cca = mmcv_cca(16)
    cca.eval()
    calls = []
    handle = cca.register_forward_hook(lambda mod, inp, out: calls.append(type(mod).__module__))
    model = nn.ModuleDict({"a": nn.Sequential(cca), "b": nn.Sequential(cca)})  # one block, two parents
    _, report = swap(model, backend="reference")
    assert len(report.swapped) == 1 and report.swapped[0].path == "a.0"
    assert model["a"][0] is model["b"][0] and model["a"][0] is not cca
    fast = model["a"][0]
    assert not fast.training
    fast(torch.randn(1, 16, 5, 6))
    assert calls == ["fastctx.nn.criss_cross"]
    assert fastctx.last_backend("criss_cross_attention") == "reference"
    handle.remove()  # the handle of the hook registered on the original still removes it
    fast(torch.randn(1, 16, 5, 6))
    assert len(calls) == 1


def test_each_submodule_keeps_its_train_flag(mmseg):
    """A head trained with frozen norm layers (mmseg ``norm_eval``, ssseg ``is_freeze_norm``) or an
    eval-mode dropout keeps them so after the swap: the flags are per submodule, not one
    ``train()`` over the replacement's subtree."""
    from mmseg.registry import MODELS

    head = MODELS.build(dict(type="ISAHead", in_channels=24, channels=16, isa_channels=8, down_factor=(4, 4),
                             num_classes=5, norm_cfg=dict(type="BN"), dropout_ratio=0.1))
    head.train()
    frozen = [name for name, m in head.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.Dropout2d))][::2]
    assert len(frozen) >= 3
    for name in frozen:
        head.get_submodule(name).eval()
    want = {name: m.training for name, m in head.named_modules()}
    fast, report = swap(head, strict=True)
    assert [e.path for e in report.swapped] == [""] and fast is not head
    got = {name: m.training for name, m in fast.named_modules()}
    assert {n: got[n] for n in want if n in got} == want
    assert all(got[n] for n in got.keys() - want.keys())  # modules the converter made: the head's flag
