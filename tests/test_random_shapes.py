"""Every op against the float64 reference on seeded random shapes: sizes on both sides of the
kernels' blocking thresholds, odd maps, channels-last and sliced inputs, output and every gradient.

- The CPU backend (float32, float64): vector widths 4 / 8, criss-cross's 16-column tiles, region
  attention's 96-pixel blocks and 256-long reduction chunks, spatial gather's 128-class chunks.
  The hand-picked shapes of each op's own tests missed one such combination until session 14 (a
  reduction over more than 256 channels or keys on a block whose last vector window overlapped
  the one before: wrong results); this sweep found it.
- The Triton backend (float32, float16): fewer cases, channels on both sides of its block sizes
  (16 to 128); under the interpreter (no GPU) small maps too.

The cases come from the test's torch seed (conftest: crc32 of the test id, xor FASTCTX_TEST_SEED),
so they are the same on every run and another FASTCTX_TEST_SEED draws others; a failure names its
case.
"""

from __future__ import annotations

import random

import pytest
import torch

import fastctx
from tests._utils import DTYPE_NAMES, assert_close, has_triton

CASES_PER_OP = 24
MAPS = (1, 2, 3, 5, 7, 8, 9, 13, 16, 17, 24, 31, 33, 47, 64, 65, 97)
CHANNELS = (1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 64, 65, 127, 128, 129, 255, 256, 257, 300, 513)
# the Triton kernels cost seconds a case under the interpreter (no GPU) and a compilation per new
# shape on a GPU: fewer cases, channels on both sides of their block sizes (16 to 128), and under
# the interpreter small maps
TRITON_CASES_PER_OP = 6
TRITON_MAPS = (1, 2, 3, 5, 7, 9, 13, 17)
TRITON_CHANNELS = (1, 3, 8, 15, 16, 17, 33, 64, 65, 129)
CUDA = torch.cuda.is_available()


def _layout(rng: random.Random, t: torch.Tensor) -> torch.Tensor:
    u = rng.random()
    if t.dim() == 4 and u < 0.15:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 4 and u < 0.25:
        return torch.cat([t, t], 1)[:, ::2]  # channel stride 2
    return t


def _case(op: str, rng: random.Random, dtype: torch.dtype, maps=MAPS, channels=CHANNELS):
    """(description, fn(inputs, backend) -> output(s), inputs) of one random case."""
    c = lambda: rng.choice(channels)  # noqa: E731
    m = lambda: rng.choice(maps)  # noqa: E731
    small = maps is TRITON_MAPS
    B = rng.choice((1, 2, 3))
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    if op == "criss_cross_attention":
        H, W, cq, cv, sc = m(), m(), c(), c(), rng.choice((1.0, 0.125, 0.0, -0.5))
        return (f"{B}x{H}x{W} Cqk {cq} Cv {cv} scale {sc}",
                lambda x, be: fastctx.criss_cross_attention(*x, sc, backend=be),
                [r(B, cq, H, W) * cq**-0.5, r(B, cq, H, W), r(B, cv, H, W)])
    if op == "interlaced_attention":
        bh, bw, mode = rng.choice((1, 2, 3, 4, 8, 13)), rng.choice((1, 2, 3, 4, 5, 8, 16)), rng.choice(("long", "short"))
        mult = (1, 2, 3) if small else (1, 2, 3, 8, 13)
        H, W, cq, cv = bh * rng.choice(mult), bw * rng.choice(mult), c(), c()
        return (f"{B}x{H}x{W} block {bh}x{bw} {mode} Cqk {cq} Cv {cv}",
                lambda x, be: fastctx.interlaced_attention(*x, block=(bh, bw), mode=mode, backend=be),
                [r(B, cq, H, W) * cq**-0.5, r(B, cq, H, W), r(B, cv, H, W)])
    if op == "pyramid_pool":
        H, W, C, scales = m(), m(), c(), rng.sample((1, 2, 3, 4, 6, 8, 11, 20), rng.choice((1, 2, 4)))
        return (f"{B}x{C}x{H}x{W} scales {scales}", lambda x, be: fastctx.pyramid_pool(*x, scales, backend=be),
                [r(B, C, H, W)])
    if op == "pyramid_attention":
        # key maps of one pixel make every pooled key the same: exact gradients of 0, which
        # float32 and float16 meet only to their rounding of 390-term sums; float64 takes them
        H, W, cq, cv = m(), m(), c(), c()
        Hk, Wk = m(), m()
        while dtype != torch.float64 and Hk * Wk < 4:
            Hk, Wk = m(), m()
        scales = rng.sample((1, 2, 3, 6, 8, 17), rng.choice((1, 2, 4)))
        return (f"{B}x{H}x{W} keys {Hk}x{Wk} scales {scales} Cqk {cq} Cv {cv}",
                lambda x, be: fastctx.pyramid_attention(*x, scales, backend=be),
                [r(B, cq, H, W) * cq**-0.5, r(B, cq, Hk, Wk), r(B, cv, Hk, Wk)])
    if op == "region_attention":
        H, W, cq, cv = m(), m(), c(), c()
        S = rng.choice((1, 2, 19, 33, 64, 65, 129) if small else (1, 2, 19, 33, 128, 150, 171, 256, 257, 300, 520))
        x = [r(B, cq, H, W) * cq**-0.5, r(B, cq, S), r(B, cv, S)]
        if rng.random() < 0.5:
            bias = r(B, S)
            bias[:, ::3] = float("-inf")
            x.append(bias)
        return (f"{B}x{H}x{W} S {S} Cqk {cq} Cv {cv} bias {len(x) > 3}",
                lambda x, be: fastctx.region_attention(*x[:3], bias=x[3] if len(x) > 3 else None, backend=be), x)
    if op == "spatial_gather":
        # one pixel: every class's weight is 1, exact dlogits of 0 (float64 only, as above)
        H, W, C, K, sc = m(), m(), c(), rng.choice((1, 2, 19, 127, 128, 129, 150, 171, 300)), rng.choice((1.0, 0.5))
        while dtype != torch.float64 and H * W < 2:
            H, W = m(), m()
        logits = r(B, K, H, W) * 3
        if rng.random() < 0.3:
            logits[:, 0] = float("-inf")
        return (f"{B}x{C}x{H}x{W} K {K} scale {sc}", lambda x, be: fastctx.spatial_gather(*x, sc, backend=be),
                [r(B, C, H, W), logits])
    H, W, C, K = m(), m(), c(), rng.choice((1, 2, 3, 19, 150))
    logits = r(B, K, H, W) * 3
    if rng.random() < 0.3:
        logits = logits.round()  # ties: the lowest class wins
    fn = fastctx.semantic_pool if op == "semantic_pool" else fastctx.semantic_pool_regions
    return (f"{B}x{C}x{H}x{W} K {K}", lambda x, be: fn(*x, backend=be), [r(B, C, H, W), logits])


