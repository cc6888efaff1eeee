"""pyramid_pool and pyramid_attention: every backend that can run here against the float64
reference, plus gradcheck, opcheck, compile and bad input."""

from __future__ import annotations

import pytest
import torch

import fastctx
import python_ref
from fastctx.ops import pyramid as pyr
from tests._utils import DTYPE_NAMES, assert_close, has_compiled, has_triton

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
F16 = (torch.float16, torch.bfloat16)
RUNS = [
    ("cpu", "cpu", (torch.float64, torch.float32, torch.float16, torch.bfloat16)),
    ("triton", DEV, (torch.float32, torch.float16, torch.bfloat16)),
]
BACKENDS = [(b, d) for b, d, _ in RUNS]

# pool: (B, C, H, W), scales. 10 on 7x5: a scale larger than the map; (3, 3): duplicates.
POOL = [
    ((2, 5, 7, 5), (1, 3, 6, 8)),
    ((2, 5, 7, 5), (1,)),
    ((2, 5, 7, 5), (2, 5)),
    ((1, 3, 7, 5), (10, 3, 3)),
    ((1, 3, 1, 1), (1, 3, 6, 8)),
    ((3, 20, 33, 17), (2, 5)),
]
POOL_LARGE = [((1, 3, 97, 97), (1, 3, 6, 8)), ((2, 13, 97, 97), (1, 3, 6, 8)), ((2, 7, 97, 97), (1,)), ((1, 7, 97, 97), (2, 5))]

# attention: (B, Cqk, Cv, Hq, Wq, H, W), scales. Hq x Wq != H x W: AFNB.
ATTN = [
    ((2, 3, 13, 7, 5, 7, 5), (1, 3, 6, 8)),
    ((1, 5, 7, 1, 1, 1, 1), (1,)),  # S = 1
    ((2, 20, 24, 9, 13, 33, 17), (2, 5)),
    ((1, 6, 5, 4, 3, 7, 5), (1, 3, 6, 8)),
]
ATTN_LARGE = [((1, 13, 24, 20, 11, 97, 97), (1, 3, 6, 8))]


def _interp(backend):
    return backend == "triton" and not CUDA


def _need(backend):
    if backend == "triton" and not has_triton():
        pytest.fail("triton is not usable here")
    if backend == "cpu" and not has_compiled("CPU"):
        pytest.fail("the compiled extension is not built")


def _pool_cases():
    for backend, device, dtypes in RUNS:
        for dtype in dtypes:
            shapes = POOL if dtype in F16 else POOL + POOL_LARGE[: 1 if _interp(backend) else None]
            for shape, scales in shapes:
                sid = "x".join(map(str, shape[2:]))
                yield pytest.param(backend, device, dtype, shape, scales,
                                   id=f"{backend}-B{shape[0]}-C{shape[1]}-{sid}-s{'_'.join(map(str, scales))}-{DTYPE_NAMES[dtype]}")


def _attn_cases():
    for backend, device, dtypes in RUNS:
        for dtype in dtypes:
            if _interp(backend):  # the interpreter is slow: the 16-bit types on two shapes
                shapes = ATTN[1:3] if dtype in F16 else ATTN
            else:
                shapes = ATTN if dtype in F16 else ATTN + ATTN_LARGE
            for shape, scales in shapes:
                B, cq, cv, hq, wq, h, w = shape
                yield pytest.param(backend, device, dtype, shape, scales,
                                   id=f"{backend}-B{B}-C{cq}x{cv}-q{hq}x{wq}-kv{h}x{w}-s{'_'.join(map(str, scales))}-{DTYPE_NAMES[dtype]}")


