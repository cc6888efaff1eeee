"""The CPU kernels' instruction-set builds: the spatial gather and region attention have an
AVX-512 build (64-byte vectors) that the compiled extension picks where the CPU has AVX-512F/DQ/
BW/VL, and AVX2 + FMA and baseline builds (32-byte vectors). The op tests run whichever build this
machine picks; this file runs the AVX2 one too, in a subprocess with ``FASTCTX_CPU_AVX512=0`` (the
choice is made once a process), so that on an AVX-512 machine both are checked against the float64
reference: outputs and every gradient, odd shapes, vector tails, channels-last inputs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import torch, fastctx, python_ref
from fastctx.testing import mismatch

torch.manual_seed(0)
problems = []

def check(name, fn, ref, inputs, dtype):
    xs = [t.detach().to(dtype).requires_grad_(True) for t in inputs]
    x64 = [t.detach().double().requires_grad_(True) for t in inputs]
    out, truth = fn(*xs), ref(*x64)
    dout = torch.randn(truth.shape, dtype=torch.float64)
    grads = torch.autograd.grad(out, xs, dout.to(dtype))
    tgrads = torch.autograd.grad(truth, x64, dout)
    for label, a, b in [("out", out, truth)] + [(f"grad{i}", g, t) for i, (g, t) in enumerate(zip(grads, tgrads))]:
        msg = mismatch(a, b, dtype, label)
        if msg:
            problems.append(f"{name} {dtype}: {msg.splitlines()[0]}")

for dtype in (torch.float32, torch.float64):
    for B, C, K, H, W in [(2, 20, 7, 33, 65), (1, 13, 19, 5, 7), (1, 3, 150, 17, 1), (1, 24, 19, 97, 97)]:
        feats, logits = torch.randn(B, C, H, W), torch.randn(B, K, H, W)
        for cl in (False, True):
            f, l = (feats.contiguous(memory_format=torch.channels_last), logits.contiguous(memory_format=torch.channels_last)) if cl else (feats, logits)
            check(f"spatial_gather B{B}-C{C}-K{K}-{H}x{W} cl={cl}",
                  lambda a, b: fastctx.spatial_gather(a, b, scale=0.7, backend="cpu"),
                  lambda a, b: python_ref.spatial_gather(a, b, scale=0.7), [f, l], dtype)
    for B, Cqk, Cv, S, H, W in [(2, 12, 20, 19, 33, 65), (1, 5, 7, 3, 1, 13), (1, 16, 24, 150, 17, 19), (1, 8, 40, 110, 97, 97)]:
        q, k, v = torch.randn(B, Cqk, H, W), torch.randn(B, Cqk, S), torch.randn(B, Cv, S)
        for cl in (False, True):
            qq = q.contiguous(memory_format=torch.channels_last) if cl else q
            check(f"region_attention B{B}-Cqk{Cqk}-Cv{Cv}-S{S}-{H}x{W} cl={cl}",
                  lambda a, b, c: fastctx.region_attention(a, b, c, backend="cpu"),
                  lambda a, b, c: python_ref.region_attention(a, b, c), [qq, k, v], dtype)
print("\n".join(problems) if problems else "OK")
"""


@pytest.mark.parametrize("avx512", ["0", "1"], ids=["avx2-build", "default-build"])
def test_spatial_gather_and_region_attention_builds_match_the_reference(avx512):
    env = dict(os.environ, FASTCTX_CPU_AVX512=avx512, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "OK", res.stdout[-3000:]
