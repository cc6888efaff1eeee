"""Benchmark cases of spatial_gather (OCR's soft region pooling) at OCRNet's sizes."""

from __future__ import annotations

import torch
from torch import Tensor

import fastctx
import python_ref
from fastctx.bench.cases import Case, Target


def _softmax_bmm(feats: Tensor, logits: Tensor, scale: float) -> Tensor:
    """The strongest plain-PyTorch formulation (mmseg's SpatialGatherModule): softmax over the
    pixels, then one batched matmul."""
    w = torch.softmax(scale * logits.flatten(2), dim=-1)  # [B, K, N]
    return torch.bmm(feats.flatten(2), w.transpose(1, 2))  # [B, C, K]


def _read_once(feats: Tensor, logits: Tensor) -> Tensor:
    """Bandwidth floor, not an implementation: reads feats and logits once (a sum of each) and
    returns a [B, C, K] tensor built from the sums. Timed, never parity-checked."""
    return feats.sum((2, 3))[:, :, None] + logits.sum((2, 3))[:, None, :]


def spatial_gather_cases(quick: bool) -> list[Case]:
    """OCR's sizes: B=2, C=512, K=19 (Cityscapes) and 150 (ADE20K) at 64x128 (ResNet, 1/8 of
    512x1024) and 128x256 (HRNet, 1/4)."""
    cases = []
    for C, K, H, W in ((512, 19, 64, 128), (512, 150, 64, 128), (512, 19, 128, 256), (512, 150, 128, 256)):
        B, scale = 2, 1.0

        def make(dtype, device, C=C, K=K, H=H, W=W):
            g = torch.Generator().manual_seed(0)
            feats = torch.randn(B, C, H, W, generator=g).to(device, dtype)
            # auxiliary-head logits: a spread that makes the softmax over pixels neither flat
            # nor one-hot
            logits = (2 * torch.randn(B, K, H, W, generator=g)).to(device, dtype)
            return feats, logits

        cand = {
            name: (lambda f, lg, name=name: fastctx.spatial_gather(f, lg, scale, backend=name))
            for name in ("reference", "cpu", "triton", "cuda")
        }
        cand["softmax+bmm"] = lambda f, lg: _softmax_bmm(f, lg, scale)
        cand["read-once"] = _read_once
        name = f"B{B}-C{C}-K{K}-{H}x{W}"
        cases.append(
            Case(
                op="spatial_gather",
                name=name,
                config=dict(B=B, C=C, K=K, H=H, W=W, scale=scale),
                make_inputs=make,
                truth=lambda f, lg: python_ref.spatial_gather(f, lg, scale),
                candidates=cand,
                backends=("reference", "cpu", "triton", "cuda"),
                reference="reference",
                strongest="softmax+bmm",
                timing_only=("read-once",),
                targets=[
                    Target(f"cpu faster than the reference, fwd+bwd, {name}", "cpu", "reference", "fwd+bwd", "speed", 1.0, "cpu", (torch.float32,)),
                    Target(f"cpu below the reference's peak memory, fwd+bwd, {name}", "cpu", "reference", "fwd+bwd", "memory", 1.0, "cpu", (torch.float32,), strict=True),
                    Target(f"triton fwd within 1.5x of reading feats and logits once, {name}", "triton", "read-once", "fwd", "speed", 1 / 1.5, "cuda", (torch.float32, torch.float16)),
                    Target(f"cuda fwd within 1.5x of reading feats and logits once, {name}", "cuda", "read-once", "fwd", "speed", 1 / 1.5, "cuda", (torch.float32, torch.float16)),
                ],
            )
        )
    return cases
