"""Benchmark cases: the operators at the sizes the real models run them.

Each case names its candidates (fastctx backends and plain-PyTorch formulations), which of them
is the reference and which is the strongest plain-PyTorch formulation, and the targets that the
report checks. Add an operator by adding a function that returns its cases to :data:`CASES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

import fastctx
import python_ref


@dataclass
class Target:
    """A claim the report checks: ``backend`` is ``factor`` times faster than ``baseline`` (time),
    or uses at most ``factor`` times its peak memory (memory; below it when ``strict``), for
    ``mode`` at ``dtype``."""

    text: str
    backend: str
    baseline: str
    mode: str
    kind: str  # "speed" | "memory"
    factor: float
    device: str
    dtypes: tuple[torch.dtype, ...]
    strict: bool = False  # memory: the ratio must be below factor, a tie misses


@dataclass
class Case:
    op: str
    name: str
    config: dict
    make_inputs: Callable[[torch.dtype, torch.device], tuple[Tensor, ...]]
    truth: Callable[..., Tensor]  # python_ref, run in float64
    candidates: dict[str, Callable[..., Tensor]]  # name -> fn(*inputs) -> out
    backends: tuple[str, ...]  # which candidates are fastctx backends (may decline)
    reference: str = "reference"
    strongest: str = "reference"
    targets: list[Target] = field(default_factory=list)
    timing_only: tuple[str, ...] = ()  # candidates timed without a parity check (bandwidth floors)
    # multiplies the dtype's tolerance row: whole networks in float32 round further from their
    # float64 truth than one op does (the reference backend as much as the fused one)
    tol_scale: float = 1.0
    # the device types the case runs on (its targets' devices, when the other device's numbers
    # would only cost time: e.g. the whole ISA block, whose CPU numbers bench/heads.py reports)
    devices: tuple[str, ...] = ("cpu", "cuda")


def _cc_inputs(B: int, cqk: int, cv: int, H: int, W: int):
    def make(dtype: torch.dtype, device: torch.device):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, cqk, H, W, generator=g).to(device, dtype)
        k = torch.randn(B, cqk, H, W, generator=g).to(device, dtype)
        v = torch.randn(B, cv, H, W, generator=g).to(device, dtype)
        # CCNet's energies come from 1x1 convs of a 512-channel feature map; scale the random
        # queries so that the softmax is neither one-hot nor flat.
        return q * cqk**-0.5, k, v

    return make


def criss_cross_cases(quick: bool) -> list[Case]:
    """CCNet's sizes: B=2, C=512 (Q/K 64, V 512); 65x129 (512x1024 / 8) and 97x97 (769x769 / 8)."""
    cases = []
    for H, W in ((65, 129), (97, 97)):
        B, cqk, cv = 2, 64, 512
        cand = {
            name: (lambda q, k, v, name=name: fastctx.criss_cross_attention(q, k, v, backend=name))
            for name in ("reference", "cpu", "triton", "cuda")
        }
        targets = [
            Target(f"cpu faster than the einsum reference, fwd+bwd, {H}x{W}", "cpu", "reference", "fwd+bwd", "speed", 1.0, "cpu", (torch.float32,)),
            Target(f"cpu peak memory at most half the reference's, fwd+bwd, {H}x{W}", "cpu", "reference", "fwd+bwd", "memory", 0.5, "cpu", (torch.float32,)),
        ]
        if (H, W) == (97, 97):
            targets.append(Target("triton at least 5x faster than the einsum reference, fwd+bwd, 97x97", "triton", "reference", "fwd+bwd", "speed", 5.0, "cuda", (torch.float32, torch.float16)))
        cases.append(
            Case(
                op="criss_cross_attention",
                name=f"B{B}-C{cqk}x{cv}-{H}x{W}",
                config=dict(B=B, Cqk=cqk, Cv=cv, H=H, W=W, scale=1.0),
                make_inputs=_cc_inputs(B, cqk, cv, H, W),
                truth=python_ref.criss_cross_attention,
                candidates=cand,
                backends=tuple(cand),
                reference="reference",
                strongest="reference",  # mmcv's einsum formulation is both
                targets=targets,
            )
        )
    return cases


