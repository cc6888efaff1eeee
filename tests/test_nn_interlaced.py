"""fastctx.nn.InterlacedSparseAttention against mmseg 1.2.2's ISAHead, re-implemented here.

``_mm_*`` below copy the logic of mmsegmentation 1.2.2 (``decode_heads/isa_head.py``, on the
shared pieces of tests/mmseg_reference.py: mmcv 2.1's ``ConvModule``, the attention of
``utils/self_attention_block.py``) in plain torch, and run it with the weights of the module under
test. mmseg itself is not imported.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastctx
from fastctx.nn._conv import ConvModule
from fastctx.nn.interlaced import InterlacedSparseAttention
from tests._utils import AUTO, assert_close
from tests.mmseg_reference import (
    BN_KEYS, F64, assert_compiles_fullgraph, compare_modules, conv_module_keys, mm_attention, mm_conv_module, pair,
    randomize,
)


# ---------------------------------------------------------------- mmseg, re-implemented literally


def _mm_self_attention_block(blk: nn.Module, x: torch.Tensor, isa_channels: int) -> torch.Tensor:
    """isa_head.SelfAttentionBlock.forward: the base block with query = key = x, then
    output_project. key/query_project: Sequential of 2 ConvModules; value_project: Conv2d."""
    query_feats = key_feats = x
    batch_size = query_feats.size(0)
    query = query_feats
    for cm in blk.query_project:
        query = mm_conv_module(cm, query)
    key = key_feats
    for cm in blk.key_project:
        key = mm_conv_module(cm, key)
    value = F.conv2d(key_feats, blk.value_project.weight, blk.value_project.bias)
    context = mm_attention(query, key, value, isa_channels)
    context = context.reshape(batch_size, -1, *query_feats.shape[2:])
    return mm_conv_module(blk.output_project, context)  # with_out=False: no out_project


def _mm_isa(m: nn.Module, x: torch.Tensor, down_factor, isa_channels: int) -> torch.Tensor:
    """ISAHead.forward between in_conv and out_conv."""
    n, c, h, w = x.size()
    loc_h, loc_w = down_factor
    glb_h, glb_w = math.ceil(h / loc_h), math.ceil(w / loc_w)
    pad_h, pad_w = glb_h * loc_h - h, glb_w * loc_w - w
    if pad_h > 0 or pad_w > 0:
        padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        x = F.pad(x, padding)
    x = x.view(n, c, glb_h, loc_h, glb_w, loc_w)
    x = x.permute(0, 3, 5, 1, 2, 4)
    x = x.reshape(-1, c, glb_h, glb_w)
    x = _mm_self_attention_block(m.global_relation, x, isa_channels)
    x = x.view(n, loc_h, loc_w, c, glb_h, glb_w)
    x = x.permute(0, 4, 5, 3, 1, 2)
    x = x.reshape(-1, c, loc_h, loc_w)
    x = _mm_self_attention_block(m.local_relation, x, isa_channels)
    x = x.view(n, glb_h, glb_w, c, loc_h, loc_w)
    x = x.permute(0, 3, 1, 4, 2, 5)
    x = x.reshape(n, c, glb_h * loc_h, glb_w * loc_w)
    if pad_h > 0 or pad_w > 0:
        x = x[:, :, pad_h // 2 : pad_h // 2 + h, pad_w // 2 : pad_w // 2 + w]
    return x


def _isahead_keys(prefix: str) -> list[str]:
    """State-dict keys of isa_head.SelfAttentionBlock, in registration order: the base block
    registers key_project, query_project (2 ConvModules each: conv without bias + bn),
    value_project (Conv2d with bias), out_project=None (no keys); then output_project."""
    keys = []
    for proj in ("key_project", "query_project"):
        keys += conv_module_keys(f"{prefix}.{proj}.0") + conv_module_keys(f"{prefix}.{proj}.1")
    keys += [f"{prefix}.value_project.weight", f"{prefix}.value_project.bias"]
    return keys + conv_module_keys(f"{prefix}.output_project")


# ------------------------------------------------------------------------------------- tests


def test_state_dict_keys_are_isaheads():
    m = InterlacedSparseAttention(24, 10)
    sd = m.state_dict()
    assert list(sd) == _isahead_keys("global_relation") + _isahead_keys("local_relation")
    shapes = {
        "global_relation.key_project.0.conv.weight": (10, 24, 1, 1),
        "global_relation.key_project.1.conv.weight": (10, 10, 1, 1),
        "local_relation.query_project.1.bn.running_var": (10,),
        "local_relation.value_project.weight": (24, 24, 1, 1),
        "local_relation.value_project.bias": (24,),
        "global_relation.output_project.conv.weight": (24, 24, 1, 1),
        "global_relation.output_project.bn.weight": (24,),
    }
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    # An mmseg ISAHead checkpoint: strip "decode_head." from the two relations' keys, load strictly.
    head = {f"decode_head.{k}": torch.randn(v.shape) if v.is_floating_point() else v + 3 for k, v in sd.items()}
    head["decode_head.in_conv.conv.weight"] = torch.randn(24, 24, 3, 3)
    head["decode_head.conv_seg.weight"] = torch.randn(19, 24, 1, 1)
    mine = {k[len("decode_head."):]: v for k, v in head.items() if k.split(".")[1] in ("global_relation", "local_relation")}
    m.load_state_dict(mine, strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, head[f"decode_head.{k}"]), k


def test_state_dict_round_trip():
    a = randomize(InterlacedSparseAttention(12, 6, (4, 4))).double().eval()
    b = InterlacedSparseAttention(12, 6, (4, 4)).double().eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(1, 12, 9, 10, dtype=F64)
    assert torch.equal(a(x), b(x))


CASES = [  # (H, W, down_factor)
    (97, 97, (8, 8)),  # pad 7: 3 top/left, 4 bottom/right
    (33, 65, (8, 8)),
    (16, 24, (8, 8)),  # no padding
    (13, 11, (4, 3)),  # pad 3 / 1, non-square groups
]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("H,W,df", CASES, ids=[f"{h}x{w}-df{d[0]}x{d[1]}" for h, w, d in CASES])
def test_matches_mmseg_isahead(H, W, df, train):
    C, Cqk = 12, 6
    m = randomize(InterlacedSparseAttention(C, Cqk, df, backend="reference")).double().train(train)
    ref = copy.deepcopy(m)
    x, xr = pair(2, C, H, W)
    out = m(x)
    assert fastctx.last_backend("interlaced_attention") == "reference"
    want = _mm_isa(ref, xr, df, Cqk)
    assert_close(out, want, F64, "out")
    dout = torch.randn_like(out)
    out.backward(dout)
    want.backward(dout)
    assert_close(x.grad, xr.grad, F64, "grad x")
    compare_modules(m, ref, "train" if train else "eval")  # parameter grads, BN running stats
    # One SGD step on both, then an eval forward: same weights, same statistics, same output.
    for mod in (m, ref):
        with torch.no_grad():
            for p in mod.parameters():
                p -= 0.1 * p.grad
        mod.eval()
    x2 = torch.randn(1, C, H, W, dtype=F64)
    with torch.no_grad():
        assert_close(m(x2), _mm_isa(ref, x2, df, Cqk), F64, "out after a step")


def test_float32_module_matches_float64_mmseg():
    m = randomize(InterlacedSparseAttention(12, 6)).eval()
    x = torch.randn(2, 12, 33, 65)
    want = _mm_isa(copy.deepcopy(m).double(), x.double(), (8, 8), 6)
    assert_close(m(x), want, torch.float32, "out")


@pytest.mark.parametrize("mask_padding", [False, True])
def test_compile_fullgraph(mask_padding):
    m = randomize(InterlacedSparseAttention(8, 4, (4, 4), mask_padding=mask_padding)).train()
    assert_compiles_fullgraph(m, torch.randn(2, 8, 9, 10, requires_grad=True))


# ------------------------------------------------------------------------------ mask_padding


def _dense_masked_isa(m: nn.Module, x: torch.Tensor, df, isa_channels: int) -> torch.Tensor:
    """mask_padding=True written independently: dense N x N attention whose mask allows key
    ``p`` for query ``r`` iff they share a group AND ``p`` is not padding; no allowed key ->
    zero context."""
    n, c, h, w = x.shape
    bh, bw = df
    Hp, Wp = math.ceil(h / bh) * bh, math.ceil(w / bw) * bw
    top, left = (Hp - h) // 2, (Wp - w) // 2
    x = F.pad(x, (left, Wp - w - left, top, Hp - h - top))
    i = torch.arange(Hp)[:, None].expand(Hp, Wp).reshape(-1)
    j = torch.arange(Wp)[None, :].expand(Hp, Wp).reshape(-1)
    valid = ((i >= top) & (i < top + h) & (j >= left) & (j < left + w))
    groups = {"long": (i % bh) * bw + (j % bw), "short": (i // bh) * (Wp // bw) + (j // bw)}
    for blk, mode in ((m.global_relation, "long"), (m.local_relation, "short")):
        allowed = (groups[mode][:, None] == groups[mode][None, :]) & valid[None, :]  # [N, N]
        q, k = x, x
        for cm in blk.query_project:
            q = mm_conv_module(cm, q)
        for cm in blk.key_project:
            k = mm_conv_module(cm, k)
        v = F.conv2d(x, blk.value_project.weight, blk.value_project.bias)
        e = isa_channels**-0.5 * torch.einsum("bcn,bcm->bnm", q.flatten(2), k.flatten(2))
        e = e.masked_fill(~allowed, float("-inf"))
        has = allowed.any(1)
        a = torch.softmax(torch.where(has[:, None], e, torch.zeros_like(e)), -1) * has[:, None]
        ctx = torch.einsum("bnm,bcm->bcn", a, v.flatten(2)).reshape(n, -1, Hp, Wp)
        x = mm_conv_module(blk.output_project, ctx)
    return x[:, :, top : top + h, left : left + w]


MASK_CASES = [(13, 11, (4, 3)), (5, 13, (8, 4))]  # the second has groups made only of padding


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("H,W,df", MASK_CASES, ids=[f"{h}x{w}-df{d[0]}x{d[1]}" for h, w, d in MASK_CASES])
def test_mask_padding_matches_dense_masked_attention(H, W, df, train):
    C, Cqk = 8, 4
    m = randomize(InterlacedSparseAttention(C, Cqk, df, mask_padding=True)).double().train(train)
    ref = copy.deepcopy(m)
    x, xr = pair(2, C, H, W)
    out = m(x)
    want = _dense_masked_isa(ref, xr, df, Cqk)
    assert_close(out, want, F64, "out")
    dout = torch.randn_like(out)
    out.backward(dout)
    want.backward(dout)
    assert_close(x.grad, xr.grad, F64, "grad x")
    compare_modules(m, ref, "masked")
    # ... and it is a different semantics from mmseg's: the padded keys matter there.
    unmasked = InterlacedSparseAttention(C, Cqk, df).double().train(train)
    unmasked.load_state_dict(ref.state_dict())
    assert not torch.allclose(unmasked(x.detach()), out.detach())


def test_mask_padding_without_padding_is_the_op():
    a = randomize(InterlacedSparseAttention(8, 4, (4, 4), mask_padding=True)).double().eval()
    b = InterlacedSparseAttention(8, 4, (4, 4)).double().eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 8, 12, 16, dtype=F64)
    assert torch.equal(a(x), b(x))
    assert fastctx.last_backend("interlaced_attention") == AUTO  # the op ran, not the masked path


def test_mask_padding_float32_finite():
    m = InterlacedSparseAttention(8, 4, (8, 4), mask_padding=True).train()
    x = torch.randn(2, 8, 5, 13, requires_grad=True)
    out = m(x)
    out.sum().backward()
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------- ConvModule, errors


def test_conv_module_layout_and_init():
    cm = ConvModule(6, 5, 1, norm_cfg=None)
    assert list(cm.state_dict()) == ["conv.weight", "conv.bias"]  # mmcv bias='auto'
    assert torch.equal(cm.conv.bias, torch.zeros(5))
    cm = ConvModule(6, 8, 1, norm_cfg=dict(type="GN", num_groups=2, requires_grad=False), act_cfg=dict(type="PReLU"))
    assert list(cm.state_dict()) == ["conv.weight", "gn.weight", "gn.bias", "activate.weight"]
    assert not cm.gn.weight.requires_grad and torch.equal(cm.gn.weight, torch.ones(8))
    cm = ConvModule(6, 8, 3, padding=1, norm_cfg=dict(type="SyncBN"))
    assert list(cm.state_dict()) == ["conv.weight"] + [f"bn.{k}" for k in BN_KEYS]
    assert isinstance(cm.bn, nn.SyncBatchNorm) and cm.activate.inplace
    # kaiming normal, fan_out: std = sqrt(2 / (out * k * k))
    w = ConvModule(64, 256, 1, norm_cfg=dict(type="BN")).conv.weight
    assert abs(w.std().item() - math.sqrt(2 / 256)) < 0.1 * math.sqrt(2 / 256)


def test_bad_arguments():
    name = "fastctx.nn.InterlacedSparseAttention"
    m = InterlacedSparseAttention(8, 4)
    with pytest.raises(ValueError, match=rf"{name}: x must be \[B, 8, H, W\], got \(2, 6, 9, 9\)"):
        m(torch.randn(2, 6, 9, 9))
    with pytest.raises(ValueError, match=rf"{name}: x must be"):
        m(torch.randn(8, 9, 9))
    with pytest.raises(ValueError, match="down_factor must be two positive ints"):
        InterlacedSparseAttention(8, 4, (8, 0))
    with pytest.raises(ValueError, match="mask_padding=True .* backend must be None or 'reference'"):
        InterlacedSparseAttention(8, 4, mask_padding=True, backend="cpu")
    with pytest.raises(ValueError, match="norm_cfg type 'LN' is not supported"):
        InterlacedSparseAttention(8, 4, norm_cfg=dict(type="LN"))
    with pytest.raises(ValueError, match="only conv_cfg=None"):
        InterlacedSparseAttention(8, 4, conv_cfg=dict(type="DCN"))
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        InterlacedSparseAttention(8, 4, backend="nope").eval()(torch.randn(1, 8, 8, 8))
