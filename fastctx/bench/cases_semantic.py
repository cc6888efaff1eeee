"""Benchmark cases of ISNet's semantic pooling (``semantic_pool``).

Candidates: the fastctx backends ("reference" is python_ref.semantic_pool, the literal loop of
the original sssegmentation code: a Python loop over images and classes with a host sync per
class), and "compact", the strongest plain-PyTorch formulation: python_ref's loop-free
``semantic_pool_regions`` (a masked softmax over [B, K, N] and an einsum) gathered back to the
pixels. "read-twice" is a bandwidth floor, not an implementation (timed, never checked): issue
5's GPU target is the semantic pool's forward (Triton, CUDA C++) within 2x of reading feats and
logits twice.
"""

from __future__ import annotations

import torch
from torch import Tensor

import fastctx
import python_ref
from fastctx.bench.cases import Case, Target


def _compact(feats: Tensor, logits: Tensor) -> Tensor:
    regions, _, labels = python_ref.semantic_pool_regions(feats, logits)
    B, C, H, W = feats.shape
    idx = labels.reshape(B, 1, H * W).expand(B, C, H * W)
    return torch.gather(regions, 2, idx).reshape(B, C, H, W)


def _read_twice(feats: Tensor, logits: Tensor) -> Tensor:
    """Reads feats and logits twice each (two sums of each, no output pass: the result is a
    broadcast view of the sums, shaped like semantic_pool's output)."""
    B, C, H, W = feats.shape
    s = feats.sum((2, 3)) + feats.sum((2, 3)) + (logits.sum((1, 2, 3)) + logits.sum((1, 2, 3)))[:, None]
    return s[:, :, None, None].expand(B, C, H, W)


def semantic_pool_cases(quick: bool) -> list[Case]:
    """ISNet's sizes: B=2, C=512; K=19 (Cityscapes) at 64x128 (1/8 of 512x1024) and K=150
    (ADE20K) at 64x64 (1/8 of 512x512)."""
    cases = []
    for K, H, W in ((19, 64, 128), (150, 64, 64)):
        B, C = 2, 512

        def make(dtype, device, K=K, H=H, W=W):
            g = torch.Generator().manual_seed(0)
            feats = torch.randn(B, C, H, W, generator=g).to(device, dtype)
            logits = (torch.randn(B, K, H, W, generator=g) * 2).to(device, dtype)
            return feats, logits

        cand = {
            name: (lambda f, lg, name=name: fastctx.semantic_pool(f, lg, backend=name))
            for name in ("reference", "cpu", "triton", "cuda")
        }
        cand["compact"] = _compact
        cand["read-twice"] = _read_twice
        name = f"B{B}-C{C}-K{K}-{H}x{W}"
        targets = [
            Target(f"cpu faster than the loop-free PyTorch formulation, fwd+bwd, {name}", "cpu", "compact", "fwd+bwd", "speed", 1.0, "cpu", (torch.float32,)),
            Target(f"triton faster than the loop-free PyTorch formulation, fwd+bwd, {name}", "triton", "compact", "fwd+bwd", "speed", 1.0, "cuda", (torch.float32, torch.float16)),
            Target(f"triton fwd within 2x of reading feats and logits twice, {name}", "triton", "read-twice", "fwd", "speed", 0.5, "cuda", (torch.float32, torch.float16)),
            Target(f"cuda faster than the loop-free PyTorch formulation, fwd+bwd, {name}", "cuda", "compact", "fwd+bwd", "speed", 1.0, "cuda", (torch.float32, torch.float16)),
            Target(f"cuda fwd within 2x of reading feats and logits twice, {name}", "cuda", "read-twice", "fwd", "speed", 0.5, "cuda", (torch.float32, torch.float16)),
        ]
        if K == 150:
            targets.insert(0, Target(f"cpu at least 20x faster than the original loop, fwd+bwd, {name}", "cpu", "reference", "fwd+bwd", "speed", 20.0, "cpu", (torch.float32,)))
        cases.append(
            Case(
                op="semantic_pool",
                name=name,
                config=dict(B=B, C=C, K=K, H=H, W=W),
                make_inputs=make,
                truth=python_ref.semantic_pool,
                candidates=cand,
                backends=("reference", "cpu", "triton", "cuda"),
                reference="reference",
                strongest="compact",
                targets=targets,
                timing_only=("read-twice",),
            )
        )
    return cases
