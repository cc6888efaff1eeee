"""fastctx.nn.SpatialGather / ObjectAttention against mmsegmentation 1.2.2's OCR forward.

The reference below is a literal plain-torch copy of mmseg's ``SpatialGatherModule.forward``,
``SelfAttentionBlock.forward`` (with ObjectAttentionBlock's settings) and
``ObjectAttentionBlock.forward``, run with the SAME module's submodules (so its weights) in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastctx.nn._conv import ConvModule
from fastctx.nn.ocr import ObjectAttention, SpatialGather
from tests._utils import assert_close

F64 = torch.float64
BN_KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


# ---- mmseg 1.2.2, literally ----------------------------------------------------------------

def mmseg_spatial_gather(scale, feats, probs):
    """SpatialGatherModule.forward."""
    batch_size, num_classes, height, width = probs.size()
    channels = feats.size(1)
    probs = probs.view(batch_size, num_classes, -1)
    feats = feats.view(batch_size, channels, -1)
    feats = feats.permute(0, 2, 1)
    probs = F.softmax(scale * probs, dim=2)
    ocr_context = torch.matmul(probs, feats)
    ocr_context = ocr_context.permute(0, 2, 1).contiguous().unsqueeze(3)
    return ocr_context


def mmcv_conv_module(cm: ConvModule, x):
    """ConvModule.forward, order ('conv', 'norm', 'act')."""
    x = cm.conv(x)
    if cm.with_norm:
        x = cm.norm(x)
    if cm.with_activation:
        x = cm.activate(x)
    return x


def project(p, x):
    if isinstance(p, nn.Sequential):
        for cm in p:
            x = mmcv_conv_module(cm, x)
        return x
    return mmcv_conv_module(p, x)


def mmseg_object_attention(m: ObjectAttention, query_feats, key_feats):
    """SelfAttentionBlock.forward (query/key_downsample None, matmul_norm True, with_out) and
    ObjectAttentionBlock.forward (scale 1: no resize)."""
    batch_size = query_feats.size(0)
    query = project(m.query_project, query_feats)
    query = query.reshape(*query.shape[:2], -1)
    query = query.permute(0, 2, 1).contiguous()
    key = project(m.key_project, key_feats)
    value = project(m.value_project, key_feats)
    key = key.reshape(*key.shape[:2], -1)
    value = value.reshape(*value.shape[:2], -1)
    value = value.permute(0, 2, 1).contiguous()
    sim_map = torch.matmul(query, key)
    sim_map = (m.channels**-0.5) * sim_map
    sim_map = F.softmax(sim_map, dim=-1)
    context = torch.matmul(sim_map, value)
    context = context.permute(0, 2, 1).contiguous()
    context = context.reshape(batch_size, -1, *query_feats.shape[2:])
    context = project(m.out_project, context)
    return project(m.bottleneck, torch.cat([context, query_feats], dim=1))


# ---- state dict -----------------------------------------------------------------------------

def conv_module_keys(prefix: str, norm: str | None) -> list[str]:
    """mmcv ConvModule: conv.weight (+ conv.bias without a norm), then the norm's entries."""
    if norm is None:
        return [f"{prefix}.conv.weight", f"{prefix}.conv.bias"]
    entries = BN_KEYS if norm == "bn" else ["weight", "bias"]
    return [f"{prefix}.conv.weight"] + [f"{prefix}.{norm}.{e}" for e in entries]


def object_attention_keys(norm: str | None) -> list[str]:
    """SelfAttentionBlock.__init__ builds key_project (2 convs), query_project (2),
    value_project (1: a bare ConvModule), out_project (1); then ObjectAttentionBlock's bottleneck."""
    keys = []
    for name, n in (("key_project", 2), ("query_project", 2), ("value_project", 1), ("out_project", 1)):
        prefixes = [f"{name}.{i}" for i in range(n)] if n > 1 else [name]
        for p in prefixes:
            keys += conv_module_keys(p, norm)
    return keys + conv_module_keys("bottleneck", norm)


