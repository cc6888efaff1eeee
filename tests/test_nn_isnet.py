"""fastctx.nn.SemanticLevelContext / ImageLevelContext against sssegmentation 1.7.0's forward.

The reference below is a literal plain-torch copy of sssegmentation's ``SemanticLevelContext``
(the per-class Python loop of the pooling, then the dense ``N x N`` ``SelfAttentionBlock``),
``ImageLevelContext`` and ``SelfAttentionBlock.forward``, run with the SAME module's submodules
(so its weights) in float64: outputs, input and parameter gradients, and the buffers (BN running
statistics) after the step, in eval and train mode.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastctx
import fastctx.nn.isnet as isnet
from fastctx.nn.isnet import ImageLevelContext, SemanticLevelContext
from tests._utils import assert_close

F64 = torch.float64
BN = {"type": "BatchNorm2d"}
RELU = {"type": "ReLU", "inplace": True}


# ---- sssegmentation 1.7.0, literally ------------------------------------------------------

def ssseg_self_attention(sab, query_feats, key_feats):
    """SelfAttentionBlock.forward (no downsampling, matmul_norm, with_out_project)."""
    batch_size = query_feats.size(0)
    query = sab.query_project(query_feats)
    query = query.reshape(*query.shape[:2], -1)
    query = query.permute(0, 2, 1).contiguous()
    key = sab.key_project(key_feats)
    value = sab.value_project(key_feats)
    key = key.reshape(*key.shape[:2], -1)
    value = value.reshape(*value.shape[:2], -1)
    value = value.permute(0, 2, 1).contiguous()
    sim_map = torch.matmul(query, key)
    sim_map = (sab.transform_channels**-0.5) * sim_map
    sim_map = F.softmax(sim_map, dim=-1)
    context = torch.matmul(sim_map, value)
    context = context.permute(0, 2, 1).contiguous()
    context = context.reshape(batch_size, -1, *query_feats.shape[2:])
    context = sab.out_project(context)
    return context


def ssseg_semantic_level(m, x, preds, feats_il):
    """SemanticLevelContext.forward."""
    inputs = x
    batch_size, num_channels, h, w = x.size()
    num_classes = preds.size(1)
    feats_sl = torch.zeros(batch_size, h * w, num_channels).type_as(x)
    for batch_idx in range(batch_size):
        feats_iter, preds_iter = x[batch_idx], preds[batch_idx]
        feats_iter, preds_iter = feats_iter.reshape(num_channels, -1), preds_iter.reshape(num_classes, -1)
        feats_iter, preds_iter = feats_iter.permute(1, 0), preds_iter.permute(1, 0)
        argmax = preds_iter.argmax(1)
        for clsid in range(num_classes):
            mask = argmax == clsid
            if mask.sum() == 0:
                continue
            feats_iter_cls = feats_iter[mask]
            preds_iter_cls = preds_iter[:, clsid][mask]
            weight = F.softmax(preds_iter_cls, dim=0)
            feats_iter_cls = feats_iter_cls * weight.unsqueeze(-1)
            feats_iter_cls = feats_iter_cls.sum(0)
            feats_sl[batch_idx][mask] = feats_iter_cls
    feats_sl = feats_sl.reshape(batch_size, h, w, num_channels)
    feats_sl = feats_sl.permute(0, 3, 1, 2).contiguous()
    feats_sl = ssseg_self_attention(m.correlate_net, inputs, feats_sl)
    if hasattr(m, "bottleneck"):
        feats_sl = m.bottleneck(torch.cat([feats_il, feats_sl], dim=1))
    return feats_sl


def ssseg_image_level(m, x):
    """ImageLevelContext.forward."""
    x_global = m.global_avgpool(x)
    x_global = F.interpolate(x_global, size=x.size()[2:], mode="bilinear", align_corners=m.align_corners)
    feats_il = ssseg_self_attention(m.correlate_net, x, torch.cat([x_global, x], dim=1))
    if hasattr(m, "bottleneck"):
        feats_il = m.bottleneck(torch.cat([x, feats_il], dim=1))
    return feats_il


# ---- state dict -----------------------------------------------------------------------------

def block_keys(prefix: str, norm: bool) -> list[str]:
    """buildproject's block nn.Sequential(Conv2d(bias=False), BuildNormalization, BuildActivation):
    ``0.weight``, then the BatchNorm's entries under ``1.`` (Identity without a norm)."""
    entries = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"] if norm else []
    return [f"{prefix}.0.weight"] + [f"{prefix}.1.{e}" for e in entries]


