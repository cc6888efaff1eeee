"""Regression timings of the CPU backends with pytest-benchmark (not pass/fail tests).

    .venv/bin/python -m pytest bench/test_bench_cpu.py --benchmark-only --benchmark-autosave
    .venv/bin/python -m pytest bench/test_bench_cpu.py --benchmark-only --benchmark-compare

Grouped by op and size, so each group shows the reference and the compiled kernel side by side.
The side-by-side report with parity checks and memory is `python -m fastctx bench`.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastctx

os.environ["FASTCTX_CHECK_NAN"] = "0"  # time the kernels, as the baselines do no checks


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("H,W", [(65, 129), (97, 97)], ids=["65x129", "97x97"])
def test_criss_cross_fwd_bwd(benchmark, backend, H, W):
    benchmark.group = f"criss_cross_attention B2-C64x512-{H}x{W} fwd+bwd"
    q, k = (torch.randn(2, 64, H, W).mul_(0.125).requires_grad_() for _ in range(2))
    v = torch.randn(2, 512, H, W, requires_grad=True)
    dout = torch.randn(2, 512, H, W)

    def step():
        out = fastctx.criss_cross_attention(q, k, v, backend=backend)
        return torch.autograd.grad(out, (q, k, v), dout)

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