@pytest.mark.parametrize(
    "norm_cfg,abbr",
    [({"type": "BN"}, "bn"), ({"type": "SyncBN", "requires_grad": True}, "bn"), ({"type": "GN", "num_groups": 2}, "gn"), (None, None)],
    ids=["BN", "SyncBN", "GN", "none"],
)
def test_state_dict_matches_mmseg_layout(norm_cfg, abbr):
    m = ObjectAttention(12, 6, 1, None, norm_cfg, {"type": "ReLU"})
    sd = m.state_dict()
    assert list(sd) == object_attention_keys(abbr)
    assert sd["key_project.0.conv.weight"].shape == (6, 12, 1, 1)
    assert sd["value_project.conv.weight"].shape == (6, 12, 1, 1)
    assert sd["out_project.conv.weight"].shape == (12, 6, 1, 1)
    assert sd["bottleneck.conv.weight"].shape == (12, 24, 1, 1)
    # an mmseg-format checkpoint (same keys and shapes) loads strictly and lands
    ckpt = {k: (v + 3 if v.dtype == torch.long else torch.randn_like(v)) for k, v in sd.items()}
    m.load_state_dict(ckpt, strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, ckpt[k]), k


def test_conv_module_init_and_options():
    cm = ConvModule(8, 4, 1, norm_cfg={"type": "BN", "requires_grad": False, "momentum": 0.3})
    assert cm.conv.bias is None and cm.bn.momentum == 0.3
    assert torch.equal(cm.bn.weight, torch.ones(4)) and torch.equal(cm.bn.bias, torch.zeros(4))
    assert not cm.bn.weight.requires_grad
    assert isinstance(cm.activate, nn.ReLU)
    leaky = ConvModule(8, 4, 1, act_cfg={"type": "LeakyReLU", "negative_slope": 0.2, "inplace": True})
    assert isinstance(leaky.activate, nn.LeakyReLU) and leaky.activate.negative_slope == 0.2
    assert leaky.conv.bias is not None and torch.equal(leaky.conv.bias, torch.zeros(4))
    plain = ConvModule(8, 4, 1, act_cfg=None)
    assert [k for k in plain.state_dict()] == ["conv.weight", "conv.bias"] and plain.activate is None


# ---- forward and backward against mmseg ---------------------------------------------------------

CASES = [  # B, C, channels, H, W, K
    (2, 12, 6, 33, 65, 19),
    (2, 12, 6, 7, 5, 1),
    (1, 10, 6, 7, 5, 19),
]


def _ids(case):
    B, C, Cc, H, W, K = case
    return f"B{B}-C{C}x{Cc}-{H}x{W}-K{K}"


