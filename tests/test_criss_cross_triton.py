"""criss_cross_attention, Triton host functions (_fwd / _bwd) against the reference, on the
paths the op's parity tests do not reach with the default blocks: channels in chunks, several
query and key blocks per line, the kernels reading NCHW inputs directly.

Output and dq, dk, dv against autograd of python_ref (float64, random dout); lse against the
logsumexp of the H + W - 1 energies built here. Outputs come from NaN-poisoned torch.empty
(conftest), so an unwritten element fails. Runs under the Triton interpreter: small shapes.
"""

from __future__ import annotations

import pytest
import torch

import python_ref
from tests._utils import DTYPE_NAMES, assert_close, has_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"

if has_triton():
    from fastctx.triton.criss_cross import _bwd, _config, _fwd

_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_CQK": 16, "BLOCK_CV": 16, "num_warps": 4,
           "num_stages": 2, "F32_DOT": "ieee"}
SMALL = {"fwd": _BLOCKS, "dq": _BLOCKS, "dkdv": _BLOCKS}
# the engine's scratch backward (p and dE stored, dk / dv / dq as products with them)
SCRATCH = {"fwd": _BLOCKS, "dq": _BLOCKS, "mm": {"BLOCK_R": 16, "BLOCK_S": 16, "BLOCK_C": 16,
                                                 "num_warps": 4, "num_stages": 2, "F32_DOT": "ieee"}}

# (B, Cqk, Cv, H, W, cfg, channels_last)
CASES = [
    (1, 40, 36, 17, 18, SMALL, True),  # 3 Cqk and 3 Cv chunks, 2 query and 2 key blocks per line
    (1, 20, 18, 17, 5, SMALL, False),  # reading NCHW directly, 2 chunks
    (2, 16, 16, 18, 3, SMALL, True),  # one chunk each: dk and dv in one launch, 2 blocks
    (2, 5, 7, 2, 33, SMALL, True),  # two rows: one column key per pixel; rows of 3 blocks
    (1, 6, 9, 1, 20, SMALL, True),  # one row: no column pass
    (1, 6, 9, 20, 1, SMALL, False),  # one column
    (1, 40, 36, 17, 18, SCRATCH, True),  # scratch: dq a product too (Cqk in chunks), 2 blocks
    (2, 16, 20, 5, 33, SCRATCH, False),  # scratch: dq in the scores kernel; NCHW, rows of 3 blocks
]


def _id(c):
    B, cq, cv, H, W, cfg, tr = c
    return f"B{B}-C{cq}x{cv}-{H}x{W}-{'cl' if tr else 'nchw'}{'-scratch' if 'mm' in cfg else ''}"


def _params():
    for c in CASES:
        yield pytest.param(torch.float32, c, id=f"{_id(c)}-fp32")
    half = (1, 40, 36, 17, 3, SMALL, True)  # chunks and 2 column blocks, fewer lines (interpreter)
    for dtype in (torch.float16, torch.bfloat16):
        yield pytest.param(dtype, half, id=f"{_id(half)}-{DTYPE_NAMES[dtype]}")


def _lse(q, k, scale):
    """float64 logsumexp over each pixel's H + W - 1 energies, built directly."""
    q, k = q.double(), k.double()
    H = q.shape[2]
    e_col = scale * torch.einsum("bchw,bciw->bhwi", q, k)
    e_col = e_col.masked_fill(torch.eye(H, dtype=torch.bool, device=q.device)[:, None, :], float("-inf"))
    e_row = scale * torch.einsum("bchw,bchj->bhwj", q, k)
    return torch.logsumexp(torch.cat([e_col, e_row], -1), -1)


@pytest.mark.skipif(not has_triton(), reason="needs triton (a GPU or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype,case", list(_params()))
def test_host_functions(dtype, case):
    B, cq, cv, H, W, cfg, transpose = case
    scale = 0.3
    q, k = (torch.randn(B, cq, H, W, device=DEV, dtype=dtype) for _ in range(2))
    v = torch.randn(B, cv, H, W, device=DEV, dtype=dtype)
    out, lse = _fwd(q, k, v, scale, cfg, transpose)
    dout = torch.randn_like(out)
    dq, dk, dv = _bwd(dout, q, k, v, out, lse, scale, cfg, transpose)

    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    want = python_ref.criss_cross_attention(q64, k64, v64, scale)
    want.backward(dout.double())
    assert_close(out, want, dtype, "out")
    assert_close(lse, _lse(q, k, scale), torch.float32 if dtype == torch.float32 else dtype, "lse")
    for name, got, ref in (("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        assert_close(got, ref, dtype, name)


@pytest.mark.skipif(not has_triton(), reason="needs triton (a GPU or TRITON_INTERPRET=1)")
def test_config_covers_the_cases():
    # the default blocks: whole lines up to 64, Cqk in chunks above 128, Cv in chunks
    for kernel in ("fwd", "dq", "dkdv"):
        assert _config(97, 64, 512, torch.float16)[kernel]["BLOCK_M"] < 97
        assert _config(7, 64, 512, torch.float16)[kernel]["BLOCK_M"] == 16
        assert _config(9, 136, 24, torch.float16)[kernel]["BLOCK_CQK"] < 136
        if kernel != "dkdv":
            assert _config(9, 64, 512, torch.float32)[kernel]["BLOCK_CV"] < 512
    # float32: the scratch backward where the line is short enough, else the dk/dv kernels
    assert "mm" in _config(97, 64, 512, torch.float32) and "dkdv" not in _config(97, 64, 512, torch.float32)
    assert "dkdv" in _config(300, 64, 512, torch.float32) and "mm" not in _config(300, 64, 512, torch.float32)
    assert "dkdv" in _config(97, 64, 512, torch.float16)
