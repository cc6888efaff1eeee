"""The CUDA semantic pool's device code and launch sequences, run without a GPU.

csrc/cuda/semantic_pool_kernels.cuh (every kernel and the host sequences that plan and launch
them, unchanged) is compiled for the CPU against tests/cuda_emu/emu.h, an emulation of the CUDA
execution model (a block's threads are OS threads; __syncthreads and __ballot_sync are barriers;
dynamic shared memory starts as NaN), and checked against the float64 reference like every
backend: outputs, both gradients, the special inputs, determinism, out-of-range labels. It proves
the kernels' logic and indexing, not their speed nor the GPU's own rounding: the "cuda" cases of
tests/test_semantic_pool.py run the real kernels where a GPU is.
"""

from __future__ import annotations

import pytest
import torch

import python_ref
from tests._utils import DTYPE_NAMES
from tests.cuda_emu.build import emu_module
from tests.test_semantic_pool import NEG_INF, SPECIAL, _compare, _special


@pytest.fixture(scope="module")
def emu():
    return emu_module()


def _run(emu, feats, logits, sms):
    """What the "cuda" backend computes through fastctx.ops.semantic (the same op sequence: sp_fwd,
    sp_gather for pooled; sp_scatter then sp_bwd for the gradients) for random upstream gradients
    of regions and pooled, and the float64 reference likewise."""
    regions, counts, labels, w = emu.sp_fwd(feats, logits, sms)
    K = logits.shape[1]
    pooled = emu.sp_gather(regions, labels, feats.dtype)
    dr = torch.randn(regions.shape, dtype=torch.float64).to(feats.dtype)
    dp = torch.randn(pooled.shape, dtype=torch.float64).to(feats.dtype)
    dregions = dr.float() if feats.dtype != torch.float64 else dr
    dregions = dregions + emu.sp_scatter(dp, labels, K, sms).to(dregions.dtype)
    dfeats, dlogits = emu.sp_bwd(dregions, feats, labels, w, regions, sms)

    f64 = feats.detach().double().requires_grad_(True)
    l64 = logits.detach().double().requires_grad_(True)
    r64, c64, lab64 = python_ref.semantic_pool_regions(f64, l64)
    p64 = python_ref.semantic_pool(f64, l64)
    g64 = torch.autograd.grad((r64 * dr.double()).sum() + (p64 * dp.double()).sum(), (f64, l64))
    got = (regions.to(feats.dtype), counts, labels, pooled, dfeats, dlogits)
    return got, (r64, c64, lab64, p64, *g64)


# (B, C, K, H, W, sms): sms, the multiprocessor count the launch plan assumes, sets the number of
# pixel groups of the segmented sum (checked below)
SHAPES = [
    (2, 5, 4, 7, 5, 132),  # one tile, one group
    (1, 3, 1, 5, 7, 132),  # K = 1
    (2, 37, 19, 33, 65, 8),  # two channel tiles, several pixel groups, a partial last tile
    (1, 6, 150, 11, 13, 132),  # K = 150: one class tile in float32, four in float64
    (1, 9, 240, 9, 31, 132),  # past one class tile in float32 (232 classes)
]


def _id(s):
    return "B{}-C{}-K{}-{}x{}-sms{}".format(*s)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_parity(emu, shape, dtype):
    B, C, K, H, W, sms = shape
    feats = torch.randn(B, C, H, W).to(dtype)
    logits = (torch.randn(B, K, H, W) * 2).to(dtype)
    _compare(*_run(emu, feats, logits, sms), dtype)


def test_the_shapes_reach_every_path(emu):
    """Several pixel groups (then their sum), several channel tiles, several class tiles, a
    partial tile: the parity shapes above take each path of the segmented sum."""
    plans = {s: emu.segsum_plan(s[0], s[1], s[3] * s[4], s[2], s[5], False) for s in SHAPES}
    plans64 = {s: emu.segsum_plan(s[0], s[1], s[3] * s[4], s[2], s[5], True) for s in SHAPES}
    KT, n_ct, n_kt, G, pix = plans[SHAPES[2]]
    assert G > 1 and n_ct == 2 and (33 * 65) % 128 != 0
    assert plans[SHAPES[4]][2] == 2 and plans[SHAPES[4]][0] == 232
    assert plans64[SHAPES[3]][2] == 4
    assert plans[SHAPES[0]][3] == 1


@pytest.mark.parametrize("case", SPECIAL)
def test_special_inputs(emu, case):
    feats, logits = _special(case, "cpu")
    got, want = _run(emu, feats, logits, 132)
    _compare(got, want, torch.float32)
    regions, counts = got[0], got[1]
    if case == "one-class-owns-all":
        assert (counts[:, 3] == 35).all()
    if case == "dead-class":  # present (2 pixels) but every logit -inf: zero region, zero grads
        assert counts[0, 0] == 2 and (regions[0, :, 0] == 0).all()
        assert (got[4][0, :, 1, 2] == 0).all() and (got[5][0, :, 1, 2] == 0).all()


def test_fp16_large_logits(emu):
    feats = torch.randn(2, 7, 9, 6).half()
    logits = (torch.randn(2, 4, 9, 6) * 20 + 3e4).half()
    _compare(*_run(emu, feats, logits, 132), torch.float16)


def test_blobby_labels_and_all_neg_inf_pixels(emu):
    """Long runs of one class (as in segmentation maps: the running sums of the walk span many
    pixels, across tiles) and whole -inf pixels."""
    B, C, K, H, W = 2, 33, 12, 24, 40
    blobs = torch.randn(B, K, 3, 4) * 3
    logits = torch.nn.functional.interpolate(blobs, size=(H, W), mode="nearest") + 0.01 * torch.randn(B, K, H, W)
    logits[0, :, 5, 7:30] = NEG_INF
    feats = torch.randn(B, C, H, W)
    _compare(*_run(emu, feats, logits, 16), torch.float32)


def test_deterministic(emu):
    feats, logits = torch.randn(2, 37, 19, 23), torch.randn(2, 9, 19, 23)
    a = emu.sp_fwd(feats, logits, 8)
    b = emu.sp_fwd(feats, logits, 8)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    dp = torch.randn(2, 37, 19, 23)
    assert torch.equal(emu.sp_scatter(dp, a[2], 9, 8), emu.sp_scatter(dp, a[2], 9, 8))


def test_labels_out_of_range_select_nothing(emu):
    regions = torch.randn(1, 4, 3)
    labels = torch.zeros(1, 5, 6, dtype=torch.int64)
    labels[0, 2, 2], labels[0, 1, 1] = 3, -1
    out = emu.sp_gather(regions, labels, torch.float32)
    assert (out[0, :, 2, 2] == 0).all() and (out[0, :, 1, 1] == 0).all()
    assert torch.equal(out[0, :, 0, 0], regions[0, :, 0])
    dr = emu.sp_scatter(torch.ones(1, 4, 5, 6), labels, 3, 132)
    assert (dr[0, :, 0] == 28).all() and (dr[0, :, 1:] == 0).all()