def _check_pool(backend, x, scales):
    """pyramid_pool on ``backend`` (x: a leaf) against the float64 reference: out and dx for one
    random dout."""
    dtype, shape = x.dtype, x.shape
    out = fastctx.pyramid_pool(x, scales, backend=backend)
    assert fastctx.last_backend("pyramid_pool") == backend
    assert out.dtype == dtype and out.shape == (shape[0], shape[1], sum(s * s for s in scales))
    dout = torch.randn_like(out)
    out.backward(dout)
    x64 = x.detach().double().requires_grad_(True)
    ref = python_ref.pyramid_pool(x64, scales)
    ref.backward(dout.double())
    assert_close(out, ref, dtype, "out")
    assert_close(x.grad, x64.grad, dtype, "dx")


@pytest.mark.parametrize("backend,device,dtype,shape,scales", list(_pool_cases()))
def test_pool_parity(backend, device, dtype, shape, scales):
    _need(backend)
    _check_pool(backend, torch.randn(*shape, dtype=dtype, device=device, requires_grad=True), scales)


@pytest.mark.parametrize("backend,device,dtype,shape,scales", list(_attn_cases()))
def test_attention_parity(backend, device, dtype, shape, scales):
    _need(backend)
    B, cq, cv, hq, wq, h, w = shape
    q = torch.randn(B, cq, hq, wq, dtype=dtype, device=device).mul_(cq**-0.25).requires_grad_(True)
    k = torch.randn(B, cq, h, w, dtype=dtype, device=device).mul_(cq**0.25).requires_grad_(True)
    v = torch.randn(B, cv, h, w, dtype=dtype, device=device, requires_grad=True)
    out = fastctx.pyramid_attention(q, k, v, scales, 0.7, backend=backend)
    assert fastctx.last_backend("pyramid_attention") == backend
    assert out.dtype == dtype and out.shape == (B, cv, hq, wq)
    dout = torch.randn_like(out)
    out.backward(dout)
    l64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = python_ref.pyramid_attention(*l64, scales, 0.7)
    ref.backward(dout.double())
    assert_close(out, ref, dtype, "out")
    for name, t, t64 in zip(("dq", "dk", "dv"), (q, k, v), l64):
        assert_close(t.grad, t64.grad, dtype, name)


def _strided(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "channels_last":
        return x.to(memory_format=torch.channels_last)
    if kind == "sliced":  # every other channel, a column window: stride-1 columns, odd strides
        return x[:, ::2, :, 1:-1]
    return x.transpose(2, 3)  # columns at a large stride


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["channels_last", "sliced", "transposed"])
def test_strided_inputs(backend, device, kind):
    _need(backend)
    x = _strided(torch.randn(2, 37, 9, 13, device=device), kind).requires_grad_(True)  # 37: 16 + 16 + 5
    assert not x.is_contiguous()
    out = fastctx.pyramid_pool(x, (1, 3, 6, 8), backend=backend)
    out.backward(torch.ones_like(out))
    x64 = x.detach().double().requires_grad_(True)
    python_ref.pyramid_pool(x64, (1, 3, 6, 8)).sum().backward()
    assert_close(out, python_ref.pyramid_pool(x64.detach(), (1, 3, 6, 8)), torch.float32, "out")
    assert_close(x.grad, x64.grad, torch.float32, "dx")

    q = _strided(torch.randn(2, 8, 7, 6, device=device), kind).requires_grad_(True)
    k = _strided(torch.randn(2, 8, 9, 13, device=device), kind).requires_grad_(True)
    v = _strided(torch.randn(2, 10, 9, 13, device=device), kind).requires_grad_(True)
    out = fastctx.pyramid_attention(q, k, v, (2, 3), backend=backend)
    dout = torch.randn_like(out)
    out.backward(dout)
    l64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = python_ref.pyramid_attention(*l64, (2, 3))
    ref.backward(dout.double())
    assert_close(out, ref, torch.float32, "out")
    for name, t, t64 in zip(("dq", "dk", "dv"), (q, k, v), l64):
        assert_close(t.grad, t64.grad, torch.float32, name)


