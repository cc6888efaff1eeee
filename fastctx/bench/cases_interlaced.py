"""Benchmark cases of interlaced_attention (ISANet) at the sizes mmseg's ISAHead runs it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import fastctx
import python_ref
from fastctx.bench.cases import Case, Target


def _sdpa_interlaced(q: Tensor, k: Tensor, v: Tensor, block: tuple[int, int], mode: str, scale: float) -> Tensor:
    """The strongest plain-PyTorch formulation: scaled_dot_product_attention on permuted copies
    of q, k and v (one small sequence per group), and the inverse permutation of its output."""
    B, _, H, W = q.shape
    bh, bw = block
    gh, gw = H // bh, W // bw

    def groups(x: Tensor) -> Tensor:  # [B, C, H, W] -> [B * G, L, C]
        x = x.reshape(B, x.shape[1], gh, bh, gw, bw)
        if mode == "long":  # groups of equal (i % bh, j % bw)
            return x.permute(0, 3, 5, 2, 4, 1).reshape(B * bh * bw, gh * gw, x.shape[1])
        return x.permute(0, 2, 4, 3, 5, 1).reshape(B * gh * gw, bh * bw, x.shape[1])

    o = F.scaled_dot_product_attention(groups(q)[:, None], groups(k)[:, None], groups(v)[:, None], scale=scale)[:, 0]
    Cv = v.shape[1]
    if mode == "long":  # [B, bh, bw, gh, gw, Cv] -> [B, Cv, gh, bh, gw, bw]
        o = o.reshape(B, bh, bw, gh, gw, Cv).permute(0, 5, 3, 1, 4, 2)
    else:  # [B, gh, gw, bh, bw, Cv] -> [B, Cv, gh, bh, gw, bw]
        o = o.reshape(B, gh, gw, bh, bw, Cv).permute(0, 5, 1, 3, 2, 4)
    return o.reshape(B, Cv, H, W)


def interlaced_attention_cases(quick: bool) -> list[Case]:
    """ISANet's sizes (mmseg ISAHead): B=2, Q/K 256 (isa_channels), V 512 (channels), block 8x8,
    both relations, at 64x128 (512x1024 / 8) and 104x104 (769x769 / 8 = 97x97, padded to 8s)."""
    cases = []
    B, cqk, cv, block = 2, 256, 512, (8, 8)
    for H, W in ((64, 128), (104, 104)):
        for mode in ("long", "short"):
            scale = cqk**-0.5

            def make(dtype, device, H=H, W=W):
                g = torch.Generator().manual_seed(0)
                q = torch.randn(B, cqk, H, W, generator=g).to(device, dtype)
                k = torch.randn(B, cqk, H, W, generator=g).to(device, dtype)
                v = torch.randn(B, cv, H, W, generator=g).to(device, dtype)
                return q, k, v

            cand = {
                name: (
                    lambda q, k, v, name=name, mode=mode, scale=scale: fastctx.interlaced_attention(
                        q, k, v, block, mode, scale, backend=name
                    )
                )
                for name in ("reference", "cpu", "triton")
            }
            cand["sdpa"] = lambda q, k, v, mode=mode, scale=scale: _sdpa_interlaced(q, k, v, block, mode, scale)
            name = f"B{B}-C{cqk}x{cv}-{H}x{W}-blk8x8-{mode}"
            cases.append(
                Case(
                    op="interlaced_attention",
                    name=name,
                    config=dict(B=B, Cqk=cqk, Cv=cv, H=H, W=W, block=block, mode=mode, scale=scale),
                    make_inputs=make,
                    truth=lambda q, k, v, mode=mode, scale=scale: python_ref.interlaced_attention(q, k, v, block, mode, scale),
                    candidates=cand,
                    backends=("reference", "cpu", "triton"),
                    reference="reference",
                    strongest="sdpa",
                    targets=[
                        Target(f"cpu faster than the reference, fwd+bwd, {name}", "cpu", "reference", "fwd+bwd", "speed", 1.0, "cpu", (torch.float32,)),
                        Target(f"cpu below the reference's peak memory, fwd+bwd, {name}", "cpu", "reference", "fwd+bwd", "memory", 1.0, "cpu", (torch.float32,), strict=True),
                        Target(f"triton at least as fast as SDPA on permuted copies, fwd+bwd, {name}", "triton", "sdpa", "fwd+bwd", "speed", 1.0, "cuda", (torch.float16,)),
                    ],
                )
            )
    return cases