def context_keys(concat_input: bool, norm: bool) -> list[str]:
    """SelfAttentionBlock.__init__: key_project (2 blocks in a Sequential), query_project (2),
    value_project (1: the block itself), out_project (1); then the module's bottleneck."""
    keys = []
    for name, n in (("key_project", 2), ("query_project", 2), ("value_project", 1), ("out_project", 1)):
        prefixes = [f"correlate_net.{name}.{i}" for i in range(n)] if n > 1 else [f"correlate_net.{name}"]
        for p in prefixes:
            keys += block_keys(p, norm)
    return keys + (block_keys("bottleneck", norm) if concat_input else [])


@pytest.mark.parametrize("cls", [SemanticLevelContext, ImageLevelContext])
@pytest.mark.parametrize("concat_input", [True, False])
@pytest.mark.parametrize("norm_cfg", [{"type": "SyncBatchNorm"}, None], ids=["SyncBN", "no-norm"])
def test_state_dict_matches_ssseg_layout(cls, concat_input, norm_cfg):
    m = cls(12, 6, concat_input=concat_input, norm_cfg=norm_cfg, act_cfg=RELU)
    sd = m.state_dict()
    assert list(sd) == context_keys(concat_input, norm_cfg is not None)
    key_in = 24 if cls is ImageLevelContext else 12
    assert sd["correlate_net.key_project.0.0.weight"].shape == (6, key_in, 1, 1)
    assert sd["correlate_net.query_project.0.0.weight"].shape == (6, 12, 1, 1)
    assert sd["correlate_net.value_project.0.weight"].shape == (6, key_in, 1, 1)
    assert sd["correlate_net.out_project.0.weight"].shape == (12, 6, 1, 1)
    if concat_input:
        assert sd["bottleneck.0.weight"].shape == (12, 24, 3, 3)
    # an sssegmentation checkpoint: ISNet's keys, prefixed slc_net. / ilc_net.; strip the prefix
    prefix = "slc_net." if cls is SemanticLevelContext else "ilc_net."
    ckpt = {prefix + k: (v + 2 if v.dtype == torch.long else torch.randn_like(v)) for k, v in sd.items()}
    m.load_state_dict({k.removeprefix(prefix): v for k, v in ckpt.items()}, strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, ckpt[prefix + k]), k


# ---- semantic level: exact against the dense original -----------------------------------------

def _randomize_norms(m: nn.Module) -> None:
    for b in m.modules():
        if isinstance(b, (nn.BatchNorm2d, nn.GroupNorm)):
            b.weight.data.uniform_(0.5, 1.5)
            b.bias.data.uniform_(-0.2, 0.2)
        if isinstance(b, nn.BatchNorm2d) and b.running_mean is not None:
            b.running_mean.uniform_(-0.5, 0.5)
            b.running_var.uniform_(0.5, 2.0)


