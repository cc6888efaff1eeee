"""Benchmark cases of ISNet's semantic-level context: the exact reduction against the dense one.

Two ops, each with the candidates "reduced" (fastctx) and "dense" (sssegmentation's ``N x N``
formulation, re-implemented here with the SAME module's weights):

* ``isnet_semantic_attention`` -- the semantic-level attention alone, given the query
  (``query_project(x)``, an input here): pooling, key/value projections and the attention, up to
  ``out_project``. Reduced: :func:`fastctx.semantic_pool_regions`, the key/value projections on the
  K class vectors (count-weighted BatchNorm), :func:`fastctx.region_attention` with
  ``bias = log(counts)``. Dense: :func:`fastctx.semantic_pool` (the same fused pooling, so the
  ratio is the reduction's alone, not the pooling loop's), the projections on the full pooled map,
  ``softmax(q^T k * scale) v`` over all ``N = H * W`` pixels. The issue's targets (reduced at
  least 20x faster and at least 20x less peak memory at 64x128) apply to this op.
* ``isnet_semantic_context`` -- the whole :class:`fastctx.nn.SemanticLevelContext` (query
  projection, out projection and the 3x3 bottleneck included) against the same dense attention
  inside the module's other layers. Reported, no target. Its parity check compares the output
  only: the input gradients go through training-mode BatchNorm + ReLU layers, where float32
  rounding flips a few pre-activations near zero across the ReLU's kink against the float64
  truth (measured at 64x128: 15k of 8.4M elements of d x differ, up to 0.32, for the reduced
  candidate, 94k up to 2.6 for the dense one; at 32x64 the dense one fails and with the ReLUs
  replaced by the identity both pass); tests/test_bench_cases_modules.py compares both
  candidates' gradients in float64, and tests/test_nn_isnet.py the module's against
  sssegmentation's.

ISNet's configuration: feats 512, transform 256, ``concat_input``, BatchNorm + ReLU, training
mode (batch statistics: the count-weighted BatchNorm path), K=19, B=2. Sizes: 64x128 (1/8 of a
512x1024 training crop) and, outside ``--quick``, 128x256 (1/8 of 1024x2048 inference:
N = 32768).

Truth: the reduced formulation run in float64 (the dense one needs ``B * N^2`` floats; the two are
shown equal in float64 by tests/test_nn_isnet.py, and the dense candidate's own parity check here
checks it again at the benchmark size wherever it runs).

Too large for the machine: before allocating anything the dense candidate estimates its peak
(``DENSE_COPIES`` ``[B, N, N]`` matrices: the scores, their softmax kept for the backward, and
the two gradients of the backward; measured at 64x128: 3.3 of them at the forward+backward's
peak, 2.2 at the forward's) and its work (the two ``N x N`` matmuls, times 3 with the
backward); above :func:`fastctx.bench.measure.memory_cap_bytes` (half the available memory, or
``FASTCTX_BENCH_MEM_CAP_GIB``), or on CPU above ``FASTCTX_BENCH_CPU_MAX_TFLOP`` (default 2 TFLOP
per call: the runner makes ~20 calls per candidate), it raises
:class:`fastctx.bench.measure.Skip` and the report says ``skipped: dense would need ...``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import fastctx
from fastctx.bench.cases import Case, Target
from fastctx.bench.measure import Skip, memory_cap_bytes
from fastctx.nn.isnet import SemanticLevelContext, _project_counted

FEATS, TRANSFORM, K = 512, 256, 19
DENSE_COPIES = 4  # [B, N, N] matrices alive at the peak of the dense forward+backward
_MODULES: dict[tuple, SemanticLevelContext] = {}


@dataclass
class OutputParityCase(Case):
    """A Case whose runner parity check compares the output only (the whole module, below)."""

    check_grads: bool = False


def isnet_module(dtype: torch.dtype, device: torch.device, feats: int = FEATS, transform: int = TRANSFORM) -> SemanticLevelContext:
    """ISNet's SemanticLevelContext (training mode), the same weights for every dtype (seeded)."""
    key = (dtype, str(device), feats, transform)
    if key not in _MODULES:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            m = SemanticLevelContext(
                feats, transform, concat_input=True, norm_cfg={"type": "BatchNorm2d"}, act_cfg={"type": "ReLU", "inplace": True}
            )
            for b in m.modules():
                if isinstance(b, torch.nn.BatchNorm2d):
                    b.weight.data.uniform_(0.5, 1.5)
                    b.bias.data.uniform_(-0.2, 0.2)
        _MODULES[key] = m.to(device, dtype).train()
    return _MODULES[key]


def dense_guard(B: int, N: int, dtype: torch.dtype, device: torch.device, transform: int) -> None:
    """Raise :class:`Skip` when the dense attention would not fit (see the module docstring)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = DENSE_COPIES * B * N * N * itemsize
    cap = memory_cap_bytes(device)
    tflop = 3 * 2 * (2 * B * N * N * transform) / 1e12  # fwd: two matmuls; bwd: twice that
    max_tflop = float(os.environ.get("FASTCTX_BENCH_CPU_MAX_TFLOP", "2"))
    why = []
    if need > cap:
        why.append(f"would need {need / 2**30:.1f} GiB for its {B}x{N}x{N} attention matrices (cap {cap / 2**30:.1f} GiB)")
    if device.type == "cpu" and tflop > max_tflop:
        why.append(f"would do {tflop:.1f} TFLOP per forward+backward (cap {max_tflop:g} TFLOP on CPU)")
    if why:
        raise Skip("dense " + " and ".join(why))


def reduced_attention(m: SemanticLevelContext, x: Tensor, preds: Tensor, query: Tensor) -> Tensor:
    """SemanticLevelContext's attention up to ``out_project``, given the query (BatchNorm norms)."""
    net = m.correlate_net
    regions, counts, labels = fastctx.semantic_pool_regions(x, preds, backend=m.backend)
    w = counts.to(regions.dtype).unsqueeze(1)
    key = _project_counted(net.key_project, regions, w, labels.numel())
    value = _project_counted(net.value_project, regions, w, labels.numel())
    bias = counts.to(query.dtype).log()
    return fastctx.region_attention(query, key, value, scale=net.transform_channels**-0.5, bias=bias, backend=m.backend)


