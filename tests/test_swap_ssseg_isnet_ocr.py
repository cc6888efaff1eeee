"""fastctx.swap on sssegmentation 1.7.0's ISNet and OCRNet context modules, and the plugin
segmentors FastISNet / FastOCRNet.

Recognised: ``isnet.semanticlevel.SemanticLevelContext`` -> fastctx.nn.SemanticLevelContext (the
attention reduced to the K class vectors), ``isnet.imagelevel.ImageLevelContext`` ->
fastctx.nn.ImageLevelContext, ``ocrnet.spatialgather.SpatialGatherModule`` ->
fastctx.nn.SpatialGather and ``ocrnet.objectcontext.ObjectContextBlock`` (3x3 bottleneck) ->
fastctx.nn.ObjectAttention, each around the module's own projections.

Needs sssegmentation (tests/toolboxes.py; FAILS when missing). Comparisons (output, input and
parameter gradients, BN running statistics after the step), eval and train mode: float64 as in
tests/test_swap.py (relative error <= 1e-5 against the original run in float64); float32 by
tests/swap_support.py's ``parity`` (the float32 row of fastctx.testing against the original run
in float32, or its documented fallbacks for long sums and recorded ReLU flips).

Widths: ssseg's Cityscapes configs (tests/toolboxes.ssseg_isnet_cfg / ssseg_ocrnet_cfg: 19
classes, SyncBatchNorm, ReLU, concat_input, dropout) with the channels narrowed (ISNet head in
2048 -> 48 or 64, feats 512 -> 40 or 32, transform 256 -> 12 or 16; OCRNet auxiliary in 1024 ->
24, out 512 -> 16, head as ISNet's), not all powers of two: the originals' dense N x N attention
and the heads' 3x3 convolutions, which the swap does not touch, would otherwise cost minutes on
two CPU cores. Sizes 33x65 and 17x23 (97x97 is not run: the original's dense attention would
hold 9409^2 float64 similarities per image).
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
from tests.swap_support import parity
from tests.toolboxes import randomize

SSSEG = "ssseg.modules.models.segmentors."
SLC = SSSEG + "isnet.semanticlevel.SemanticLevelContext"
ILC = SSSEG + "isnet.imagelevel.ImageLevelContext"
SGM = SSSEG + "ocrnet.spatialgather.SpatialGatherModule"
OCB = SSSEG + "ocrnet.objectcontext.ObjectContextBlock"
FAST_SLC = "fastctx.nn.isnet.SemanticLevelContext"
FAST_ILC = "fastctx.nn.isnet.ImageLevelContext"
FAST_SG = "fastctx.nn.ocr.SpatialGather"
FAST_OA = "fastctx.nn.ocr.ObjectAttention"
SIZES = [(33, 65), (17, 23)]
K = 19
SYNC_BN = {"type": "SyncBatchNorm"}
RELU = {"type": "ReLU", "inplace": True}
C, T = 40, 12  # module widths (narrowed from 512, 256; not powers of two)


@pytest.fixture(scope="module")
def isnet():
    return toolboxes.ssseg_segmentor("isnet")


@pytest.fixture(scope="module")
def ocrnet():
    return toolboxes.ssseg_segmentor("ocrnet")


@pytest.fixture(scope="module")
def builder():
    builder = toolboxes.ssseg_segmentor("builder")
    import fastctx.integrations.sssegmentation  # noqa: F401 (registers FastISNet, FastOCRNet)

    return builder


def paths(report):
    return [(e.path, e.original, e.replacement) for e in report.swapped]


def matters(original: nn.Module, block: nn.Sequential, x: torch.Tensor, want, forward_of, seed: int) -> None:
    """Zeroing ``block``'s BN (an out projection of ``original``) moves the output: the swapped
    context reaches what was compared, so the comparison could fail."""
    with torch.no_grad():
        block[1].weight.zero_()
        block[1].bias.zero_()
        torch.manual_seed(seed)
        without = forward_of(original)(x.float())
    assert float((without - want[0]).abs().max()) > 1e-3 * float(want[0].abs().max())


def test_registry_lists_ssseg_isnet_ocr():
    assert {SLC, ILC, SGM, OCB} <= set(recognisers())


# ---------------------------------------------------------------------------------------------
# the modules
# ---------------------------------------------------------------------------------------------


class SemanticLevel(nn.Module):
    """ISNet's call ``slc_net(x, preds, feats_il)``; the input is ``cat([x, preds, feats_il])``."""

    def __init__(self, isnet, **kwargs) -> None:
        super().__init__()
        self.slc = isnet.SemanticLevelContext(C, T, **{"concat_input": True, "norm_cfg": SYNC_BN,
                                                       "act_cfg": RELU, **kwargs})

    def forward(self, x):
        return self.slc(x[:, :C], x[:, C:C + K], x[:, C + K:])


