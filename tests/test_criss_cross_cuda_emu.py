"""The CUDA criss-cross attention's device code and launch sequences, run without a GPU.

csrc/cuda/criss_cross_kernels.cuh (its kernels and host sequences, unchanged; they passed parity
on an H100 and an H200, sessions 9-11) compiled for the CPU against the CUDA emulation of
tests/cuda_emu/emu.h and checked against the float64 reference: a guard, in CI, for every change
to them made without a GPU. The "cuda" cases of tests/test_criss_cross.py run the real kernels
where a GPU is.
"""

from __future__ import annotations

import pytest
import torch

from tests._utils import DTYPE_NAMES, assert_close
from tests.cuda_emu.build import emu_module
from tests.test_criss_cross import SHAPES, _id, _inputs, _reference


@pytest.fixture(scope="module")
def emu():
    return emu_module()


# SHAPES (odd sizes, a row, a column, a pixel) and Cqk past the 16-wide chunk (the 64-wide dq / dk
# kernels), Cv past one 32-wide chunk (several y-blocks of the forward and dv)
CASES = SHAPES + [(1, 20, 40, 6, 11)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("shape", CASES, ids=_id)
def test_parity(emu, shape, dtype):
    q, k, v = _inputs(shape, dtype, "cpu", requires_grad=False)
    scale = 0.8
    out, lse = emu.cc_fwd(q, k, v, scale, 132)
    dout = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    dq, dk, dv = emu.cc_bwd(dout, q, k, v, out, lse, scale, 132)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), _reference(q, k, v, dout, scale)):
        assert_close(got, want, dtype, name)
