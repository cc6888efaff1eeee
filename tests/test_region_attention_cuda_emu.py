"""The CUDA region attention's device code and launch sequences, run without a GPU.

csrc/cuda/region_attention_kernels.cuh (its kernels and host sequences, unchanged) compiled for
the CPU against the CUDA emulation of tests/cuda_emu/emu.h and checked against the float64
reference like every backend: out, lse, the gradients of q, k, v and bias, with no bias, finite,
masked and all-masked biases, determinism. The "cuda" cases of tests/test_region_attention.py
run the real kernels where a GPU is.
"""

from __future__ import annotations

import pytest
import torch

import python_ref
from tests._utils import DTYPE_NAMES, assert_close
from tests.cuda_emu.build import emu_module
from tests.test_region_attention import BIASES, _make_bias

SCALE = 0.8


@pytest.fixture(scope="module")
def emu():
    return emu_module()


def _inputs(shape, dtype, bias_kind):
    B, cq, cv, H, W, S = shape
    q = torch.randn(B, cq, H, W).mul_(cq**-0.25).to(dtype)
    k = torch.randn(B, cq, S).mul_(cq**-0.25).to(dtype)
    v = torch.randn(B, cv, S).to(dtype)
    bias = _make_bias(bias_kind, B, S, dtype, "cpu")
    return q, k, v, (torch.zeros(B, S, dtype=dtype) if bias is None else bias.detach())


def _check(emu, q, k, v, bias, dtype, sms=132):
    out, lse, p = emu.ra_fwd(q, k, v, bias, SCALE)
    assert p.numel() == 0 and out.dtype == dtype
    dout = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    dq, dk, dv, dbias = emu.ra_bwd(dout, q, k, v, bias, out, SCALE, sms)
    l64 = [t.double().requires_grad_(True) for t in (q, k, v, bias)]
    ref = python_ref.region_attention(*l64[:3], SCALE, l64[3])
    ref.backward(dout.double())
    assert_close(out, ref, dtype, "out")
    for name, got, t64 in zip(("dq", "dk", "dv", "dbias"), (dq, dk, dv, dbias), l64):
        assert got.dtype == dtype
        assert_close(got, t64.grad, dtype, name)
    with torch.no_grad():
        e = SCALE * torch.einsum("bcn,bcs->bsn", l64[0].flatten(2), l64[1]) + l64[3][:, :, None]
        want = torch.logsumexp(e, dim=1).reshape(lse.shape)
    dead = torch.isneginf(want)
    assert torch.equal(torch.isneginf(lse), dead)
    assert_close(lse[~dead], want[~dead], torch.float64 if dtype == torch.float64 else torch.float32, "lse")
    return out, dq


# (B, Cqk, Cv, H, W, S): test_region_attention's shapes, and more than 64 channels (two channel
# blocks of the mixing kernel, two of the reductions) with more than 32 keys (two key blocks)
SHAPES = [(1, 3, 5, 1, 1, 1), (2, 3, 13, 7, 5, 19), (2, 20, 24, 13, 9, 40), (1, 13, 3, 5, 7, 171),
          (2, 70, 130, 9, 11, 33)]


def _id(s):
    return "B{}-C{}x{}-{}x{}-S{}".format(*s)


def _cases():
    for shape in SHAPES:
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            for bias_kind in BIASES if dtype in (torch.float32, torch.float64) else ["masked"]:
                yield pytest.param(shape, dtype, bias_kind, id=f"{_id(shape)}-{DTYPE_NAMES[dtype]}-bias_{bias_kind}")


@pytest.mark.parametrize("shape,dtype,bias_kind", list(_cases()))
def test_parity(emu, shape, dtype, bias_kind):
    q, k, v, bias = _inputs(shape, dtype, bias_kind)
    out, dq = _check(emu, q, k, v, bias, dtype)
    if bias_kind == "all-masked":
        assert (out[0] == 0).all() and (dq[0] == 0).all()


def test_deterministic(emu):
    q, k, v, bias = _inputs((2, 70, 130, 9, 11, 33), torch.float32, "masked")
    a = emu.ra_fwd(q, k, v, bias, SCALE)
    assert torch.equal(a[0], emu.ra_fwd(q, k, v, bias, SCALE)[0])
    dout = torch.randn_like(a[0])
    g1 = emu.ra_bwd(dout, q, k, v, bias, a[0], SCALE, 16)
    g2 = emu.ra_bwd(dout, q, k, v, bias, a[0], SCALE, 16)
    for x, y in zip(g1, g2):
        assert torch.equal(x, y)