def _preds(kind: str, B: int, K: int, H: int, W: int) -> torch.Tensor:
    preds = torch.randn(B, K, H, W, dtype=F64)
    if kind == "ties":  # many argmax ties: the lowest index wins, in both
        preds = torch.randint(0, 2, (B, K, H, W)).to(F64) + 0.25 * torch.randint(0, 2, (B, 1, H, W))
    elif kind == "owner" and K > 1:  # one class owns every pixel: every other class absent
        preds[:, K // 2] += 50.0
    elif kind == "absent" and K > 1:  # classes 0 and K-1 absent, the rest present
        preds[:, 0] -= 50.0
        preds[:, K - 1] -= 50.0
    return preds


def _step(slc: SemanticLevelContext, B, C, H, W, K, kind: str, train: bool, steps: int = 1):
    """Run the module and the literal original on copies of it; compare everything."""
    mine, ref = slc.double(), copy.deepcopy(slc).double()
    mine.train(train)
    ref.train(train)
    for step in range(steps):
        torch.manual_seed(10 + step)
        x = torch.randn(B, C, H, W, dtype=F64)
        preds, feats_il = _preds(kind, B, K, H, W), torch.randn(B, C, H, W, dtype=F64)
        ins = [[t.clone().requires_grad_(True) for t in (x, preds, feats_il)] for _ in range(2)]
        for mod in (mine, ref):
            mod.zero_grad(set_to_none=True)
        out = mine(*ins[0])
        want = ssseg_semantic_level(ref, *ins[1])
        assert_close(out, want, F64, "out")
        dout = torch.randn_like(want)
        out.backward(dout)
        want.backward(dout)
        for name, a, b in zip(("x", "preds", "feats_il"), ins[0], ins[1]):
            if name == "feats_il" and not hasattr(slc, "bottleneck"):
                assert a.grad is None and b.grad is None  # unused without concat_input
                continue
            assert_close(a.grad, b.grad, F64, f"grad {name}")
        for (n, p), q in zip(mine.named_parameters(), ref.parameters()):
            assert_close(p.grad, q.grad, F64, f"grad {n}")
        for (n, b), c in zip(mine.named_buffers(), ref.buffers()):
            assert_close(b, c, F64, f"buffer {n}")
            if b.dtype == torch.long:
                assert torch.equal(b, c), n
    return out


@pytest.fixture(params=["counted", "full"])
def path(request, monkeypatch):
    """``counted``: the key/value projections on the K class vectors with count-weighted BN
    statistics; ``full``: on the full pooled map with one representative pixel per class (the
    path GroupNorm and distributed SyncBatchNorm training take), forced here for BN."""
    calls = []
    real = isnet._project_counted

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(isnet, "_project_counted", spy)
    if request.param == "full":
        monkeypatch.setattr(isnet, "_countable", lambda norm: False)
    yield request.param
    assert bool(calls) == (request.param == "counted")


SL_CASES = [  # B, C, transform, H, W, K
    (2, 12, 6, 7, 5, 19),
    (2, 10, 6, 7, 5, 1),
]


def _semantic_level_case(case, train):
    B, C, Ct, H, W, K = case
    torch.manual_seed(0)
    slc = SemanticLevelContext(C, Ct, concat_input=True, norm_cfg=BN, act_cfg=RELU)
    _randomize_norms(slc)
    _step(slc, B, C, H, W, K, "random", train)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", SL_CASES, ids=lambda c: f"B{c[0]}-C{c[1]}x{c[2]}-{c[3]}x{c[4]}-K{c[5]}")
def test_semantic_level_matches_dense_original(case, train, path):
    _semantic_level_case(case, train)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_semantic_level_matches_dense_original_33x65(train):
    """The default (count-weighted) path at an odd, larger size; the dense original is slow here."""
    _semantic_level_case((2, 12, 6, 33, 65, 19), train)


@pytest.mark.parametrize("kind", ["ties", "owner", "absent"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_semantic_level_special_class_maps(kind, train, path):
    torch.manual_seed(1)
    slc = SemanticLevelContext(12, 6, concat_input=True, norm_cfg=BN, act_cfg=RELU)
    _randomize_norms(slc)
    _step(slc, 2, 12, 9, 7, 19, kind, train)


@pytest.mark.parametrize(
    "norm_cfg",
    [
        {"type": "BatchNorm2d", "momentum": None},  # cumulative average over the steps
        {"type": "BatchNorm2d", "track_running_stats": False},
        {"type": "SyncBatchNorm", "momentum": 0.3},  # one process: BatchNorm's forward
    ],
    ids=["BN-momentum-None", "BN-no-running-stats", "SyncBN"],
)
def test_semantic_level_batch_norm_variants(norm_cfg):
    torch.manual_seed(2)
    slc = SemanticLevelContext(12, 6, concat_input=False, norm_cfg=norm_cfg, act_cfg=RELU)
    _step(slc, 2, 12, 7, 5, 6, "random", True, steps=2)
    _step(slc, 2, 12, 7, 5, 6, "random", False)


@pytest.mark.parametrize(
    "norm_cfg,act_cfg",
    [({"type": "GroupNorm", "num_groups": 3}, RELU), (None, None), (BN, {"type": "GELU"})],
    ids=["GN-full-path", "no-norm-no-act", "BN-GELU"],
)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_semantic_level_other_norms_and_activations(norm_cfg, act_cfg, train):
    torch.manual_seed(3)
    slc = SemanticLevelContext(12, 6, concat_input=True, norm_cfg=norm_cfg, act_cfg=act_cfg)
    _randomize_norms(slc)
    _step(slc, 2, 12, 7, 5, 5, "random", train)


def test_semantic_level_countable_norms():
    assert isnet._countable(nn.Identity()) and isnet._countable(nn.BatchNorm2d(4))
    sync = nn.SyncBatchNorm(4)
    assert isnet._countable(sync)  # no process group here
    assert not isnet._countable(nn.GroupNorm(2, 4))


def test_semantic_level_passes_backend_and_batch_of_one():
    torch.manual_seed(4)
    slc = SemanticLevelContext(12, 6, norm_cfg=BN, act_cfg=RELU, backend="reference")
    _step(slc, 1, 12, 7, 5, 3, "random", True)
    assert fastctx.last_backend("semantic_pool_regions") == "reference"
    assert fastctx.last_backend("region_attention") == "reference"
    with pytest.raises(fastctx.BackendUnavailableError):
        SemanticLevelContext(12, 6, backend="cuda")(torch.randn(1, 12, 7, 5), torch.randn(1, 3, 7, 5))


# ---- image level --------------------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(
    "B,C,Ct,H,W,concat_input,align_corners",
    [(2, 10, 6, 7, 5, False, True), (1, 12, 6, 7, 5, True, True), (2, 12, 6, 9, 7, True, False)],
    ids=["7x5-align", "B1-7x5-concat-align", "9x7-concat"],
)
def test_image_level_matches_dense_original(B, C, Ct, H, W, concat_input, align_corners, train):
    _image_level_case(B, C, Ct, H, W, concat_input, align_corners, train)


def test_image_level_matches_dense_original_33x65():
    _image_level_case(2, 12, 6, 33, 65, True, False, True)


def _image_level_case(B, C, Ct, H, W, concat_input, align_corners, train):
    torch.manual_seed(5)
    m = ImageLevelContext(C, Ct, concat_input=concat_input, align_corners=align_corners, norm_cfg=BN, act_cfg=RELU)
    _randomize_norms(m)
    mine, ref = m.double().train(train), copy.deepcopy(m).double().train(train)
    x = torch.randn(B, C, H, W, dtype=F64)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    out, want = mine(xs[0]), ssseg_image_level(ref, xs[1])
    assert_close(out, want, F64, "out")
    dout = torch.randn_like(want)
    out.backward(dout)
    want.backward(dout)
    assert_close(xs[0].grad, xs[1].grad, F64, "grad x")
    for (n, p), q in zip(mine.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, F64, f"grad {n}")
    for (n, b), c in zip(mine.named_buffers(), ref.buffers()):
        assert_close(b, c, F64, f"buffer {n}")


# ---- bad inputs -------------------------------------------------------------------------

def test_bad_inputs():
    slc = SemanticLevelContext(12, 6, concat_input=True, norm_cfg=BN, act_cfg=RELU)
    x, preds = torch.randn(2, 12, 7, 5), torch.randn(2, 4, 7, 5)
    with pytest.raises(ValueError, match=r"SemanticLevelContext: x must be \[B, 12, H, W\], got \(2, 8, 7, 5\)"):
        slc(torch.randn(2, 8, 7, 5), preds, x)
    with pytest.raises(ValueError, match=r"concat_input=True needs feats_il"):
        slc(x, preds)
    with pytest.raises(ValueError, match=r"feats_il must have the shape of x \(2, 12, 7, 5\), got \(2, 12, 7, 6\)"):
        slc(x, preds, torch.randn(2, 12, 7, 6))
    with pytest.raises(ValueError, match=r"preds must be \[B, C, H, W\], got \(2, 4, 35\)"):
        slc(x, preds.flatten(2), x)
    with pytest.raises(TypeError, match=r"preds must be a torch.Tensor, got NoneType"):
        slc(x, None, x)
    with pytest.raises(ValueError, match=r"fastctx.semantic_pool_regions: feats and logits must agree"):
        slc(x, torch.randn(2, 4, 7, 6), x)
    with pytest.raises(ValueError, match=r"fastctx.semantic_pool_regions: logits .* contains NaN"):
        slc(x, torch.full((2, 4, 7, 5), float("nan")), x)
    one = SemanticLevelContext(12, 6, norm_cfg=BN, act_cfg=RELU)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training"):
        one(torch.randn(1, 12, 1, 1), torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match=r"norm_cfg type 'LayerNorm' is not supported"):
        SemanticLevelContext(12, 6, norm_cfg={"type": "LayerNorm"})
    with pytest.raises(TypeError, match=r"ImageLevelContext: norm_cfg must be None or a dict"):
        ImageLevelContext(12, 6, norm_cfg="BN")
    with pytest.raises(ValueError, match=r"ImageLevelContext: x must be \[B, 12, H, W\], got \(12, 7, 5\)"):
        ImageLevelContext(12, 6)(torch.randn(12, 7, 5))
