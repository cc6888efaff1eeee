"""Benchmark cases of ANN's pyramid ops (pyramid_pool, pyramid_attention) at the model's sizes.

Register them in :data:`fastctx.bench.cases.CASES` as
``"pyramid_pool": pyramid_pool_cases, "pyramid_attention": pyramid_attention_cases``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import fastctx
import python_ref
from fastctx.bench.cases import Case, Target, sdpa_region_attention

SCALES = (1, 3, 6, 8)
# ANN (mmseg ANNHead): B=2, key/query 256 channels, value 256 channels; 64x128 (512x1024 / 8) and
# 97x97 (769x769 / 8). APNB: queries on the same map as keys and values.
SIZES = ((64, 128), (97, 97))


def _torch_pyramid_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The strongest plain-PyTorch formulation: adaptive_avg_pool2d per scale, then
    scaled_dot_product_attention on permuted copies."""
    kp = torch.cat([F.adaptive_avg_pool2d(k, s).flatten(2) for s in SCALES], 2)  # [B, Cqk, S]
    vp = torch.cat([F.adaptive_avg_pool2d(v, s).flatten(2) for s in SCALES], 2)  # [B, Cv, S]
    return sdpa_region_attention(q, kp, vp, scale)


def _cpu_targets(name: str) -> list[Target]:
    return [
        Target(f"cpu faster than the reference, fwd+bwd, {name}", "cpu", "reference", "fwd+bwd", "speed", 1.0, "cpu", (torch.float32,)),
        Target(f"cpu below the reference's peak memory, fwd+bwd, {name}", "cpu", "reference", "fwd+bwd", "memory", 1.0, "cpu", (torch.float32,), strict=True),
    ]


def pyramid_attention_cases(quick: bool) -> list[Case]:
    """APNB core: B=2, Cqk=Cv=256, S=110, at 64x128 and 97x97."""
    cases = []
    for H, W in SIZES:
        B, cqk, cv = 2, 256, 256
        scale = cqk**-0.5

        def make(dtype, device, H=H, W=W):
            g = torch.Generator().manual_seed(0)
            q = torch.randn(B, cqk, H, W, generator=g).to(device, dtype)
            k = torch.randn(B, cqk, H, W, generator=g).to(device, dtype)
            v = torch.randn(B, cv, H, W, generator=g).to(device, dtype)
            return q, k, v

        cand = {
            name: (lambda q, k, v, name=name: fastctx.pyramid_attention(q, k, v, SCALES, scale, backend=name))
            for name in ("reference", "cpu", "triton")
        }
        cand["pool+sdpa"] = lambda q, k, v, scale=scale: _torch_pyramid_attention(q, k, v, scale)
        name = f"B{B}-C{cqk}x{cv}-{H}x{W}-S110"
        cases.append(
            Case(
                op="pyramid_attention",
                name=name,
                config=dict(B=B, Cqk=cqk, Cv=cv, H=H, W=W, pool_scales=SCALES, scale=scale),
                make_inputs=make,
                truth=lambda q, k, v, scale=scale: python_ref.pyramid_attention(q, k, v, SCALES, scale),
                candidates=cand,
                backends=("reference", "cpu", "triton"),
                reference="reference",
                strongest="pool+sdpa",
                targets=_cpu_targets(name),
            )
        )
    return cases


def pyramid_pool_cases(quick: bool) -> list[Case]:
    """ANN's key / value pooling alone: B=2, C=256, scales 1, 3, 6, 8 at 64x128 and 97x97."""
    cases = []
    for H, W in SIZES:
        B, C = 2, 256

        def make(dtype, device, H=H, W=W):
            g = torch.Generator().manual_seed(0)
            return (torch.randn(B, C, H, W, generator=g).to(device, dtype),)

        cand = {
            name: (lambda x, name=name: fastctx.pyramid_pool(x, SCALES, backend=name))
            for name in ("reference", "cpu", "triton")
        }
        name = f"B{B}-C{C}-{H}x{W}-S110"
        cases.append(
            Case(
                op="pyramid_pool",
                name=name,
                config=dict(B=B, C=C, H=H, W=W, pool_scales=SCALES),
                make_inputs=make,
                truth=lambda x: python_ref.pyramid_pool(x, SCALES),
                candidates=cand,
                backends=tuple(cand),
                reference="reference",
                strongest="reference",  # adaptive_avg_pool2d per scale is both
                targets=_cpu_targets(name),
            )
        )
    return cases
