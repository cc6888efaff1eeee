"""mmcv 2.1 / mmsegmentation 1.2.2 building blocks re-implemented in plain torch, and the helpers
that run them against a fastctx module (tests/test_nn_ann.py, tests/test_nn_interlaced.py).

They copy the logic of mmcv's ``ConvModule`` and of the base ``SelfAttentionBlock`` of
``mmseg/models/utils/self_attention_block.py`` and run it with the weights of the module under
test. mmseg itself is not imported.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from tests._utils import assert_close

F64 = torch.float64
BN_KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def mm_conv_module(cm: nn.Module, x: torch.Tensor, act: bool = True) -> torch.Tensor:
    """mmcv ConvModule.forward, order ('conv', 'norm', 'act'), BN (+ ReLU)."""
    x = F.conv2d(x, cm.conv.weight, cm.conv.bias)
    bn = cm.bn
    if bn.training:
        bn.num_batches_tracked += 1
    x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, 0.1, 1e-5)
    return F.relu(x) if act else x


def mm_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, channels: int) -> torch.Tensor:
    """The attention of self_attention_block.SelfAttentionBlock.forward, matmul_norm=True, between
    the projections (and downsamplings) and the reshape of the context: ``query`` [B, C, *q],
    ``key`` [B, C, *k], ``value`` [B, Cv, *k] -> context [B, Cv, prod(q)]."""
    query = query.reshape(*query.shape[:2], -1)
    query = query.permute(0, 2, 1).contiguous()
    key = key.reshape(*key.shape[:2], -1)
    value = value.reshape(*value.shape[:2], -1)
    value = value.permute(0, 2, 1).contiguous()
    sim_map = torch.matmul(query, key)
    sim_map = (channels**-0.5) * sim_map
    sim_map = F.softmax(sim_map, dim=-1)
    context = torch.matmul(sim_map, value)
    return context.permute(0, 2, 1).contiguous()


def conv_module_keys(prefix: str) -> list[str]:
    """State-dict keys of an mmcv ConvModule with a bias-free conv and BN."""
    return [f"{prefix}.conv.weight"] + [f"{prefix}.bn.{k}" for k in BN_KEYS]


def randomize(m: nn.Module) -> nn.Module:
    """Non-trivial weights (mmseg starts some at zero, e.g. ANN's out_project) and BN statistics,
    so that every term of the forward matters."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if name.endswith("weight") else 0.2) + (1.0 if ".bn.weight" in name else 0.0))
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    return m


def pair(*shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random float64 leaf and an independent leaf copy of it, both requiring grad."""
    x = torch.randn(*shape, dtype=F64, requires_grad=True)
    return x, x.detach().clone().requires_grad_(True)


def compare_modules(got: nn.Module, want: nn.Module, what: str) -> None:
    """Every parameter gradient and every buffer (BN running statistics; the batch counters
    exactly) of ``got`` match ``want``'s in float64."""
    for (n, p), (_, q) in zip(got.named_parameters(), want.named_parameters(), strict=True):
        assert_close(p.grad, q.grad, F64, f"{what} grad {n}")
    for (n, b), (_, c) in zip(got.named_buffers(), want.named_buffers(), strict=True):
        if b.dtype == torch.long:
            assert torch.equal(b, c), f"{what} buffer {n}: {b} != {c}"
        else:
            assert_close(b, c, F64, f"{what} buffer {n}")


def assert_compiles_fullgraph(m: nn.Module, x: torch.Tensor) -> None:
    """``torch.compile(m, fullgraph=True)`` (aot_eager) gives eager's output and input gradient on
    ``x`` (a float32 leaf; each run from its own copy of ``m``, as BN updates its statistics)."""
    torch._dynamo.reset()
    ref = copy.deepcopy(m)
    got = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    (dx,) = torch.autograd.grad(got.tanh().sum(), x)
    want = ref(x)
    (wx,) = torch.autograd.grad(want.tanh().sum(), x)
    assert_close(got, want.double(), torch.float32, "out")
    assert_close(dx, wx.double(), torch.float32, "dx")
