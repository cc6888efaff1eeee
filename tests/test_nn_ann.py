"""fastctx.nn.APNB / AFNB against mmseg 1.2.2's ANN blocks, re-implemented here.

``_mm_*`` below copy the logic of mmsegmentation 1.2.2 (``decode_heads/ann_head.py``, on the
shared pieces of tests/mmseg_reference.py: mmcv 2.1's ``ConvModule``, the attention of
``utils/self_attention_block.py``) in plain torch, and run it with the weights of the module under
test. mmseg itself is not imported.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastctx
from fastctx.nn.ann import AFNB, APNB
from tests._utils import AUTO, assert_close
from tests.mmseg_reference import (
    F64, assert_compiles_fullgraph, compare_modules, conv_module_keys, mm_attention, mm_conv_module, pair, randomize,
)


# ---------------------------------------------------------------- mmseg, re-implemented literally


def _mm_ppm_concat(feats: torch.Tensor, pool_scales) -> torch.Tensor:
    """ann_head.PPMConcat.forward."""
    ppm_outs = [F.adaptive_avg_pool2d(feats, s).view(*feats.shape[:2], -1) for s in pool_scales]
    return torch.cat(ppm_outs, dim=2)


def _mm_sab(blk, query_feats, key_feats, channels, query_scale, key_pool_scales, upsample=False):
    """ann_head.SelfAttentionBlock = utils.SelfAttentionBlock.forward with key_query_num_convs=1,
    key_query_norm=True, value_out_num_convs=1, value_out_norm=False (plain convs),
    matmul_norm=True, with_out=True, query_downsample=MaxPool2d(query_scale) if > 1,
    key_downsample=PPMConcat(key_pool_scales).

    ``upsample=True``: the reshape of the context to the query's full size (which raises when
    query_scale > 1) is replaced by OCNet's fix: keep the pooled size, out_project, bilinear
    upsample with align_corners=True.
    """
    batch_size = query_feats.size(0)
    query = mm_conv_module(blk.query_project, query_feats)
    if query_scale > 1:
        query = F.max_pool2d(query, kernel_size=query_scale)
    pooled_hw = query.shape[2:]
    key = mm_conv_module(blk.key_project, key_feats)
    value = F.conv2d(key_feats, blk.value_project.weight, blk.value_project.bias)
    key = _mm_ppm_concat(key, key_pool_scales)
    value = _mm_ppm_concat(value, key_pool_scales)
    context = mm_attention(query, key, value, channels)
    if not upsample:
        context = context.reshape(batch_size, -1, *query_feats.shape[2:])
        return F.conv2d(context, blk.out_project.weight, blk.out_project.bias)
    context = context.reshape(batch_size, -1, *pooled_hw)
    context = F.conv2d(context, blk.out_project.weight, blk.out_project.bias)
    return F.interpolate(context, size=query_feats.shape[2:], mode="bilinear", align_corners=True)


def _mm_apnb(m, feats, channels, query_scales, key_pool_scales, upsample=False):
    priors = [
        _mm_sab(stage, feats, feats, channels, s, key_pool_scales, upsample)
        for stage, s in zip(m.stages, query_scales, strict=True)
    ]
    context = torch.stack(priors, dim=0).sum(dim=0)
    return mm_conv_module(m.bottleneck, torch.cat([context, feats], 1))


def _mm_afnb(m, low_feats, high_feats, channels, query_scales, key_pool_scales, upsample=False):
    priors = [
        _mm_sab(stage, high_feats, low_feats, channels, s, key_pool_scales, upsample)
        for stage, s in zip(m.stages, query_scales, strict=True)
    ]
    context = torch.stack(priors, dim=0).sum(dim=0)
    return mm_conv_module(m.bottleneck, torch.cat([context, high_feats], 1), act=False)  # act_cfg=None


def _ann_keys(n_stages: int) -> list[str]:
    """State-dict keys of mmseg's APNB / AFNB: per stage the base SelfAttentionBlock registers
    key_project, query_project (one ConvModule each; with share_key_query the same module under
    both names, and state_dict lists both), value_project and out_project (Conv2d with bias),
    then query_downsample / key_downsample (no parameters); then the bottleneck ConvModule."""

    keys = []
    for i in range(n_stages):
        p = f"stages.{i}"
        keys += conv_module_keys(f"{p}.key_project") + conv_module_keys(f"{p}.query_project")
        keys += [f"{p}.value_project.weight", f"{p}.value_project.bias"]
        keys += [f"{p}.out_project.weight", f"{p}.out_project.bias"]
    return keys + conv_module_keys("bottleneck")


# ---------------------------------------------------------------------------------- helpers


def _check_step(m, ref, inputs, ref_inputs, forward_ref, what):
    """Output, input and parameter gradients, BN running stats after the step."""
    out = m(*inputs)
    assert fastctx.last_backend("pyramid_attention") == AUTO  # the module's backend=None
    want = forward_ref(ref, *ref_inputs)
    assert_close(out, want, F64, f"{what} out")
    dout = torch.randn_like(out)
    out.backward(dout)
    want.backward(dout)
    for i, (x, xr) in enumerate(zip(inputs, ref_inputs, strict=True)):
        assert_close(x.grad, xr.grad, F64, f"{what} grad input {i}")
    compare_modules(m, ref, what)


# ------------------------------------------------------------------------------------- tests


def test_state_dict_keys_are_anns():
    apnb = APNB(12, 6, 12, query_scales=(1, 1))
    sd = apnb.state_dict()
    assert list(sd) == _ann_keys(2)
    assert tuple(sd["stages.1.query_project.conv.weight"].shape) == (6, 12, 1, 1)
    assert apnb.stages[0].query_project is apnb.stages[0].key_project  # shared, as in mmseg
    assert tuple(sd["stages.0.out_project.weight"].shape) == (12, 6, 1, 1)
    assert tuple(sd["bottleneck.conv.weight"].shape) == (12, 24, 1, 1)
    afnb = AFNB(8, 10, 6, 10)
    sd = afnb.state_dict()
    assert list(sd) == _ann_keys(1)
    assert tuple(sd["stages.0.key_project.conv.weight"].shape) == (6, 8, 1, 1)
    assert tuple(sd["stages.0.query_project.conv.weight"].shape) == (6, 10, 1, 1)
    assert tuple(sd["stages.0.value_project.weight"].shape) == (6, 8, 1, 1)
    assert tuple(sd["bottleneck.conv.weight"].shape) == (10, 20, 1, 1)
    # mmseg initialises out_project to zero (it is a plain conv, not a ConvModule)
    assert not afnb.stages[0].out_project.weight.any() and not afnb.stages[0].out_project.bias.any()


def test_load_from_annhead_checkpoint():
    """ANNHead holds fusion = AFNB(low, high, project, out=high) and context = APNB(channels)."""
    fusion, context = AFNB(8, 10, 6, 10), APNB(12, 6, 12)
    head = {}
    for prefix, mod in (("decode_head.fusion.", fusion), ("decode_head.context.", context)):
        for k, v in mod.state_dict().items():
            head[prefix + k] = torch.randn(v.shape) if v.is_floating_point() else v + 5
    # mmseg's checkpoint holds the shared key/query projection once under each name, equal
    for k in list(head):
        if ".context.stages.0.query_project." in k:
            head[k] = head[k.replace("query_project", "key_project")]
    head["decode_head.bottleneck.conv.weight"] = torch.randn(12, 10, 3, 3)
    for prefix, mod in (("decode_head.fusion.", fusion), ("decode_head.context.", context)):
        mod.load_state_dict({k[len(prefix):]: v for k, v in head.items() if k.startswith(prefix)}, strict=True)
        for k, v in mod.state_dict().items():
            assert torch.equal(v, head[prefix + k]), k


def test_state_dict_round_trip():
    a = randomize(AFNB(8, 10, 6, 10, query_scales=(1, 2))).double().eval()
    b = AFNB(8, 10, 6, 10, query_scales=(1, 2)).double().eval()
    b.load_state_dict(a.state_dict(), strict=True)
    low, high = torch.randn(1, 8, 9, 7, dtype=F64), torch.randn(1, 10, 11, 13, dtype=F64)
    assert torch.equal(a(low, high), b(low, high))


APNB_CASES = [  # (H, W, query_scales, key_pool_scales)
    (33, 65, (1,), (1, 3, 6, 8)),
    (17, 23, (1, 1), (1, 2, 5)),  # two stages, summed
]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("H,W,qs,ks", APNB_CASES, ids=[f"{h}x{w}-q{len(q)}-k{len(k)}" for h, w, q, k in APNB_CASES])
def test_apnb_matches_mmseg(H, W, qs, ks, train):
    C, Cp = 10, 6
    m = randomize(APNB(C, Cp, C, qs, ks)).double().train(train)
    ref = copy.deepcopy(m)
    x, xr = pair(2, C, H, W)
    _check_step(m, ref, (x,), (xr,), lambda r, f: _mm_apnb(r, f, Cp, qs, ks), "apnb")
    if train:  # mmseg runs the shared key/query ConvModule twice: its BN counts 2 batches
        assert m.stages[0].key_project.bn.num_batches_tracked.item() == 2


AFNB_CASES = [  # (low H, W), (high H, W)
    ((33, 65), (33, 65)),
    ((17, 23), (33, 65)),  # different query and key sizes
]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("low,high", AFNB_CASES, ids=[f"low{a[0]}x{a[1]}-high{b[0]}x{b[1]}" for a, b in AFNB_CASES])
def test_afnb_matches_mmseg(low, high, train):
    Cl, Ch, Cp, Co = 8, 10, 6, 12
    qs, ks = (1,), (1, 3, 6, 8)
    m = randomize(AFNB(Cl, Ch, Cp, Co, qs, ks)).double().train(train)
    ref = copy.deepcopy(m)
    lo, lor = pair(2, Cl, *low)
    hi, hir = pair(2, Ch, *high)
    _check_step(m, ref, (lo, hi), (lor, hir), lambda r, a, b: _mm_afnb(r, a, b, Cp, qs, ks), "afnb")


def test_mmseg_query_scale_above_one_raises():
    """Why query_scales > 1 cannot follow mmseg: its forward reshapes the pooled context to the
    query's full size, which fails (no mmseg checkpoint can use it)."""
    m = randomize(APNB(8, 6, 8, query_scales=(2,))).double()
    x = torch.randn(1, 8, 16, 16, dtype=F64)
    with pytest.raises(RuntimeError):
        _mm_apnb(m, x, 6, (2,), (1, 3))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_query_scales_upsample_back(train):
    """query_scales > 1: max-pool the projected query, attend, upsample back (OCNet's fix)."""
    C, Cp, qs, ks = 8, 6, (1, 2, 3), (1, 3, 6)
    m = randomize(APNB(C, Cp, C, qs, ks)).double().train(train)
    ref = copy.deepcopy(m)
    x, xr = pair(2, C, 17, 23)  # not divisible by 2 or 3: max-pool drops the remainder
    _check_step(m, ref, (x,), (xr,), lambda r, f: _mm_apnb(r, f, Cp, qs, ks, upsample=True), "apnb")
    a = randomize(AFNB(6, 8, 5, 8, (2,), ks)).double().train(train)
    ref = copy.deepcopy(a)
    lo, lor = pair(2, 6, 9, 11)
    hi, hir = pair(2, 8, 21, 14)
    _check_step(a, ref, (lo, hi), (lor, hir), lambda r, p, q: _mm_afnb(r, p, q, 5, (2,), ks, upsample=True), "afnb")