def dense_attention(m: SemanticLevelContext, x: Tensor, preds: Tensor, query: Tensor) -> Tensor:
    """sssegmentation's ``SelfAttentionBlock`` attention on the pooled map: ``N x N`` scores."""
    net = m.correlate_net
    B, _, H, W = x.shape
    dense_guard(B, H * W, query.dtype, query.device, net.transform_channels)
    pooled = fastctx.semantic_pool(x, preds, backend=m.backend)
    key = net.key_project(pooled).flatten(2)  # [B, Ct, N]
    value = net.value_project(pooled).flatten(2)
    sim = torch.matmul(query.flatten(2).transpose(1, 2), key) * net.transform_channels**-0.5  # [B, N, N]
    ctx = torch.matmul(F.softmax(sim, dim=-1), value.transpose(1, 2))  # [B, N, Ct]
    return ctx.transpose(1, 2).reshape(B, -1, H, W)


def dense_module(m: SemanticLevelContext, x: Tensor, preds: Tensor, feats_il: Tensor) -> Tensor:
    """SemanticLevelContext's forward with the dense attention."""
    net = m.correlate_net
    dense_guard(x.shape[0], x.shape[2] * x.shape[3], x.dtype, x.device, net.transform_channels)  # before the query
    context = net.out_project(dense_attention(m, x, preds, net.query_project(x)))
    return m.bottleneck(torch.cat([feats_il, context], dim=1))


def _inputs(B: int, C: int, Ct: int, H: int, W: int, with_query: bool):
    def make(dtype: torch.dtype, device: torch.device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, C, H, W, generator=g)
        preds = torch.randn(B, K, H, W, generator=g) * 2
        third = torch.randn(B, Ct, H, W, generator=g).relu() if with_query else torch.randn(B, C, H, W, generator=g)
        return tuple(t.to(device, dtype) for t in (x, preds, third))

    return make


def isnet_attention_cases(quick: bool, sizes: tuple[tuple[int, int], ...] | None = None,
                          feats: int = FEATS, transform: int = TRANSFORM) -> list[Case]:
    """``isnet_semantic_attention``: reduced vs dense, given the query. ``sizes``/``feats``/
    ``transform`` override ISNet's (for the tests)."""
    return _cases("attention", quick, sizes, feats, transform)


def isnet_module_cases(quick: bool, sizes: tuple[tuple[int, int], ...] | None = None,
                       feats: int = FEATS, transform: int = TRANSFORM) -> list[Case]:
    """``isnet_semantic_context``: the whole SemanticLevelContext, reduced vs dense."""
    return _cases("module", quick, sizes, feats, transform)


def _cases(part: str, quick: bool, sizes, feats: int, transform: int) -> list[Case]:
    def mod(x: Tensor) -> SemanticLevelContext:
        return isnet_module(x.dtype, x.device, feats, transform)

    if sizes is None:
        sizes = ((64, 128),) if quick else ((64, 128), (128, 256))
    B = 2
    cases = []
    for H, W in sizes:
        name = f"B{B}-C{feats}-T{transform}-K{K}-{H}x{W}"
        if part == "attention":
            cand = {
                "reduced": lambda x, p, q: reduced_attention(mod(x), x, p, q),
                "dense": lambda x, p, q: dense_attention(mod(x), x, p, q),
            }
            truth = cand["reduced"]
            op = "isnet_semantic_attention"
        else:
            cand = {
                "reduced": lambda x, p, f: mod(x)(x, p, f),
                "dense": lambda x, p, f: dense_module(mod(x), x, p, f),
            }
            truth = cand["reduced"]
            op = "isnet_semantic_context"
        targets = []
        if part == "attention" and (H, W) == (64, 128) and (feats, transform) == (FEATS, TRANSFORM):
            for mode in ("fwd", "fwd+bwd"):
                targets += [
                    Target(f"reduced semantic-level attention at least 20x faster than dense, {mode}, {name}", "reduced", "dense", mode, "speed", 20.0, "cpu", (torch.float32,)),
                    Target(f"reduced semantic-level attention at most 1/20 of dense's peak memory, {mode}, {name}", "reduced", "dense", mode, "memory", 0.05, "cpu", (torch.float32,)),
                ]
        cases.append(
            (Case if part == "attention" else OutputParityCase)(
                op=op,
                name=name,
                config=dict(B=B, C=feats, transform=transform, K=K, H=H, W=W, N=H * W, mode="train", truth="reduced in float64",
                            parity="output and input gradients" if part == "attention" else "output only"),
                make_inputs=_inputs(B, feats, transform, H, W, with_query=part == "attention"),
                truth=truth,
                candidates=cand,
                backends=(),  # fastctx backends run inside both candidates (backend=None)
                reference="dense",
                strongest="dense",
                targets=targets,
            )
        )
    return cases
