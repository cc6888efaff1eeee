"""Benchmark cases of whole segmentation models: one training step, fused vs reference backend.

For each ``*_r18_d8`` model of :mod:`fastctx.models` (the CPU-sized configs), K=19, B=2, a
``3 x 128 x 256`` input, training mode: candidates "fused" (``backend=None``: the compiled
kernels where they run) and "reference" (``backend="reference"``: python_ref, the same weights).

What is timed: the image AND every parameter are the case's inputs (the model runs through
``torch.func.functional_call``), so the runner's backward computes the gradient of every parameter,
as a training step does. The candidate returns every training output's logits (``out``, ``aux``,
ISNet's ``stage1``) flattened into one vector; the runner's random upstream gradient on that
vector stands for the loss's (the cross-entropy on ``19 x 16 x 32`` logits per output is
negligible next to the network). "fwd+bwd" is then the step's forward and backward (no optimizer).
Dropout is switched off (its modules in eval mode) so that both candidates and the truth see the
same network; BatchNorm runs in training mode.

Parity: the logits against a float64 truth (the reference backend run in float64, same weights),
within the float32 tolerance, or at most twice as far from it as the reference backend in float32
(the yardstick: float32's own drift through a whole network). The parameter gradients are computed but not compared
(``check_grads = False``): float32 rounding through the deep network exceeds any per-op
tolerance, and tests/test_models.py compares every gradient of the two backends in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

import fastctx.models as M
from fastctx import _ext
from fastctx.bench.cases import Case
from fastctx.models._init import randomize_for_parity

MODELS = ("ccnet_r18_d8", "isanet_r18_d8", "ann_r18_d8", "ocrnet_r18_d8", "isnet_r18_d8")
NUM_CLASSES = 19
_MODELS: dict[tuple, nn.Module] = {}


@dataclass
class ModelCase(Case):
    """A Case whose runner parity check compares the output (the logits) only, and accepts an
    output that misses the float32 tolerance when it is no further from the float64 truth than
    twice the ``yardstick`` candidate's own (the reference backend in float32: session 11 found
    it 2.5e-3 from its float64 run through ISANet-R50 at 512x1024, over the tolerance)."""

    check_grads: bool = False
    yardstick: str | None = "reference"


def model_for(name: str, backend: str | None, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """``name`` with seeded weights (the same for every backend and dtype; see
    :func:`fastctx.models._init.randomize_for_parity`), training mode, dropout off."""
    key = (name, backend, dtype, str(device))
    if key not in _MODELS:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = M.build(name, NUM_CLASSES, backend=backend)
            randomize_for_parity(model)
        model.to(device, dtype).train()
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
        _MODELS[key] = model
    return _MODELS[key]


def _step(name: str, backend: str | None, img: Tensor, *params: Tensor) -> Tensor:
    model = model_for(name, backend, img.dtype, img.device)
    names = [n for n, _ in model.named_parameters()]
    out = functional_call(model, dict(zip(names, params, strict=True)), (img,))
    return torch.cat([v.flatten() for _, v in sorted(out.items())])


def model_cases(quick: bool, models: tuple[str, ...] = MODELS, size: tuple[int, int, int, int] = (2, 3, 128, 256)) -> list[Case]:
    """One case per model; ``models`` and ``size`` override the defaults (for the tests)."""
    return _cases(models, size, ("fused", "reference"), ("cpu", "cuda"))


#: mmsegmentation's Cityscapes configs, for a GPU: ResNet-50-D8 (OCRNet on HRNetV2-W48), B=2,
#: 512x1024 crops.
FULL_MODELS = ("ccnet_r50_d8", "isanet_r50_d8", "ann_r50_d8", "ocrnet_hr48", "isnet_r50_d8")


def full_model_cases(quick: bool, models: tuple[str, ...] = FULL_MODELS,
                     size: tuple[int, int, int, int] = (2, 3, 512, 1024)) -> list[Case]:
    """The mmseg-size training step (``fastctx bench --ops models_full --dtypes fp32``), CUDA
    only: "fused" (backend=None, what a user gets: the reference where the kernels measured
    slower), "triton" (every context op on the Triton kernels) and "reference". First run in
    session 11 (bench/results/h200-session11): ccnet and ann timed, the other three failed the
    plain float32 tolerance with the reference backend itself, hence the yardstick."""
    return _cases(models, size, ("fused", "triton", "reference"), ("cuda",))


def _cases(models, size, names, devices) -> list[Case]:
    backend = {"fused": None, "triton": "triton", "reference": "reference"}
    cases = []
    for name in models:
        def make(dtype, device, name=name):
            g = torch.Generator().manual_seed(0)
            img = torch.randn(size, generator=g)
            params = [p.detach() for p in model_for(name, None, torch.float32, torch.device("cpu")).parameters()]
            return (img.to(device, dtype), *(p.to(device, dtype) for p in params))

        cand = {c: (lambda img, *p, name=name, b=backend[c]: _step(name, b, img, *p)) for c in names}
        case_name = f"{name}-B{size[0]}-{size[2]}x{size[3]}"
        cases.append(
            ModelCase(
                op="models",
                name=case_name,
                config=dict(model=name, K=NUM_CLASSES, B=size[0], H=size[2], W=size[3], step="train fwd+bwd, all parameter grads",
                            truth="reference backend in float64", parity="logits only",
                            cpu_kernels_built=bool(_ext.available()[0])),
                make_inputs=make,
                truth=cand["reference"],
                candidates=cand,
                backends=(),  # backend=None may run the reference where no kernel runs: see config
                reference="reference",
                strongest="reference",
                targets=[],  # the issue asks for the numbers, and sets no target on them
                # float32 through a whole network: the reference backend itself lands ~1e-4 from
                # its float64 run (tests/test_models.py compares the backends in float64, tightly)
                tol_scale=10.0,
                devices=devices,
            )
        )
    return cases
