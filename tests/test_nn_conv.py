"""fastctx.nn._conv.conv_of_cat: block(cat(parts)) without the concatenation, for every block kind
the modules and the swap pass it (and the cat for any other block)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastctx.nn._conv import ConvModule, conv_of_cat
from tests._utils import assert_close
from tests.toolboxes import mmseg


def _blocks():
    yield "sequential-3x3-bias", nn.Sequential(nn.Conv2d(11, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
    yield "sequential-dilated", nn.Sequential(nn.Conv2d(11, 6, 3, padding=2, dilation=2, bias=False), nn.ReLU())
    yield "fastctx-convmodule-bn", ConvModule(11, 6, 1, norm_cfg={"type": "BN"})
    yield "fastctx-convmodule-no-norm", ConvModule(11, 6, 3, padding=1, act_cfg=None)
    mmseg()  # the stand-in mmcv._ext, then mmcv's own ConvModule
    from mmcv.cnn import ConvModule as MMConvModule

    yield "mmcv-convmodule", MMConvModule(11, 6, 3, padding=1, norm_cfg={"type": "BN"})
    yield "mmcv-convmodule-act-first", MMConvModule(11, 6, 1, norm_cfg={"type": "BN"}, order=("act", "conv", "norm"))
    hooked = nn.Sequential(nn.Conv2d(11, 6, 1), nn.ReLU())
    hooked[0].register_forward_hook(lambda m, i, o: o * 2)  # must not be bypassed
    yield "sequential-hooked-conv", hooked
    yield "sequential-norm-first", nn.Sequential(nn.BatchNorm2d(11), nn.Conv2d(11, 6, 1))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name,block", list(_blocks()), ids=lambda x: x if isinstance(x, str) else "")
def test_conv_of_cat_is_the_block_on_the_cat(name, block, train):
    torch.manual_seed(0)
    block = copy.deepcopy(block).double().train(train)  # a fresh copy per case: no stale grads
    block.zero_grad(set_to_none=True)
    for m in block.modules():  # non-trivial norms
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.3, 0.3), m.running_var.uniform_(0.5, 1.5)
    ref_block = copy.deepcopy(block)
    parts = [torch.randn(2, c, 9, 7, dtype=torch.float64, requires_grad=True) for c in (4, 7)]
    ref_parts = [p.detach().clone().requires_grad_(True) for p in parts]
    out = conv_of_cat(block, parts)
    ref = ref_block(torch.cat(ref_parts, 1))
    dout = torch.randn_like(ref)
    out.backward(dout)
    ref.backward(dout)
    assert_close(out, ref, torch.float64, "out")
    for i, (p, r) in enumerate(zip(parts, ref_parts)):
        assert_close(p.grad, r.grad, torch.float64, f"d part {i}")
    for (n, a), b in zip(block.named_parameters(), ref_block.parameters()):
        assert_close(a.grad, b.grad, torch.float64, f"d {n}")
    for (n, a), b in zip(block.named_buffers(), ref_block.buffers()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-12, atol=1e-12), n


def test_conv_of_cat_keeps_no_concatenation():
    block = nn.Sequential(nn.Conv2d(64, 8, 1, bias=False), nn.ReLU())
    parts = [torch.randn(1, 32, 16, 16, requires_grad=True) for _ in range(2)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t.shape), t)[1], lambda t: t):
        conv_of_cat(block, parts)
    assert (1, 64, 16, 16) not in [tuple(s) for s in saved]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t.shape), t)[1], lambda t: t):
        block(torch.cat(parts, 1))
    assert (1, 64, 16, 16) in [tuple(s) for s in saved]  # what the cat version keeps


def test_conv_of_cat_under_autocast_keeps_the_dtype():
    block = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU())
    parts = [torch.randn(1, 4, 5, 5) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = conv_of_cat(block, parts), block(torch.cat(parts, 1))
    assert got.dtype == want.dtype == torch.bfloat16
    assert_close(got.float(), want.double(), torch.bfloat16, "out")
