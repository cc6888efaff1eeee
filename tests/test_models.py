"""fastctx.models: registry, output contract, fused (backend=None) vs reference backend on the
same weights (logits and every gradient), backbone loading, bad input.

The comparison against mmsegmentation's / sssegmentation's own classes is tests/test_models_mmseg.py
(it needs the toolboxes). Small models (``*_r18_d8``, ``ocrnet_hr18``) on tiny images; the big ones
are only built, plus one tiny forward.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastctx.models as M
from fastctx import _ext
from fastctx.backends import last_backend
from fastctx.models._init import randomize_for_parity

SMALL = ["ccnet_r18_d8", "isanet_r18_d8", "ann_r18_d8", "ocrnet_r18_d8", "isnet_r18_d8", "ocrnet_hr18"]
BIG = ["ccnet_r50_d8", "isanet_r50_d8", "ann_r50_d8", "ocrnet_hr18", "ocrnet_hr48", "ocrnet_r101_d8", "isnet_r50_d8"]
# the fastctx ops each model runs (forward and backward)
OPS = {
    "ccnet": ["criss_cross_attention"],
    "isanet": ["interlaced_attention"],
    "ann": ["pyramid_attention"],
    "ocrnet": ["spatial_gather", "region_attention"],
    "isnet": ["semantic_pool_regions", "region_attention"],
}
# training outputs beyond "out" (ISNet: sssegmentation's loss on the stage-1 prediction)
EXTRA = {"isnet": {"aux", "stage1"}}


def close(got: torch.Tensor, want: torch.Tensor, what: str, floor: float = 0.0, eps: float = 2e-5) -> None:
    """Through a deep network: absolute tolerance relative to the tensor's magnitude."""
    atol = max(eps * want.abs().max().item(), floor, 1e-300)
    torch.testing.assert_close(got, want, rtol=5 * eps, atol=atol, msg=lambda m: f"{what}: {m}")


def test_registry():
    assert M.names() == [
        "ccnet_r50_d8", "isanet_r50_d8", "ann_r50_d8", "ocrnet_hr18", "ocrnet_hr48", "ocrnet_r101_d8",
        "isnet_r50_d8", "ccnet_r18_d8", "isanet_r18_d8", "ann_r18_d8", "ocrnet_r18_d8", "isnet_r18_d8",
    ]  # fmt: skip
    model = M.build("ann_r18_d8", 7)
    assert (model.name, model.num_classes) == ("ann_r18_d8", 7)
    with pytest.raises(ValueError, match="unknown model 'ccnet'.*ccnet_r50_d8"):
        M.build("ccnet", 19)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            M.build("ccnet_r18_d8", bad)
    with pytest.raises(ValueError, match="backend must be None or one of"):
        M.build("ccnet_r18_d8", 19, backend="gpu")


@pytest.mark.parametrize("name", ["ccnet_r18_d8", "ocrnet_r18_d8", "isnet_r18_d8"])
def test_backend_reaches_every_op_module(name):
    model = M.build(name, 4, backend="reference")
    holders = [m for m in model.modules() if m is not model and "backend" in vars(m)]
    assert holders and all(m.backend == "reference" for m in holders)
    model.backend = None
    assert model.backend is None and all(m.backend is None for m in holders)
    with pytest.raises(ValueError, match="backend must be None or one of"):
        model.backend = "fast"


# OCRNet with ADE20K's 150 classes on a 5 x 5 feature map too: in float64 its 25 pixels end the CPU
# spatial gather's pixel block on a vector window that overlaps the one before in another
# register panel, with the classes in two reduction chunks (wrong until session 14)
@pytest.mark.parametrize("name,size,K", [(n, None, 5) for n in SMALL] + [("ocrnet_r18_d8", (1, 3, 40, 40), 150)],
                         ids=SMALL + ["ocrnet_r18_d8-K150-map5x5"])