OPS = ["criss_cross_attention", "interlaced_attention", "pyramid_pool", "pyramid_attention",
       "region_attention", "spatial_gather", "semantic_pool", "semantic_pool_regions"]


def _sweep(op, dtype, backend, device, cases, **sizes):
    rng = random.Random(int(torch.randint(2**62, ())))
    for i in range(cases):
        what, fn, inputs = _case(op, rng, dtype, **sizes)
        x = [_layout(rng, t.to(device, dtype)).requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(x, backend)
        outs = [o for o in (out if isinstance(out, tuple) else (out,))]
        assert fastctx.last_backend(op) == backend
        x64 = [t.detach().double().requires_grad_(True) for t in x]
        ref = fn(x64, "reference")
        refs = list(ref if isinstance(ref, tuple) else (ref,))
        floats = [j for j, o in enumerate(outs) if o.is_floating_point()]
        douts = [torch.randn_like(outs[j]) for j in floats]
        grads = torch.autograd.grad([outs[j] for j in floats], x, douts, allow_unused=True)
        grads64 = torch.autograd.grad([refs[j] for j in floats], x64, [d.double() for d in douts], allow_unused=True)
        name = f"case {i} ({what}, {DTYPE_NAMES[dtype]})"
        for j, (o, e) in enumerate(zip(outs, refs)):
            if o.is_floating_point():
                assert_close(o, e, dtype, f"{name}: output {j}")
            else:
                assert torch.equal(o, e), f"{name}: output {j} (integer) differs"
        for j, (a, e) in enumerate(zip(grads, grads64)):
            if e is None:
                assert a is None or not a.any(), f"{name}: gradient of input {j} should be zero"
            else:
                assert_close(a, e, dtype, f"{name}: gradient of input {j}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("op", OPS)
def test_cpu_random_shapes(op, dtype):
    _sweep(op, dtype, "cpu", "cpu", CASES_PER_OP)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("op", OPS)
def test_triton_random_shapes(op, dtype):
    if not has_triton():
        pytest.fail("triton is not usable here")
    if CUDA:  # every new shape compiles kernels: still few cases, on maps of every size
        _sweep(op, dtype, "triton", "cuda", 2 * TRITON_CASES_PER_OP, channels=TRITON_CHANNELS)
    else:
        _sweep(op, dtype, "triton", "cpu", TRITON_CASES_PER_OP, maps=TRITON_MAPS, channels=TRITON_CHANNELS)