def preds_like(kind: str, x: torch.Tensor) -> None:
    """Set the logits slice of ``x`` (``x[:, C:C+K]``): ``random`` (peaked), ``ties`` (two levels
    plus a per-pixel shift: many argmax ties, the lowest index wins in both) or ``owner`` (one
    class owns every pixel, every other class absent)."""
    B, _, H, W = x.shape
    if kind == "random":
        x[:, C:C + K] *= 3
    elif kind == "ties":
        x[:, C:C + K] = (torch.randint(0, 2, (B, K, H, W)) + 0.25 * torch.randint(0, 2, (B, 1, H, W))).to(x.dtype)
    elif kind == "owner":
        x[:, C + K // 2] += 50.0


# the swapped module's key/value projections run on the K class vectors, not the pixels: their
# ReLUs cannot be paired with the original's (ReluFlips), as in the whole segmentor's test below
SLC_MODULE_ON_CLASSES = ("slc.correlate_net.key_project", "slc.correlate_net.value_project")


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize(("kind", "size"), [("random", SIZES[0]), ("random", SIZES[1]),
                                            ("ties", SIZES[1]), ("owner", SIZES[1])])
def test_semantic_level_swapped_matches(isnet, kind, size, mode):
    torch.manual_seed(size[0] + len(kind))
    orig = SemanticLevel(isnet)
    randomize(orig)
    orig.train(mode == "train")
    x = torch.randn(2, 2 * C + K, *size, dtype=torch.float64)
    preds_like(kind, x)
    dout = torch.randn(2, C, *size, dtype=torch.float64)
    original, want = parity(orig, x, dout, 0, lambda m: m, [("slc", SLC, FAST_SLC)],
                            f"SemanticLevelContext {kind} {size} {mode}", reshaped=SLC_MODULE_ON_CLASSES)
    matters(original, original.slc.correlate_net.out_project, x, want, lambda m: m, 0)


def test_semantic_level_variants(isnet):
    """No ``bottleneck`` (``concat_input=False``; ``feats_il`` unused), GroupNorm (the
    projections then run on the full pooled map), no norm with GELU, BatchNorm2d with ssseg's
    HardSwish; train mode."""
    torch.manual_seed(5)
    for kwargs in ({"concat_input": False}, {"norm_cfg": {"type": "GroupNorm", "num_groups": 4}},
                   {"norm_cfg": None, "act_cfg": {"type": "GELU"}},
                   {"norm_cfg": {"type": "BatchNorm2d"}, "act_cfg": {"type": "HardSwish"}}):
        orig = SemanticLevel(isnet, **kwargs)
        randomize(orig)
        orig.train()
        x = torch.randn(2, 2 * C + K, *SIZES[1], dtype=torch.float64)
        preds_like("random", x)
        dout = torch.randn(2, C, *SIZES[1], dtype=torch.float64)
        parity(orig, x, dout, 0, lambda m: m, [("slc", SLC, FAST_SLC)], f"SemanticLevelContext {kwargs}",
               reshaped=SLC_MODULE_ON_CLASSES)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_image_level_swapped_matches(isnet, size, mode):
    torch.manual_seed(size[1])
    orig = nn.Sequential(isnet.ImageLevelContext(C, T, concat_input=True, align_corners=False,
                                                 norm_cfg=SYNC_BN, act_cfg=RELU))
    randomize(orig)
    orig.train(mode == "train")
    x = torch.randn(2, C, *size, dtype=torch.float64)
    dout = torch.randn(2, C, *size, dtype=torch.float64)
    original, want = parity(orig, x, dout, 0, lambda m: m, [("0", ILC, FAST_ILC)],
                            f"ImageLevelContext {size} {mode}")
    matters(original, original[0].correlate_net.out_project, x, want, lambda m: m, 0)


class GatherThenAttend(nn.Module):
    """OCRNet's use of the two modules: ``object_context_block(feats, spatial_gather_module(
    feats, probs))``; the input is ``cat([feats, probs])``."""

    def __init__(self, ocrnet, scale: int = 1) -> None:
        super().__init__()
        self.gather = ocrnet.SpatialGatherModule(scale)
        self.block = ocrnet.ObjectContextBlock(C, T, scale, align_corners=False, norm_cfg=SYNC_BN, act_cfg=RELU)

    def forward(self, x):
        return self.block(x[:, :C], self.gather(x[:, :C], x[:, C:]))


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_ocr_modules_swapped_match(ocrnet, size, mode):
    torch.manual_seed(size[0] * 3)
    orig = GatherThenAttend(ocrnet)
    randomize(orig)
    orig.train(mode == "train")
    x = torch.randn(2, C + K, *size, dtype=torch.float64)
    x[:, C:] *= 3  # logits of a few units: a peaked softmax over the pixels
    dout = torch.randn(2, C, *size, dtype=torch.float64)
    original, want = parity(orig, x, dout, 0, lambda m: m,
                            [("gather", SGM, FAST_SG), ("block", OCB, FAST_OA)], f"OCR modules {size} {mode}")
    assert isinstance(original.block.bottleneck[0], nn.Conv2d) and original.block.bottleneck[0].kernel_size == (3, 3)
    matters(original, original.block.out_project, x, want, lambda m: m, 0)


# ---------------------------------------------------------------------------------------------
# the whole segmentors, from the feature map on (their own forward)
# ---------------------------------------------------------------------------------------------


def build_isnet(isnet, widths) -> nn.Module:
    seg = isnet.ISNet(toolboxes.ssseg_isnet_cfg("ISNet", *widths), mode="TEST")
    toolboxes.ssseg_given_features(seg)
    randomize(seg)
    return seg


ISNET_SWAPS = [("ilc_net", ILC, FAST_ILC), ("slc_net", SLC, FAST_SLC)]
# the swapped semantic-level key/value projections run on the K class vectors, not the pixels
SLC_ON_CLASSES = ("slc_net.correlate_net.key_project", "slc_net.correlate_net.value_project")


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize(("size", "widths"), [(SIZES[0], (48, 40, 12)), (SIZES[1], (64, 32, 16))],
                         ids=["33x65-48-40-12", "17x23-64-32-16"])
def test_isnet_swapped_matches(isnet, size, widths, mode):
    torch.manual_seed(size[0] + widths[1])
    orig = build_isnet(isnet, widths)
    orig.train(mode == "train")
    x = torch.randn(2, widths[0], *size, dtype=torch.float64)
    dout = torch.randn(2, K, *size, dtype=torch.float64)
    original, want = parity(orig, x, dout, 3, toolboxes.ssseg_logits, ISNET_SWAPS, f"ISNet {size} {mode}",
                            reshaped=SLC_ON_CLASSES)
    for name in ("slc_net", "ilc_net"):
        other = copy.deepcopy(original)
        matters(other, getattr(other, name).correlate_net.out_project, x, want, toolboxes.ssseg_logits, 3)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kind", ["ties", "owner"])
def test_isnet_ties_and_one_class_owning_every_pixel(isnet, kind, mode):
    """``decoder_stage1``'s classifier without weights: every pixel's 19 logits equal (``ties``:
    argmax 0 everywhere in both) or class 7 ahead by 2 (``owner``); every other class absent."""
    torch.manual_seed(11)
    orig = build_isnet(isnet, (48, 40, 12))
    with torch.no_grad():
        classifier = orig.decoder_stage1[-1]
        classifier.weight.zero_()
        classifier.bias.zero_()
        if kind == "owner":
            classifier.bias[7] = 2.0
    orig.train(mode == "train")
    x = torch.randn(2, 48, *SIZES[1], dtype=torch.float64)
    dout = torch.randn(2, K, *SIZES[1], dtype=torch.float64)
    parity(orig, x, dout, 4, toolboxes.ssseg_logits, ISNET_SWAPS, f"ISNet {kind} {mode}",
           reshaped=SLC_ON_CLASSES)


OCR_WIDTHS = (24, 16, 48, 40, 12)  # auxiliary in, out; head in, feats, transform (narrowed)
OCR_SWAPS = [("spatial_gather_module", SGM, FAST_SG), ("object_context_block", OCB, FAST_OA)]


def build_ocrnet(ocrnet) -> nn.Module:
    seg = ocrnet.OCRNet(toolboxes.ssseg_ocrnet_cfg("OCRNet", *OCR_WIDTHS), mode="TEST")
    toolboxes.ssseg_given_split_features(seg, OCR_WIDTHS[0], OCR_WIDTHS[2])
    randomize(seg)
    return seg


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_ocrnet_swapped_matches(ocrnet, size, mode):
    torch.manual_seed(size[1] + 1)
    orig = build_ocrnet(ocrnet)
    orig.train(mode == "train")
    x = torch.randn(2, OCR_WIDTHS[0] + OCR_WIDTHS[2], *size, dtype=torch.float64)
    dout = torch.randn(2, K, *size, dtype=torch.float64)
    original, want = parity(orig, x, dout, 5, toolboxes.ssseg_logits, OCR_SWAPS, f"OCRNet {size} {mode}")
    matters(original, original.object_context_block.out_project, x, want, toolboxes.ssseg_logits, 5)


# ---------------------------------------------------------------------------------------------
# state, structure differences, look-alikes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["isnet", "ocrnet"])
def test_state_dict_round_trip_and_same_parameters(isnet, ocrnet, which):
    build = (lambda: build_isnet(isnet, (48, 40, 12))) if which == "isnet" else (lambda: build_ocrnet(ocrnet))
    model = build()
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    keys = list(model.state_dict())
    _, report = swap(model, strict=True)
    assert paths(report) == (ISNET_SWAPS if which == "isnet" else OCR_SWAPS)
    assert all(p is params[n] for n, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert list(model.state_dict()) == keys
    # an original's checkpoint loads into the swapped model, and the swapped model's into an original
    other = build()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1)
    model.load_state_dict(other.state_dict(), strict=True)
    assert all(torch.equal(model.state_dict()[k], other.state_dict()[k]) for k in keys)
    back = build()
    back.load_state_dict(model.state_dict(), strict=True)
    assert all(torch.equal(back.state_dict()[k], other.state_dict()[k]) for k in keys)


def test_structure_differences_are_left_alone(isnet, ocrnet):
    def slc(**kwargs):
        return isnet.SemanticLevelContext(C, T, **{"concat_input": True, "norm_cfg": SYNC_BN, "act_cfg": RELU,
                                                   **kwargs})

    downsampled = ocrnet.ObjectContextBlock(C, T, 2, norm_cfg=SYNC_BN, act_cfg=RELU)  # scale=2: MaxPool queries
    three_keys = slc()
    keys = three_keys.correlate_net.key_project
    keys.append(copy.deepcopy(keys[1]))
    instance_norm = slc(norm_cfg={"type": "InstanceNorm2d"})  # not reproduced on the class vectors
    shared = slc()
    shared.correlate_net.query_project = shared.correlate_net.key_project
    no_matmul_norm = slc()
    no_matmul_norm.correlate_net.matmul_norm = False
    no_out = isnet.ImageLevelContext(C, T, norm_cfg=SYNC_BN, act_cfg=RELU)
    no_out.correlate_net.out_project = None
    pooled_2x2 = isnet.ImageLevelContext(C, T, norm_cfg=SYNC_BN, act_cfg=RELU)
    pooled_2x2.global_avgpool = nn.AdaptiveAvgPool2d(2)
    wide_value = ocrnet.ObjectContextBlock(C, T, 1, norm_cfg=SYNC_BN, act_cfg=RELU)
    wide_value.value_project[0] = nn.Conv2d(C, T, 3, padding=1, bias=False)
    overridden = slc()
    overridden.forward = lambda x, preds, feats_il: x
    model = nn.Sequential(downsampled, three_keys, instance_norm, shared, no_matmul_norm, no_out,
                          pooled_2x2, wide_value, overridden, ocrnet.SpatialGatherModule(0))
    before = list(model)
    with pytest.raises(SwapError, match="recognised modules could not be swapped") as info:
        swap(model, strict=True)
    assert list(model) == before
    report = info.value.report
    reasons = {e.path: e.reason for e in report.left_alone}
    assert set(reasons) == {str(i) for i in range(10)} and not report.swapped
    assert reasons["0"].startswith("query_downsample is MaxPool2d(kernel_size=2")
    assert "sssegmentation 1.7.0's own forward then fails" in reasons["0"]
    assert reasons["1"] == "correlate_net: key_project holds 3 modules, expected 2 blocks"
    assert reasons["2"].startswith("correlate_net: key_project.0.1 is torch.nn.modules.instancenorm.InstanceNorm2d")
    assert "share_key_query=True" in reasons["3"]
    assert reasons["4"] == "correlate_net: matmul_norm is False, expected True"
    assert reasons["5"].startswith("correlate_net: submodules ['key_project', 'query_project', 'value_project']")
    assert reasons["6"] == "global_avgpool.output_size is 2, expected (1, 1)"
    assert reasons["7"].startswith("value_project.0 is Conv2d(in=40, out=12, kernel=(3, 3)")
    assert reasons["8"] == "its forward is overridden on the instance"
    assert reasons["9"] == "scale is 0, expected a positive number"
    _, report = swap(model)  # not strict: reported, left alone
    assert list(model) == before and len(report.left_alone) == 10


class SemanticLevelContext(nn.Module):
    """A look-alike: sssegmentation's class name, defined elsewhere."""

    def forward(self, x, preds, feats_il):
        return x


def test_look_alike_is_reported_not_touched():
    look = SemanticLevelContext()
    model = nn.Sequential(look)
    _, report = swap(model, strict=True)
    assert model[0] is look and not report.swapped and not report.left_alone
    [entry] = report.look_alikes
    assert entry.original == f"{__name__}.SemanticLevelContext" and SLC in entry.reason


# ---------------------------------------------------------------------------------------------
# the plugin: FastISNet / FastOCRNet in ssseg's SegmentorBuilder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["ISNet", "OCRNet"])
def test_plugin_segmentor_builds_from_the_original_config(builder, which):
    if which == "ISNet":
        cfg, given = toolboxes.ssseg_isnet_cfg("ISNet", 48, 40, 12), (48,)
        swapped = {"ilc_net": fastctx.nn.ImageLevelContext, "slc_net": fastctx.nn.SemanticLevelContext}
    else:
        cfg, given = toolboxes.ssseg_ocrnet_cfg("OCRNet", *OCR_WIDTHS), (OCR_WIDTHS[0], OCR_WIDTHS[2])
        swapped = {"spatial_gather_module": fastctx.nn.SpatialGather,
                   "object_context_block": fastctx.nn.ObjectAttention}
    base = {"ISNet": builder.SegmentorBuilder.REGISTERED_MODULES["ISNet"],
            "OCRNet": builder.SegmentorBuilder.REGISTERED_MODULES["OCRNet"]}[which]
    assert f"Fast{which}" in builder.SegmentorBuilder.REGISTERED_MODULES
    torch.manual_seed(1)
    original = builder.BuildSegmentor(segmentor_cfg=copy.deepcopy(cfg), mode="TEST")
    assert type(original) is base
    fast_cfg = copy.deepcopy(cfg)
    fast_cfg["type"] = f"Fast{which}"  # the one change
    fast = builder.BuildSegmentor(segmentor_cfg=fast_cfg, mode="TEST")
    assert isinstance(fast, base) and type(fast).__name__ == f"Fast{which}"
    for name, cls in swapped.items():
        assert type(getattr(fast, name)) is cls, name
    randomize(original)
    assert list(fast.state_dict()) == list(original.state_dict())
    fast.load_state_dict(original.state_dict(), strict=True)
    for segmentor in (original, fast):
        toolboxes.ssseg_given_split_features(segmentor, *given)
        segmentor.eval()
    x = torch.randn(2, sum(given), 17, 23)
    with torch.no_grad():
        want, got = toolboxes.ssseg_logits(original)(x), toolboxes.ssseg_logits(fast)(x)
    assert got.shape == (2, K, 17, 23)
    assert_close(got, want.double(), torch.float32, "logits")


def test_fast_ocrnet_that_cannot_swap_fails_to_build(builder):
    cfg = toolboxes.ssseg_ocrnet_cfg("FastOCRNet", *OCR_WIDTHS)
    cfg["head"]["scale"] = 2
    with pytest.raises(SwapError, match="query_downsample is MaxPool2d"):
        builder.BuildSegmentor(segmentor_cfg=cfg, mode="TEST")
