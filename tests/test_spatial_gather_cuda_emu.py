"""The CUDA spatial gather's device code and launch sequences, run without a GPU.

csrc/cuda/spatial_gather_kernels.cuh (its kernels and host sequences, unchanged) compiled for the
CPU against the CUDA emulation of tests/cuda_emu/emu.h and checked against the float64 reference
like every backend: regions, lse, both gradients, masked (-inf) and ramped logits, determinism.
The "cuda" cases of tests/test_spatial_gather.py run the real kernels where a GPU is.
"""

from __future__ import annotations

import pytest
import torch

import python_ref
from tests._utils import DTYPE_NAMES, assert_close
from tests.cuda_emu.build import emu_module
from tests.test_spatial_gather import LOGITS, SCALE, _make_logits


@pytest.fixture(scope="module")
def emu():
    return emu_module()


def _check(emu, feats, logits, sms, scale=SCALE):
    dtype = feats.dtype
    out, lse = emu.sg_fwd(feats, logits, scale, sms)
    dout = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    dfeats, dlogits = emu.sg_bwd(dout, feats, logits, out, lse, scale)
    f64 = feats.detach().double().requires_grad_(True)
    l64 = logits.detach().double().requires_grad_(True)
    ref = python_ref.spatial_gather(f64, l64, scale)
    ref.backward(dout.double())
    assert out.dtype == dtype and dfeats.dtype == dtype and dlogits.dtype == dtype
    assert_close(out, ref, dtype, "regions")
    assert_close(dfeats, f64.grad, dtype, "dfeats")
    assert_close(dlogits, l64.grad, dtype, "dlogits")
    want_lse = torch.logsumexp(scale * l64.detach().flatten(2), dim=2)
    dead = torch.isneginf(want_lse)  # classes whose logits are all -inf
    assert torch.equal(torch.isneginf(lse), dead), "lse: -inf where every logit is -inf, only there"
    assert_close(lse[~dead], want_lse[~dead], torch.float32 if dtype != torch.float64 else dtype, "lse")
    for t in (out, dfeats, dlogits):
        assert torch.isfinite(t).all()


# (B, C, K, H, W, sms)
SHAPES = [
    (1, 3, 1, 1, 1, 132),  # one pixel, K = 1
    (2, 5, 19, 7, 5, 132),
    (1, 13, 71, 5, 7, 132),  # three class blocks of the forward and of dlogits
    (2, 150, 7, 17, 23, 16),  # two channel blocks (forward), three (dfeats); several pixel groups
]


def _id(s):
    return "B{}-C{}-K{}-{}x{}-sms{}".format(*s)


@pytest.mark.parametrize("kind", LOGITS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_parity(emu, shape, dtype, kind):
    B, C, K, H, W, sms = shape
    feats = torch.randn(B, C, H, W).to(dtype)
    logits = _make_logits(kind, B, K, H, W, dtype, "cpu").detach()
    _check(emu, feats, logits, sms)


def test_the_shapes_reach_every_path(emu):
    G, pix = emu.sg_fwd_plan(2, 150, 7, 17 * 23, 4, 16)
    assert G > 1 and (17 * 23) % pix != 0
    assert emu.sg_fwd_plan(2, 5, 19, 35, 4, 132)[0] == 1


def test_deterministic(emu):
    feats, logits = torch.randn(2, 150, 17, 23), torch.randn(2, 40, 17, 23)
    a = emu.sg_fwd(feats, logits, 0.5, 16)
    b = emu.sg_fwd(feats, logits, 0.5, 16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    dout = torch.randn(2, 150, 40)
    g1 = emu.sg_bwd(dout, feats, logits, a[0], a[1], 0.5)
    g2 = emu.sg_bwd(dout, feats, logits, a[0], a[1], 0.5)
    assert torch.equal(g1[0], g2[0]) and torch.equal(g1[1], g2[1])
