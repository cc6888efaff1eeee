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
    or uses at most ``factor`` times its peak memory (memory), for ``mode`` at ``dtype``."""

    text: str
    backend: str
    baseline: str
    mode: str
    kind: str  # "speed" | "memory"
    factor: float
    device: str
    dtypes: tuple[torch.dtype, ...]


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


CASES: dict[str, Callable[[bool], list[Case]]] = {"criss_cross_attention": criss_cross_cases}