def test_fused_vs_reference_forward_backward(name, size, K):
    """Training step in float64 on the same weights and the same dropout masks: backend=None (the
    compiled CPU kernels when the extension is built, else the reference) vs backend="reference":
    every output, the input gradient and every parameter gradient agree; the reference model's
    ops all ran on the reference backend, the fused model's on "cpu"; eval mode returns only
    "out". (float64: in float32 rounding through the deep network, on either side, is larger
    than any tolerance that would still catch a wrong kernel.)"""
    kind = name.split("_")[0]
    fused = M.build(name, K).double()
    randomize_for_parity(fused)
    ref = copy.deepcopy(fused)
    ref.backend = "reference"
    fused.train(), ref.train()
    # D8 features 5 x 7 (ANN's 6- and 8-pooling upsample); ISANet 9 x 11, padded to 16 x 16, so
    # that both relations attend over more than one key; HRNet 64 x 64: its 1/32 branch has 4
    # values per channel for the training BatchNorm (with fewer the comparison is ill-conditioned)
    size = size or {"ocrnet_hr18": (1, 3, 64, 64), "isanet_r18_d8": (1, 3, 72, 88)}.get(name, (1, 3, 40, 56))
    x = torch.randn(size, dtype=torch.float64)
    outs, grads = [], []
    for model in (fused, ref):
        xi = x.clone().requires_grad_()
        torch.manual_seed(1234)  # the same dropout masks
        out = model(xi)
        g = torch.Generator().manual_seed(99)
        loss = sum((v * torch.randn(v.shape, generator=g)).sum() for _, v in sorted(out.items()))
        loss.backward()
        outs.append(out)
        grads.append({"input": xi.grad, **{n: p.grad for n, p in model.named_parameters()}})
        for op in OPS[kind]:
            want = "reference" if model is ref or not _ext.available()[0] else "cpu"
            assert last_backend(op) == want, op
    want_keys = {"out"} | EXTRA.get(kind, {"aux"})
    assert set(outs[0]) == set(outs[1]) == want_keys
    stride = 4 if "hr" in name else 8
    for k in want_keys:
        assert outs[0][k].shape == (size[0], K, -(-size[2] // stride), -(-size[3] // stride)), k
        close(outs[0][k], outs[1][k], f"{name} output {k}", eps=1e-9)
    assert set(grads[0]) == set(grads[1])
    # a floor for gradients that are zero in exact arithmetic (a criss-cross key_conv bias: the
    # softmax does not see it) and so only rounding noise on either side
    floor = 1e-12 * max(g.abs().max().item() for g in grads[1].values())
    for n in grads[0]:
        assert grads[0][n] is not None and torch.isfinite(grads[0][n]).all(), n
        close(grads[0][n], grads[1][n], f"{name} grad {n}", floor, eps=1e-9)
    # the attention's own parameters get gradient (the op is in the graph)
    for m in fused.modules():
        if m is not fused and "backend" in vars(m):
            for n, p in m.named_parameters():
                assert p.grad.abs().sum() > 0, n
    fused.eval()
    with torch.no_grad():
        assert set(fused(x)) == {"out"}


@pytest.mark.parametrize("name", BIG)
def test_big_models_build(name):
    """The full-size models build with the widths of mmseg's configs (their key sets are compared
    with mmseg's in test_models_mmseg.py); every parameter is trainable."""
    model = M.build(name, 19)
    sd = model.state_dict()
    assert any(k.startswith("backbone.") for k in sd) and any(k.startswith("decode_head.") for k in sd)
    assert all(p.requires_grad for p in model.parameters())
    if name == "ocrnet_hr48":
        assert sd["decode_head.1.bottleneck.conv.weight"].shape == (512, 720, 3, 3)
    if name.endswith("r50_d8") and not name.startswith("isnet"):
        assert sd["auxiliary_head.convs.0.conv.weight"].shape == (256, 1024, 3, 3)


def test_big_model_tiny_forward():
    model = M.build("ccnet_r50_d8", 19, backend="reference").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 40))
    assert set(out) == {"out"} and out["out"].shape == (1, 19, 4, 5)
    assert torch.isfinite(out["out"]).all()


@pytest.mark.parametrize(("net", "channels", "strides"), [
    (lambda: M.ResNetV1c(18), [64, 128, 256, 512], [4, 8, 8, 8]),
    (lambda: M.ResNetV1c(50), [256, 512, 1024, 2048], [4, 8, 8, 8]),
    (lambda: M.HRNet(M.HRNET_W18), [18, 36, 72, 144], [4, 8, 16, 32]),
])  # fmt: skip
def test_backbone_outputs(net, channels, strides):
    """D8: output stride 8 (dilations instead of strides in stages 3 and 4); HRNet: 1/4 .. 1/32."""
    backbone = net().eval()
    assert backbone.out_channels == channels
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, c, 64 // s, 96 // s) for c, s in zip(channels, strides)]


