"""interlaced_attention, Triton host functions (isa_fwd / isa_bwd) against the reference.

Output and dq, dk, dv against autograd of python_ref (float64, random dout); lse against the
logsumexp of energies built here from an explicit group-id map (independent of the reference's
permutations). Outputs come from NaN-poisoned torch.empty (conftest), so an unwritten element
fails. Runs under the Triton interpreter without a GPU: small shapes.
"""

from __future__ import annotations

import pytest
import torch

import python_ref
from tests._utils import DTYPE_NAMES, assert_close, has_triton

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

if has_triton():
    from fastctx.triton.interlaced import _config, isa_bwd, isa_fwd

# (B, Cqk, Cv, H, W, bh, bw, long_mode). Block sizes: 32 x 32 tiles in float32 and float64,
# 64 x 64 (16 minimum) in the 16-bit dtypes; float32 chunks Cqk > 64 (dq is then a product with
# the stored dE) and Cv > 32 in the backward.
CASES = [
    (1, 24, 16, 16, 24, 8, 8, True),  # 64 groups of 6 strided members
    (1, 24, 40, 16, 24, 8, 8, False),  # 6 blocks of 64: two query and two key blocks
    (2, 5, 7, 9, 10, 3, 5, True),  # odd block, 15 groups of 6
    (2, 5, 7, 9, 10, 3, 5, False),  # 6 groups of 15
    (2, 3, 4, 4, 6, 1, 1, True),  # one group: the whole map
    (1, 3, 4, 4, 6, 1, 1, False),  # groups of one member
    (1, 6, 5, 12, 15, 2, 1, True),  # 2 groups of 90: partial last blocks, multi-block softmax
    (1, 72, 70, 4, 6, 2, 3, True),  # channels in chunks (partial last chunks)
    (1, 6, 5, 13, 20, 1, 1, True),  # one group of 260: too long for the scratch backward
]
F64_CASES = CASES[2:]  # float64 checks the arithmetic; the 16 x 24 layouts run in float32
HALF_CASES = [
    (1, 24, 40, 16, 24, 8, 8, False),
    (1, 136, 72, 4, 6, 2, 3, True),  # Cqk and Cv in chunks of 64
    (1, 6, 5, 12, 15, 2, 1, True),  # 2 groups of 90: two 64-blocks
]


def _id(c):
    B, cq, cv, H, W, bh, bw, lm = c
    return f"B{B}-C{cq}x{cv}-{H}x{W}-b{bh}x{bw}-{'long' if lm else 'short'}"


def _params():
    for dtype, cases in ((torch.float32, CASES), (torch.float64, F64_CASES)):
        for c in cases:
            yield pytest.param(dtype, c, id=f"{_id(c)}-{DTYPE_NAMES[dtype]}")
    for dtype in (torch.float16, torch.bfloat16):
        for c in HALF_CASES:
            yield pytest.param(dtype, c, id=f"{_id(c)}-{DTYPE_NAMES[dtype]}")


def _group_ids(H, W, bh, bw, long_mode, device):
    i = torch.arange(H, device=device)[:, None]
    j = torch.arange(W, device=device)[None, :]
    if long_mode:
        g = (i % bh) * bw + j % bw
    else:
        g = (i // bh) * (W // bw) + j // bw
    return g.reshape(-1)  # [H * W]


def _ref_lse(q, k, bh, bw, long_mode, scale):
    """logsumexp over each position's group of scale * <q, k>, float64, [B, H, W]."""
    B, C, H, W = q.shape
    g = _group_ids(H, W, bh, bw, long_mode, q.device)
    qf, kf = q.double().reshape(B, C, -1), k.double().reshape(B, C, -1)
    e = scale * torch.einsum("bcn,bcm->bnm", qf, kf)  # [B, H * W, H * W]
    e = e.masked_fill(g[:, None] != g[None, :], float("-inf"))
    return torch.logsumexp(e, -1).reshape(B, H, W)


def _check(q, k, v, dout, bh, bw, long_mode, scale, dtype):
    mode = "long" if long_mode else "short"
    out, lse, p = isa_fwd(q, k, v, bh, bw, long_mode, scale)
    assert p.numel() == 0
    assert out.dtype == q.dtype and out.shape == (q.shape[0], v.shape[1], *q.shape[2:])
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.shape == (q.shape[0], *q.shape[2:])
    dq, dk, dv = isa_bwd(dout, q, k, v, out, lse, p, bh, bw, long_mode, scale)
    for name, t in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert bool(torch.isfinite(t).all()), f"{name} has unwritten (NaN-poisoned) elements"

    l64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = python_ref.interlaced_attention(*l64, block=(bh, bw), mode=mode, scale=scale)
    grads = torch.autograd.grad(ref, l64, dout.double())
    assert_close(out, ref, dtype, "out")
    # lse is float32 for 16-bit inputs: judged at the float32 row
    lse_dtype = dtype if dtype == torch.float64 else torch.float32
    lse_tol = dtype if dtype in (torch.float16, torch.bfloat16) else lse_dtype
    assert_close(lse, _ref_lse(*l64[:2], bh, bw, long_mode, scale), lse_tol, "lse")
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), grads):
        assert got.dtype == dtype
        assert_close(got, want, dtype, name)


def _check_case(case, dtype):
    """_check on fresh random inputs of ``case``."""
    B, cq, cv, H, W, bh, bw, long_mode = case
    q = torch.randn(B, cq, H, W, dtype=dtype, device=DEV).mul_(cq**-0.25)
    k = torch.randn(B, cq, H, W, dtype=dtype, device=DEV).mul_(cq**-0.25)
    v = torch.randn(B, cv, H, W, dtype=dtype, device=DEV)
    dout = torch.randn(B, cv, H, W, dtype=dtype, device=DEV)
    _check(q, k, v, dout, bh, bw, long_mode, 0.37, dtype)