def _logits(kind: str, B: int, K: int, H: int, W: int) -> torch.Tensor:
    logits = torch.randn(B, K, H, W, dtype=F64)
    if kind == "ties":
        logits = torch.randint(0, 2, (B, K, H, W)).to(F64)
    elif kind == "owner" and K > 1:
        logits[:, K // 2] += 50.0  # one class dominates every pixel
    elif kind == "sharp":
        logits = 40.0 * logits  # near one-hot pixel weights
    return logits


def _run_both(m: nn.Module, scale: float, B, C, H, W, K, kind, train: bool):
    torch.manual_seed(0)
    x = torch.randn(B, C, H, W, dtype=F64)
    logits = _logits(kind, B, K, H, W)
    mine, ref = m.double(), copy.deepcopy(m).double()
    mine.train(train)
    ref.train(train)
    gather = SpatialGather(scale)

    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ls = [logits.clone().requires_grad_(True) for _ in range(2)]
    out = mine(xs[0], gather(xs[0], ls[0]))
    want = mmseg_object_attention(ref, xs[1], mmseg_spatial_gather(scale, xs[1], ls[1]))
    assert_close(out, want, F64, "out")
    dout = torch.randn_like(want)
    out.backward(dout)
    want.backward(dout)
    assert_close(xs[0].grad, xs[1].grad, F64, "grad x")
    assert_close(ls[0].grad, ls[1].grad, F64, "grad logits")
    for (n, p), q in zip(mine.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, F64, f"grad {n}")
    for (n, b), c in zip(mine.named_buffers(), ref.buffers()):
        assert_close(b, c, F64, f"buffer {n}")
    return out


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_object_attention_matches_mmseg(case, train):
    B, C, Cc, H, W, K = case
    torch.manual_seed(1)
    m = ObjectAttention(C, Cc, 1, None, {"type": "BN"}, {"type": "ReLU"})
    if not train:  # non-trivial running statistics
        for b in m.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.running_mean.uniform_(-0.5, 0.5)
                b.running_var.uniform_(0.5, 2.0)
                b.weight.data.uniform_(0.5, 1.5)
                b.bias.data.uniform_(-0.2, 0.2)
    _run_both(m, 1.0, B, C, H, W, K, "random", train)


@pytest.mark.parametrize("kind", ["ties", "owner", "sharp"])
def test_object_attention_special_logits(kind):
    torch.manual_seed(2)
    m = ObjectAttention(12, 6, 1, None, {"type": "BN"}, {"type": "ReLU"})
    _run_both(m, 2.0, 2, 12, 7, 5, 19, kind, True)


@pytest.mark.parametrize("norm_cfg", [None, {"type": "GN", "num_groups": 3}], ids=["no-norm", "GN"])
def test_object_attention_other_norms(norm_cfg):
    torch.manual_seed(3)
    m = ObjectAttention(12, 6, 1, None, norm_cfg, {"type": "LeakyReLU", "negative_slope": 0.1})
    _run_both(m, 1.0, 2, 12, 7, 5, 4, "random", True)


def test_spatial_gather_matches_mmseg_and_passes_backend():
    torch.manual_seed(4)
    feats, probs = torch.randn(2, 10, 33, 65, dtype=F64), torch.randn(2, 19, 33, 65, dtype=F64)
    got = SpatialGather(3, backend="reference")(feats, probs)
    assert got.shape == (2, 10, 19, 1)
    assert_close(got, mmseg_spatial_gather(3, feats, probs), F64, "regions")
    import fastctx

    assert fastctx.last_backend("spatial_gather") == "reference"
    with pytest.raises(fastctx.BackendUnavailableError):
        SpatialGather(1, backend="cuda")(feats, probs)
    with pytest.raises(fastctx.BackendUnavailableError):
        ObjectAttention(10, 6, backend="cuda").double()(feats, got)


def test_object_attention_accepts_3d_regions():
    torch.manual_seed(5)
    m = ObjectAttention(12, 6).double().eval()
    x, regions = torch.randn(2, 12, 7, 5, dtype=F64), torch.randn(2, 12, 4, dtype=F64)
    assert torch.equal(m(x, regions), m(x, regions.unsqueeze(3)))


# ---- bad inputs -------------------------------------------------------------------------

def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"ObjectAttention: scale=2 is not supported"):
        ObjectAttention(12, 6, 2)
    with pytest.raises(ValueError, match=r"norm_cfg type 'LN' is not supported"):
        ObjectAttention(12, 6, 1, None, {"type": "LN"})
    with pytest.raises(TypeError, match=r"act_cfg must be None or a dict with a 'type'"):
        ObjectAttention(12, 6, 1, None, {"type": "BN"}, "ReLU")
    with pytest.raises(ValueError, match=r"act_cfg type 'Swish' is not supported"):
        ConvModule(4, 4, 1, act_cfg={"type": "Swish"})
    with pytest.raises(ValueError, match=r"only conv_cfg=None or dict\(type='Conv2d'\) is supported, got \{'type': 'DCNv2'\}"):
        ConvModule(4, 4, 1, conv_cfg={"type": "DCNv2"})


def test_bad_forward_inputs():
    m = ObjectAttention(12, 6).eval()
    x = torch.randn(2, 12, 7, 5)
    with pytest.raises(ValueError, match=r"query_feats must be \[B, 12, H, W\], got \(2, 8, 7, 5\)"):
        m(torch.randn(2, 8, 7, 5), torch.randn(2, 8, 4, 1))
    with pytest.raises(ValueError, match=r"key_feats must be the regions .* got \(3, 12, 4, 1\)"):
        m(x, torch.randn(3, 12, 4, 1))
    with pytest.raises(ValueError, match=r"key_feats must be the regions .* got \(2, 12, 4, 2\)"):
        m(x, torch.randn(2, 12, 4, 2))
    with pytest.raises(TypeError, match=r"key_feats must be a torch.Tensor, got list"):
        m(x, [1, 2])
    one_region = torch.randn(1, 12, 1, 1)  # mmseg's BN on [1, C, 1, 1] regions refuses training too
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training"):
        m.train()(x[:1], one_region)
    with pytest.raises(ValueError, match=r"fastctx.spatial_gather: scale must be positive"):
        SpatialGather(0)(x, torch.randn(2, 4, 7, 5))
    with pytest.raises(ValueError, match=r"fastctx.spatial_gather: feats and logits must agree"):
        SpatialGather()(x, torch.randn(2, 4, 7, 6))