def test_d8_dilations():
    """contract_dilation: the first block of the dilation-2 / dilation-4 stages uses 1 / 2."""
    net = M.ResNetV1c(50)
    d = [[blk.conv2.dilation[0] for blk in getattr(net, f"layer{i}")] for i in (1, 2, 3, 4)]
    assert d == [[1] * 3, [1] * 4, [1] + [2] * 5, [2, 4, 4]]
    assert [getattr(net, f"layer{i}")[0].conv2.stride[0] for i in (1, 2, 3, 4)] == [1, 2, 1, 1]
    assert [m.out_channels for m in net.stem if isinstance(m, nn.Conv2d)] == [32, 32, 64]


def test_load_backbone(tmp_path):
    src = M.ResNetV1c(18)
    randomize_for_parity(src)
    # an open-mmlab ImageNet checkpoint: backbone keys + the classifier's fc.*
    plain = tmp_path / "resnet18_v1c.pth"
    torch.save({"state_dict": {**src.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}}, plain)
    # an mmseg segmentor checkpoint: backbone.* + heads
    seg = tmp_path / "ccnet.pth"
    torch.save({"state_dict": {**{f"backbone.{k}": v for k, v in src.state_dict().items()},
                               "decode_head.conv_seg.weight": torch.zeros(19, 128, 1, 1)}}, seg)  # fmt: skip
    for path in (plain, seg, str(seg)):
        model = M.build("ccnet_r18_d8", 5, backbone=path)
        for k, v in src.state_dict().items():
            assert torch.equal(model.backbone.state_dict()[k], v), k
    with pytest.raises(ValueError, match="no checkpoint file at .*missing.pth"):
        M.build("ccnet_r18_d8", 5, backbone=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"hr\.pth.*does not match ResNetV1c: missing \d+"):
        hr = tmp_path / "hr.pth"
        torch.save(M.HRNet(M.HRNET_W18).state_dict(), hr)
        M.build("ccnet_r18_d8", 5, backbone=hr)
    with pytest.raises(ValueError, match=r"shape mismatch 1 \[stem.0.weight\]"):
        sd = dict(src.state_dict())
        sd["stem.0.weight"] = torch.zeros(32, 4, 3, 3)
        M.build("ccnet_r18_d8", 5, backbone=sd)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .*junk.pth"):
        M.build("ccnet_r18_d8", 5, backbone=junk)
    with pytest.raises(ValueError, match="does not hold a state dict of tensors"):
        M.build("ccnet_r18_d8", 5, backbone={"state_dict": {"a": 1}})


def test_bad_input():
    model = M.build("ocrnet_r18_d8", 3).eval()
    with pytest.raises(ValueError, match=r"CascadeEncoderDecoder: img must be a non-empty \[B, 3, H, W\].*\(1, 4, 32, 32\)"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"non-empty \[B, 3, H, W\]"):
        model(torch.randn(0, 3, 32, 32))
    with pytest.raises(TypeError, match="img must be floating point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="img must be a torch.Tensor"):
        model([[0.0]])
    with pytest.raises(ValueError, match="fastctx.models.ResNetV1c: the input must be"):
        M.ResNetV1c(18)(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="depth must be one of"):
        M.ResNetV1c(42)
    head = model.decode_head[1]
    feats = [None, None, None, torch.randn(1, 512, 4, 4)]
    with pytest.raises(ValueError, match="OCRHead: prev_output .* resolution"):
        head(feats, torch.randn(1, 3, 5, 4))


@pytest.mark.parametrize("name", ["isnet_r18_d8", "ocrnet_r18_d8"])
def test_autocast_channels_last(name):
    """The trainer's AMP + channels_last: forward and backward run, logits in the autocast dtype,
    finite gradients."""
    model = M.build(name, 5).train().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 40, 56).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert set(out) == {"out"} | EXTRA.get(name.split("_")[0], {"aux"})
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v).all() for v in out.values())
    sum(v.float().sum() for v in out.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