@pytest.mark.parametrize("dtype,case", list(_params()))
def test_parity(dtype, case):
    if not has_triton():
        pytest.fail("triton is not usable here")
    _check_case(case, dtype)


@pytest.mark.parametrize("copies", [True, False], ids=["channels-last-copies", "in-place"])
@pytest.mark.parametrize("long_mode", [True, False], ids=["long", "short"])
def test_strided_inputs(long_mode, copies, monkeypatch):
    """channels_last, a channel slice, a transposed map and a strided dout: read through
    channels-last copies (the default) or in place."""
    if not has_triton():
        pytest.fail("triton is not usable here")
    from fastctx.triton import _line

    if not copies:  # the kernels then read the caller's strides
        monkeypatch.setattr(_line, "channels_last", lambda *ts: list(ts))
    q = torch.randn(2, 10, 6, 8, device=DEV).to(memory_format=torch.channels_last)
    k = torch.randn(2, 20, 6, 8, device=DEV)[:, ::2]
    v = torch.randn(2, 7, 8, 6, device=DEV).transpose(2, 3)
    dout = torch.randn(2, 7, 6, 16, device=DEV)[..., ::2]
    assert not any(t.is_contiguous() for t in (q, k, v, dout))
    _check(q, k, v, dout, 3, 2, long_mode, 10**-0.5, torch.float32)


def test_config_covers_the_cases():
    """The cases above reach the code paths they claim: chunked channels (dq then a product
    with the stored dE, not in the scores kernel), several blocks."""
    if not has_triton():
        pytest.fail("triton is not usable here")
    assert "mm" in _config(169, 256, 512, torch.float16)  # ISANet's longest groups: the scratch
    for kernel in ("fwd", "dq"):
        assert 72 > _config(4, 72, 70, torch.float32)[kernel]["BLOCK_CQK"]
        assert _config(90, 6, 5, torch.float32)[kernel]["BLOCK_N"] < 90
        assert _config(90, 6, 5, torch.float16)[kernel]["BLOCK_N"] < 90
        assert _config(4, 136, 72, torch.float16)[kernel]["BLOCK_CQK"] < 136
        assert _config(64, 24, 40, torch.float32)[kernel]["BLOCK_N"] < 64
        assert _config(90, 6, 5, torch.float64)[kernel]["BLOCK_N"] < 90
    for dtype in (torch.float32, torch.float16):  # <dout, v> in Cv chunks
        assert 70 > _config(4, 72, 70, dtype)["dq"]["BLOCK_CV"]
    assert 24 >= _config(4, 6, 24, torch.float32)["dq"]["BLOCK_CQK"]  # dq in the scores kernel
    for dtype in (torch.float32, torch.float16, torch.float64):  # products over several blocks
        mm = _config(90, 6, 5, dtype)["mm"]
        assert mm["BLOCK_R"] < 90 and mm["BLOCK_S"] < 90
    assert _config(4, 72, 70, torch.float32)["mm"]["BLOCK_C"] < 70  # dq, dk and dv in chunks
    for dtype in (torch.float32, torch.float64):  # 260 members: the recomputing dq, dk/dv kernels
        cfg = _config(260, 6, 5, dtype)
        assert "dkdv" in cfg and "mm" not in cfg and cfg["dkdv"]["BLOCK_N"] < 260


@pytest.mark.parametrize("dtype,case", [
    pytest.param(torch.float32, CASES[1], id=f"{_id(CASES[1])}-fp32"),  # 2 query / key blocks
    pytest.param(torch.float32, CASES[-2], id=f"{_id(CASES[-2])}-fp32"),  # Cqk and Cv in chunks
    pytest.param(torch.float64, CASES[6], id=f"{_id(CASES[6])}-fp64"),  # groups of 90
    pytest.param(torch.float16, HALF_CASES[0], id=f"{_id(HALF_CASES[0])}-fp16"),
])
def test_scratch_forward(dtype, case, monkeypatch):
    """The engine's forward with the scores computed once (a "fwd_mm" config: stored energies,
    then softmax @ v as a product), against the reference like test_parity."""
    if not has_triton():
        pytest.fail("triton is not usable here")
    import fastctx.triton.interlaced as isa
    from fastctx.triton import _line

    plain = isa._config
    monkeypatch.setattr(isa, "_config", lambda L, cq, cv, dt: {
        **plain(L, cq, cv, dt), "fwd_mm": _line.mm_blocks(L, 32, 32, 32 if dt != torch.float16 else 64, 4)})
    _check_case(case, dtype)


def test_consts_cache():
    """_line._consts caches per config object, dtype and Cqk: the same answer as computed fresh,
    one entry per dtype and Cqk, and a new config object (even an equal one) is computed anew."""
    if not has_triton():
        pytest.fail("triton is not usable here")
    from fastctx.triton import _line

    cfg = _line.blocks(97, 64, 512, 64, 32, 128, 8)
    b16, o16 = _line._consts(cfg, torch.float16, 64)
    b32, _ = _line._consts(cfg, torch.float32, 64)
    assert _line._consts(cfg, torch.float16, 64) == (b16, o16)
    assert b16["DOT_PRECISION"] == "tf32" and b32["DOT_PRECISION"] == cfg["F32_DOT"]
    assert b16["ONE_CQK"] and not _line._consts(cfg, torch.float16, 256)[0]["ONE_CQK"]
    assert "ONE_CQK" not in _line._consts(cfg, torch.float16)[0]
    assert o16 == {"num_warps": 8, "num_stages": 2}
    other = dict(cfg, num_warps=4)
    assert _line._consts(other, torch.float16, 64)[1]["num_warps"] == 4