@pytest.mark.parametrize("backend,device,dtype", [(b, d, t) for b, d, ts in RUNS for t in ts])
def test_pool_channels_last_every_dtype(backend, device, dtype):
    _need(backend)
    x = torch.randn(2, 21, 11, 6, dtype=dtype, device=device).to(memory_format=torch.channels_last)
    assert_close(fastctx.pyramid_pool(x, (1, 3, 6, 8), backend=backend),
                 python_ref.pyramid_pool(x.double(), (1, 3, 6, 8)), dtype, "out")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("shape,scales", [((2, 77, 13, 11), (1, 3, 6, 8)), ((1, 130, 7, 5), (10, 3, 3)),
                                          ((1, 64, 1, 9), (2, 5))])
def test_cpu_pool_channels_last_wide(shape, scales, dtype):
    """The cpu kernel's channels-last forward (an image and 64 channels at a time, a row's
    column-bin sums first): full chunks of 64 and a tail (77 = 64 + 13, 130 = 2 x 64 + 2, 64
    alone), overlapping bins (a scale larger than the map, duplicate scales), one map row."""
    _need("cpu")
    x = torch.randn(*shape, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_(True)
    assert not x.is_contiguous()
    _check_pool("cpu", x, scales)


def test_gradcheck_cpu_float64():
    _need("cpu")
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    pool = lambda x: fastctx.pyramid_pool(x, (1, 2, 3), backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(pool, (x,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(pool, (x,), eps=1e-6, atol=1e-6)
    q = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    attn = lambda q, k, v: fastctx.pyramid_attention(q, k, v, (1, 3), 0.9, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(attn, (q, k, v), eps=1e-6, atol=1e-6)


def test_compiled_ops_check_their_arguments():
    """The C++ ops refuse what the Python layer never passes them, with the op's name."""
    _need("cpu")
    x = torch.randn(1, 2, 5, 4)
    for fn, pattern in [
        (lambda: torch.ops.fastctx.pp_fwd(x, []), "scales must not be empty"),
        (lambda: torch.ops.fastctx.pp_fwd(x, [2, 0]), "scales must be positive"),
        (lambda: torch.ops.fastctx.pp_fwd(x[0], [2]), r"x must be 4-D \[B, C, H, W\]"),
        (lambda: torch.ops.fastctx.pp_bwd(torch.randn(1, 2, 9), [1, 3], 5, 4), "dout must be \\[B, C, S\\] with S = 10"),
        (lambda: torch.ops.fastctx.pp_bwd(torch.randn(1, 2, 1), [1], 0, 4), "the map must not be empty"),
    ]:
        with pytest.raises(RuntimeError, match=pattern) as info:
            fn()
        assert "fastctx.pyramid_pool" in str(info.value)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_pool_double_backward(backend, device):
    """The backward's own backward (the forward) against the reference's."""
    _need(backend)
    x = torch.randn(2, 5, 9, 7, device=device, requires_grad=True)
    dout = torch.randn(2, 5, 29, device=device, requires_grad=True)
    (dx,) = torch.autograd.grad(fastctx.pyramid_pool(x, (2, 5), backend=backend), x, dout, create_graph=True)
    w = torch.randn_like(dx)
    (ddout,) = torch.autograd.grad(dx, dout, w)
    assert_close(ddout, python_ref.pyramid_pool(w.double(), (2, 5)), torch.float32, "ddout")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpu_is_deterministic(layout):
    _need("cpu")
    x = torch.randn(3, 80, 33, 65)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            out = fastctx.pyramid_pool(x, (1, 3, 6, 8), backend="cpu")
            results.append((out, *torch.autograd.grad(out, x, torch.ones_like(out))))
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


def test_forced_pixel_groups_triton():
    """The Triton forward's split over pixel groups (float32 partials, then a sum) and its direct
    store (one group) agree with the reference."""
    _need("triton")
    from fastctx.triton.pyramid_pool import pp_fwd

    x = torch.randn(2, 19, 41, 37, device=DEV)
    ref = python_ref.pyramid_pool(x.double(), (1, 3, 6, 8))
    for groups in (1, 2, 3):
        assert_close(pp_fwd(x, [1, 3, 6, 8], n_groups=groups), ref, torch.float32, f"out (groups={groups})")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_named_backend_runs_both_parts(backend, device, monkeypatch):
    """pyramid_attention(backend=X) pools and attends with X: no part falls back."""
    _need(backend)
    from fastctx.ops import ocr

    seen = []
    pp_kernels, ra_kernels = pyr._pp_kernels, ocr._ra_kernels
    monkeypatch.setattr(pyr, "_pp_kernels", lambda b: (seen.append(("pool", b)), pp_kernels(b))[1])
    monkeypatch.setattr(ocr, "_ra_kernels", lambda b: (seen.append(("attn", b)), ra_kernels(b))[1])
    q = torch.randn(1, 4, 3, 5, device=device, requires_grad=True)
    k = torch.randn(1, 4, 6, 7, device=device, requires_grad=True)
    v = torch.randn(1, 5, 6, 7, device=device, requires_grad=True)
    fastctx.pyramid_attention(q, k, v, (1, 2), backend=backend).sum().backward()
    assert sorted(set(seen)) == [("attn", backend), ("pool", backend)]
    assert len(seen) == 6  # pool k, pool v, attention; and their three backwards


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    _need(backend)
    x = torch.randn(2, 3, 7, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastctx.pyramid_pool_fwd.default, (x, [1, 3, 6, 8], backend))
    dout = torch.randn(2, 3, 110, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastctx.pyramid_pool_bwd.default, (dout, [1, 3, 6, 8], 7, 5, backend))


def test_compile_fullgraph_cpu():
    _need("cpu")
    torch._dynamo.reset()
    q = torch.randn(2, 4, 5, 6, requires_grad=True)
    k = torch.randn(2, 4, 9, 7, requires_grad=True)
    v = torch.randn(2, 8, 9, 7, requires_grad=True)

    def f(q, k, v):
        pooled = fastctx.pyramid_pool(k * 2, (1, 3), backend="cpu")
        out = fastctx.pyramid_attention(q, k, v, (1, 3, 6), backend="cpu")
        return out.tanh().sum() + pooled.square().sum()

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    g = torch.autograd.grad(got, (q, k, v))
    want = f(q, k, v)
    w = torch.autograd.grad(want, (q, k, v))
    assert_close(got, want.double(), torch.float32, "out")
    for name, a, b in zip(("dq", "dk", "dv"), g, w):
        assert_close(a, b.double(), torch.float32, name)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
r = torch.randn
_nan = r(1, 4, 8, 8)
_nan[0, 1, 2, 3] = float("nan")

BAD = {
    "pool-scale-zero": (lambda b: fastctx.pyramid_pool(r(1, 4, 8, 8), (1, 0), backend=b), ValueError, r"pyramid_pool: pool_scales must be a non-empty sequence of positive ints, got \(1, 0\)"),
    "pool-scale-negative": (lambda b: fastctx.pyramid_pool(r(1, 4, 8, 8), [-2], backend=b), ValueError, "pool_scales must be a non-empty sequence of positive ints"),
    "pool-scales-empty": (lambda b: fastctx.pyramid_pool(r(1, 4, 8, 8), (), backend=b), ValueError, r"pool_scales must be a non-empty sequence of positive ints, got \(\)"),
    "pool-scale-float": (lambda b: fastctx.pyramid_pool(r(1, 4, 8, 8), (1, 2.0), backend=b), ValueError, "pool_scales must be a non-empty sequence of positive ints"),
    "pool-scale-bool": (lambda b: fastctx.pyramid_pool(r(1, 4, 8, 8), (True,), backend=b), ValueError, "pool_scales must be a non-empty sequence of positive ints"),
    "pool-scales-int": (lambda b: fastctx.pyramid_pool(r(1, 4, 8, 8), 3, backend=b), ValueError, "pool_scales must be a non-empty sequence of positive ints, got 3"),
    "pool-rank": (lambda b: fastctx.pyramid_pool(r(4, 8, 8), backend=b), ValueError, r"pyramid_pool: x must be a 4-D tensor \[B, C, H, W\], got shape \(4, 8, 8\)"),
    "pool-empty": (lambda b: fastctx.pyramid_pool(r(1, 4, 0, 8), backend=b), ValueError, r"pyramid_pool: x is empty \(shape \(1, 4, 0, 8\)\)"),
    "pool-int": (lambda b: fastctx.pyramid_pool(torch.ones(1, 4, 8, 8, dtype=torch.int64), backend=b), TypeError, "x must be float16, bfloat16, float32 or float64"),
    "pool-nan": (lambda b: fastctx.pyramid_pool(_nan, backend=b), ValueError, r"pyramid_pool: x \(shape \(1, 4, 8, 8\)\) contains NaN"),
    "pa-rank": (lambda b: fastctx.pyramid_attention(r(1, 4, 3), r(1, 4, 8, 8), r(1, 6, 8, 8), backend=b), ValueError, r"pyramid_attention: q must be a 4-D tensor \[B, Cqk, Hq, Wq\], got shape \(1, 4, 3\)"),
    "pa-channels": (lambda b: fastctx.pyramid_attention(r(1, 4, 3, 3), r(1, 5, 8, 8), r(1, 6, 8, 8), backend=b), ValueError, r"q and k must agree in batch and channels, got q \(1, 4, 3, 3\) and k \(1, 5, 8, 8\)"),
    "pa-batch": (lambda b: fastctx.pyramid_attention(r(2, 4, 3, 3), r(1, 4, 8, 8), r(1, 6, 8, 8), backend=b), ValueError, r"q and k must agree in batch and channels, got q \(2, 4, 3, 3\)"),
    "pa-v": (lambda b: fastctx.pyramid_attention(r(1, 4, 3, 3), r(1, 4, 8, 8), r(1, 6, 8, 7), backend=b), ValueError, r"v must match k in batch and spatial size, got k \(1, 4, 8, 8\) and v \(1, 6, 8, 7\)"),
    "pa-empty": (lambda b: fastctx.pyramid_attention(r(1, 4, 3, 3), r(1, 4, 8, 8), r(1, 0, 8, 8), backend=b), ValueError, r"pyramid_attention: v is empty \(shape \(1, 0, 8, 8\)\)"),
    "pa-dtype": (lambda b: fastctx.pyramid_attention(r(1, 4, 3, 3), r(1, 4, 8, 8).double(), r(1, 6, 8, 8), backend=b), TypeError, "k is torch.float64 but q is torch.float32"),
    "pa-scales": (lambda b: fastctx.pyramid_attention(r(1, 4, 3, 3), r(1, 4, 8, 8), r(1, 6, 8, 8), (0,), backend=b), ValueError, "pyramid_attention: pool_scales must be a non-empty sequence of positive ints"),
    "pa-scale": (lambda b: fastctx.pyramid_attention(r(1, 4, 3, 3), r(1, 4, 8, 8), r(1, 6, 8, 8), scale=float("inf"), backend=b), ValueError, "pyramid_attention: scale must be finite"),
    "pa-nan": (lambda b: fastctx.pyramid_attention(r(1, 4, 3, 3), _nan, r(1, 6, 8, 8), backend=b), ValueError, r"pyramid_attention: k \(shape \(1, 4, 8, 8\)\) contains NaN"),
}


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, backend):
    fn, exc, pattern = BAD[case]
    with pytest.raises(exc, match=pattern) as info:
        fn(backend)
    assert str(info.value).startswith("fastctx.")


def test_named_backend_never_falls_back():
    x = r(1, 4, 8, 8)
    with pytest.raises(fastctx.BackendUnavailableError, match="pyramid_pool: backend 'cuda' cannot run"):
        fastctx.pyramid_pool(x, backend="cuda")
    with pytest.raises(fastctx.BackendUnavailableError, match="pyramid_attention: backend 'triton' cannot run.*float64"):
        fastctx.pyramid_attention(x.double(), x.double(), x.double(), backend="triton")