def sdpa_region_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The strongest plain-PyTorch formulation of region attention (q [B, Cqk, H, W] against
    k [B, Cqk, S], v [B, Cv, S]): scaled_dot_product_attention on permuted copies (contiguous:
    with a channel stride other than 1, SDPA falls back to its math path)."""
    B, _, H, W = q.shape
    o = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2).contiguous()[:, None] for t in (q.flatten(2), k, v)), scale=scale
    )  # [B, 1, N, Cv]
    return o[:, 0].transpose(1, 2).reshape(B, v.shape[1], H, W)


def region_attention_cases(quick: bool) -> list[Case]:
    """OCR's sizes: B=2, C=512, K=19 (Cityscapes) and 150 (ADE20K) at 64x128 (ResNet, 1/8 of
    512x1024) and 128x256 (HRNet, 1/4); ANN's APNB core: B=2, C=256, S=110 at 64x128 and 97x97."""
    sizes = [(512, 19, 64, 128), (512, 150, 64, 128), (512, 19, 128, 256), (256, 110, 64, 128), (256, 110, 97, 97)]
    cases = []
    for C, S, H, W in sizes:
        B, scale = 2, C**-0.5

        def make(dtype, device, C=C, S=S, H=H, W=W):
            g = torch.Generator().manual_seed(0)
            q = torch.randn(B, C, H, W, generator=g).to(device, dtype)
            k = torch.randn(B, C, S, generator=g).to(device, dtype)
            v = torch.randn(B, C, S, generator=g).to(device, dtype)
            return q, k, v

        cand = {
            name: (lambda q, k, v, name=name, scale=scale: fastctx.region_attention(q, k, v, scale, backend=name))
            for name in ("reference", "cpu", "triton", "cuda")
        }
        cand["sdpa"] = lambda q, k, v, scale=scale: sdpa_region_attention(q, k, v, scale)
        name = f"B{B}-C{C}-S{S}-{H}x{W}"
        cases.append(
            Case(
                op="region_attention",
                name=name,
                config=dict(B=B, Cqk=C, Cv=C, S=S, H=H, W=W, scale=scale),
                make_inputs=make,
                truth=lambda q, k, v, scale=scale: python_ref.region_attention(q, k, v, scale),
                candidates=cand,
                backends=("reference", "cpu", "triton", "cuda"),
                reference="reference",
                strongest="sdpa",
                targets=[
                    Target(f"cpu faster than the reference, fwd+bwd, {name}", "cpu", "reference", "fwd+bwd", "speed", 1.0, "cpu", (torch.float32,)),
                    Target(f"cpu below the reference's peak memory, fwd+bwd, {name}", "cpu", "reference", "fwd+bwd", "memory", 1.0, "cpu", (torch.float32,), strict=True),
                ]
                + (
                    [Target(f"{b} at least 2x faster than SDPA, fwd+bwd, {name}", b, "sdpa", "fwd+bwd", "speed", 2.0, "cuda", (torch.float16,))
                     for b in ("triton", "cuda")]
                    if (H, W) == (128, 256)
                    else []
                ),
            )
        )
    return cases


CASES: dict[str, Callable[[bool], list[Case]]] = {
    "criss_cross_attention": criss_cross_cases,
    "region_attention": region_attention_cases,
}

# Each operator's cases live in their own module (they import Case and Target from here).
from fastctx.bench.cases_interlaced import interlaced_attention_cases, isa_block_cases  # noqa: E402
from fastctx.bench.cases_pyramid import pyramid_attention_cases, pyramid_pool_cases  # noqa: E402
from fastctx.bench.cases_semantic import semantic_pool_cases  # noqa: E402
from fastctx.bench.cases_spatial_gather import spatial_gather_cases  # noqa: E402

CASES.update(
    interlaced_attention=interlaced_attention_cases,
    isa_block=isa_block_cases,
    pyramid_pool=pyramid_pool_cases,
    pyramid_attention=pyramid_attention_cases,
    spatial_gather=spatial_gather_cases,
    semantic_pool=semantic_pool_cases,
)

# Modules and models (fastctx/bench/cases_isnet.py, cases_models.py).
from fastctx.bench.cases_isnet import isnet_attention_cases, isnet_module_cases  # noqa: E402
from fastctx.bench.cases_models import full_model_cases, model_cases  # noqa: E402

CASES.update(isnet_semantic_attention=isnet_attention_cases, isnet_semantic_context=isnet_module_cases, models=model_cases,
             models_full=full_model_cases)

#: Whole modules and models: their originals (dense N x N attention, deep networks, float64
#: truths) take far longer than the operators, so ``--quick`` (``make report``) leaves them out
#: unless named in ``--ops``; the full report (``make report-full``) runs them.
FULL_ONLY = ("isnet_semantic_context", "models", "models_full")
