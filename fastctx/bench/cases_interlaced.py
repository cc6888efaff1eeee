"""Benchmark cases of interlaced_attention (ISANet) at the sizes mmseg's ISAHead runs it, and of
the whole ISA block (``isa_block``: fastctx.nn.InterlacedSparseAttention, both stages, with the
projections, padding and crop) on the reference vs the fused backends."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import fastctx
import python_ref
from fastctx.backends import why_not
from fastctx.bench.cases import Case, Target
from fastctx.bench.cases_isnet import OutputParityCase
from fastctx.bench.measure import Skip
from fastctx.nn.interlaced import interlaced_sparse_context


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


_BLOCKS: dict[tuple, fastctx.nn.InterlacedSparseAttention] = {}


def isa_block_module(dtype: torch.dtype, device: torch.device) -> fastctx.nn.InterlacedSparseAttention:
    """mmseg ISAHead's block (channels 512, isa_channels 256, 8x8), eval mode, the same weights
    (seeded; BatchNorm running statistics drawn so that BN is not the identity) in every dtype."""
    key = (dtype, str(device))
    if key not in _BLOCKS:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            m = fastctx.nn.InterlacedSparseAttention(512, 256, (8, 8))
            for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)
        _BLOCKS[key] = m.eval().to(device, dtype)
    return _BLOCKS[key]


def _isa_block(x: Tensor, backend: str) -> Tensor:
    reason = why_not("interlaced_attention", backend, x.device.type, x.dtype)
    if reason is not None:  # e.g. triton on CPU tensors: said so, not run
        raise Skip(reason)
    m = isa_block_module(x.dtype, x.device)
    return interlaced_sparse_context(x, m.global_relation, m.local_relation, m.down_factor, m.mask_padding, backend)


def isa_block_cases(quick: bool) -> list[Case]:
    """Issue 3's GPU target: the whole ISA block (both stages) at least 2x faster fused than on
    the reference, float16, at mmseg's 97x97 (769x769 / 8, padded to 104x104 inside). Output
    parity only (the input gradients cross eval-mode BN + ReLU, whose kink float rounding flips
    against the float64 truth; the op's own cases check every gradient)."""
    B, C, H, W = 2, 512, 97, 97
    name = f"B{B}-C{C}-{H}x{W}-blk8x8"

    def make(dtype, device):
        g = torch.Generator().manual_seed(0)
        return (torch.randn(B, C, H, W, generator=g).to(device, dtype),)

    cand = {b: (lambda x, b=b: _isa_block(x, b)) for b in ("reference", "cpu", "triton")}
    return [
        OutputParityCase(
            op="isa_block",
            name=name,
            config=dict(B=B, C=C, H=H, W=W, isa_channels=256, block=(8, 8), mode="eval"),
            make_inputs=make,
            truth=lambda x: _isa_block(x, "reference"),
            candidates=cand,
            backends=(),
            reference="reference",
            devices=("cuda",),  # the target is a GPU's; bench/heads.py times ISAHead on CPU
            targets=[
                Target(f"ISA block triton at least 2x faster than on the reference, fwd+bwd, {name}", "triton", "reference", "fwd+bwd", "speed", 2.0, "cuda", (torch.float16,)),
            ],
        )
    ]