def test_float32_module_matches_float64_mmseg():
    m = randomize(AFNB(8, 10, 6, 12)).eval()
    low, high = torch.randn(2, 8, 17, 23), torch.randn(2, 10, 33, 65)
    want = _mm_afnb(copy.deepcopy(m).double(), low.double(), high.double(), 6, (1,), (1, 3, 6, 8))
    assert_close(m(low, high), want, torch.float32, "out")


def test_compile_fullgraph():
    m = randomize(APNB(8, 4, 8, query_scales=(1, 2))).train()
    assert_compiles_fullgraph(m, torch.randn(2, 8, 9, 10, requires_grad=True))


def test_fresh_blocks_start_as_mmseg():
    """out_project starts at zero, so a fresh block's context is zero."""
    m = APNB(8, 4, 8).double().eval()
    x = torch.randn(1, 8, 9, 9, dtype=F64)
    want = m.bottleneck(torch.cat([torch.zeros_like(x), x], 1))
    assert torch.equal(m(x), want)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"fastctx.nn.APNB: out_channels \(6\) must equal in_channels \(8\)"):
        APNB(8, 4, 6)
    with pytest.raises(ValueError, match=r"fastctx.nn.APNB: feats must be \[B, 8, H, W\], got \(1, 7, 5, 5\)"):
        APNB(8, 4, 8)(torch.randn(1, 7, 5, 5))
    with pytest.raises(ValueError, match="query_scales must be a non-empty sequence of positive ints"):
        APNB(8, 4, 8, query_scales=(0,))
    with pytest.raises(ValueError, match="key_pool_scales must be a non-empty sequence"):
        AFNB(8, 4, 4, 8, key_pool_scales=())
    afnb = AFNB(6, 8, 4, 8)
    with pytest.raises(ValueError, match=r"fastctx.nn.AFNB: high_feats must be \[B, 8, H, W\]"):
        afnb(torch.randn(1, 6, 5, 5), torch.randn(1, 6, 5, 5))
    with pytest.raises(ValueError, match="must have the same batch size"):
        afnb(torch.randn(2, 6, 5, 5), torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        APNB(8, 4, 8, backend="nope").eval()(torch.randn(1, 8, 5, 5))
