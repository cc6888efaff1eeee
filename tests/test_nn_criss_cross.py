"""fastctx.nn.CrissCrossAttention / RCCA: mmcv's parameter layout and forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastctx
import python_ref
from tests._utils import assert_close

MMCV_KEYS = [
    "query_conv.weight", "query_conv.bias", "key_conv.weight", "key_conv.bias",
    "value_conv.weight", "value_conv.bias", "gamma.scale",
]


def test_state_dict_matches_mmcv_layout():
    m = fastctx.nn.CrissCrossAttention(64)
    sd = m.state_dict()
    assert list(sd) == MMCV_KEYS
    assert sd["query_conv.weight"].shape == (8, 64, 1, 1)
    assert sd["value_conv.weight"].shape == (64, 64, 1, 1)
    assert sd["gamma.scale"].shape == () and sd["gamma.scale"].item() == 0.0
    # an mmcv-format checkpoint (same keys and shapes) loads strictly
    m.load_state_dict({k: torch.randn_like(v) for k, v in sd.items()}, strict=True)


def _mmcv_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mmcv.ops.CrissCrossAttention.forward, in float64, with its attention from python_ref."""
    x = x.double()
    conv = lambda c: nn.functional.conv2d(x, c.weight.double(), c.bias.double())  # noqa: E731
    out = python_ref.criss_cross_attention(conv(m.query_conv), conv(m.key_conv), conv(m.value_conv))
    return m.gamma.scale.double() * out + x


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_module_matches_mmcv_forward_and_backward(backend):
    m = fastctx.nn.CrissCrossAttention(16, backend=backend)
    with torch.no_grad():
        m.gamma.scale.fill_(0.5)
    x = torch.randn(2, 16, 9, 11, requires_grad=True)
    out = m(x)
    assert fastctx.last_backend("criss_cross_attention") == backend
    dout = torch.randn_like(out)
    out.backward(dout)
    got_grads = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x64 = x.detach().double().requires_grad_(True)
    m64 = fastctx.nn.CrissCrossAttention(16).double()
    m64.load_state_dict(m.state_dict())
    ref = _mmcv_forward(m64, x64)
    ref.backward(dout.double())
    assert_close(out, ref, torch.float32, "out")
    want_grads = [x64.grad] + [p.grad for p in m64.parameters()]
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for n, g, w in zip(names, got_grads, want_grads):
        assert_close(g, w, torch.float32, f"grad {n}")


def test_rcca_applies_one_shared_block_recurrently():
    rcca = fastctx.nn.RCCA(16, recurrence=2)
    assert [k for k in rcca.state_dict()] == [f"cca.{k}" for k in MMCV_KEYS]
    with torch.no_grad():
        rcca.cca.gamma.scale.fill_(0.3)
    x = torch.randn(1, 16, 7, 8)
    assert_close(rcca(x), rcca.cca(rcca.cca(x)).double(), torch.float32, "out")
    with pytest.raises(ValueError, match="recurrence must be >= 1"):
        fastctx.nn.RCCA(16, recurrence=0)


def test_too_few_channels():
    with pytest.raises(ValueError, match="in_channels must be >= 8, got 4"):
        fastctx.nn.CrissCrossAttention(4)
