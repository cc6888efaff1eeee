"""Criss-cross attention: every backend that can run here against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import fastctx
import python_ref
from tests._utils import DTYPE_NAMES, allocations, assert_close, has_compiled, has_triton

CUDA = torch.cuda.is_available()
INTERPRETED = not CUDA  # Triton on CPU tensors, slow: keep its shapes small

# (backend, device, dtypes) that this machine can run; a missing build is a failure, not a skip,
# except for the CUDA ones, which need a GPU.
RUNS = [("reference", "cpu", (torch.float64, torch.float32, torch.bfloat16))]
RUNS.append(("cpu", "cpu", (torch.float64, torch.float32, torch.float16, torch.bfloat16)))
RUNS.append(("triton", "cuda" if CUDA else "cpu", (torch.float32, torch.float16, torch.bfloat16)))
if CUDA:
    RUNS.append(("cuda", "cuda", (torch.float64, torch.float32, torch.float16, torch.bfloat16)))
    RUNS.append(("reference", "cuda", (torch.float32,)))

# (B, Cqk, Cv, H, W): odd sizes, Cqk != Cv, a row, a column, a single pixel.
SHAPES = [
    (1, 3, 5, 1, 1),
    (2, 3, 5, 1, 7),
    (2, 3, 5, 7, 1),
    (2, 5, 7, 13, 9),
    (1, 8, 24, 17, 33),
]
LARGE = [(1, 8, 64, 33, 65), (1, 4, 6, 97, 97)]  # too slow for the Triton interpreter


def _id(shape):
    B, cq, cv, H, W = shape
    return f"B{B}-C{cq}x{cv}-{H}x{W}"


def _cases():
    for backend, device, dtypes in RUNS:
        shapes = SHAPES if (backend == "triton" and INTERPRETED) else SHAPES + LARGE
        for dtype in dtypes:
            for shape in shapes:
                if dtype in (torch.float16, torch.bfloat16) and shape in LARGE:
                    continue
                yield pytest.param(backend, device, dtype, shape, id=f"{backend}-{device}-{_id(shape)}-{DTYPE_NAMES[dtype]}")


def _inputs(shape, dtype, device, requires_grad=True):
    B, cq, cv, H, W = shape
    q = torch.randn(B, cq, H, W, dtype=dtype, device=device)
    k = torch.randn(B, cq, H, W, dtype=dtype, device=device)
    v = torch.randn(B, cv, H, W, dtype=dtype, device=device)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _reference(q, k, v, dout, scale):
    """float64 reference output and gradients on upcast copies of the inputs."""
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    out = python_ref.criss_cross_attention(q64, k64, v64, scale)
    out.backward(dout.double())
    return out, q64.grad, k64.grad, v64.grad


def _check_parity(backend, q, k, v, dtype, scale=1.0, dout_format=torch.contiguous_format):
    out = fastctx.criss_cross_attention(q, k, v, scale, backend=backend)
    assert fastctx.last_backend("criss_cross_attention") == backend
    assert out.dtype == dtype and out.shape == (q.shape[0], v.shape[1], *q.shape[2:])
    dout = torch.randn_like(out, memory_format=dout_format)
    out.backward(dout)
    ref = _reference(q, k, v, dout, scale)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), ref):
        assert_close(got, want, dtype, name)


@pytest.mark.parametrize("backend,device,dtype,shape", list(_cases()))
def test_parity(backend, device, dtype, shape):
    if (backend == "cpu" and not has_compiled("CPU")) or (backend == "cuda" and not has_compiled("CUDA")):
        pytest.fail(f"the {backend} backend is not built: run `make install`")
    if backend == "triton" and not has_triton():
        pytest.fail("triton is not usable here")
    q, k, v = _inputs(shape, dtype, device)
    _check_parity(backend, q, k, v, dtype, scale=0.7)


def _layout_cases():
    for backend, device, _ in RUNS:
        yield pytest.param(backend, device, id=f"{backend}-{device}")


@pytest.mark.parametrize("backend,device", list(_layout_cases()))
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_strided_inputs(backend, device, layout):
    B, cq, cv, H, W = 2, 5, 7, 9, 11
    if layout == "channels_last":
        q, k, v = (t.to(memory_format=torch.channels_last) for t in _inputs((B, cq, cv, H, W), torch.float32, device, False))
    else:  # every other channel and a cropped width: no dimension is contiguous as a whole
        q, k, v = (t[:, ::2, :, 1:-1] for t in _inputs((B, 2 * cq, 2 * cv, H, W + 2), torch.float32, device, False))
    assert not q.is_contiguous()
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    # a channels_last model gives a channels_last gradient of the output too
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    _check_parity(backend, q, k, v, torch.float32, dout_format=fmt)


# which of q, k, v, dout are channels-last: each alone, and all four
CL_WHICH = ["q", "k", "v", "dout", "qkvdout"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("which", CL_WHICH)
@pytest.mark.parametrize("shape", [(2, 5, 7, 13, 9), (1, 8, 24, 17, 33), (2, 3, 5, 1, 7), (1, 16, 9, 13, 97)], ids=_id)
def test_cpu_channels_last_read_in_place(dtype, which, shape):
    """Channels-last float32 / float64 q, k, v and dout are read in place by the CPU kernels (their
    rows and columns are strided matrices for the GEMMs): no copy of them is allocated (each
    q/k/v-sized tensor of a forward and backward is a gradient or the output), and the output and
    every gradient match the reference. Several tiles of 16 columns (W 33 and 97), a 1-row map."""
    q, k, v = _inputs(shape, dtype, "cpu", False)
    B, cq, cv, H, W = shape
    dout = torch.randn(B, cv, H, W, dtype=dtype)
    names = ("q", "k", "v", "dout")
    q, k, v, dout = (t.contiguous(memory_format=torch.channels_last) if n in which else t for n, t in zip(names, (q, k, v, dout)))
    for n, t in zip(names, (q, k, v, dout)):
        assert (n in which) == (not t.is_contiguous()), n
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    got = {}

    def fwd_bwd():
        got["out"] = fastctx.criss_cross_attention(q, k, v, 0.7, backend="cpu")
        got["grads"] = torch.autograd.grad(got["out"], (q, k, v), dout)

    sizes = allocations(fwd_bwd)
    assert fastctx.last_backend("criss_cross_attention") == "cpu"
    size = lambda c: B * c * H * W * q.element_size()  # noqa: E731
    assert sizes.count(size(cq)) == 2, sizes  # dq, dk
    assert sizes.count(size(cv)) == 2, sizes  # out, dv
    ref = _reference(q, k, v, dout, 0.7)
    for name, g, want in zip(("out", "dq", "dk", "dv"), (got["out"], *got["grads"]), ref):
        assert_close(g, want, dtype, name)


def test_cpu_image_groups():
    """The cpu backend takes several images at once when their energy rows fit its 8 MiB buffer:
    at 65x65 three (2.4 MB each), so B = 4 runs a group of three and a group of one."""
    q, k, v = _inputs((4, 3, 5, 65, 65), torch.float32, "cpu")
    _check_parity("cpu", q, k, v, torch.float32, scale=0.7)


@pytest.mark.parametrize("scale", [0.0, -1.3])
def test_cpu_scale_zero_and_negative(scale):
    """The own pixel's column entry is masked after scaling (0 * -inf would be NaN)."""
    q, k, v = _inputs((2, 3, 5, 13, 9), torch.float32, "cpu")
    _check_parity("cpu", q, k, v, torch.float32, scale=scale)


def test_gradcheck_cpu_float64():
    q, k, v = _inputs((2, 3, 4, 4, 5), torch.float64, "cpu")
    fn = lambda q, k, v: fastctx.criss_cross_attention(q, k, v, 0.9, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)
    cl = (t.detach().contiguous(memory_format=torch.channels_last) for t in (q, k, v))
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_(True) for t in cl), eps=1e-6, atol=1e-6)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gradcheck_cuda_float64():
    q, k, v = _inputs((2, 3, 4, 4, 5), torch.float64, "cuda")
    fn = lambda q, k, v: fastctx.criss_cross_attention(q, k, v, 0.9, backend="cuda")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", [(b, d) for b, d, _ in RUNS if b != "reference"])
def test_opcheck(backend, device):
    q, k, v = _inputs((2, 3, 5, 6, 7), torch.float32, device)
    torch.library.opcheck(torch.ops.fastctx.criss_cross_fwd.default, (q, k, v, 1.0, backend))


@pytest.mark.parametrize("backend,device", [(b, d) for b, d, _ in RUNS if b in ("cpu", "cuda")] )
def test_compile_fullgraph(backend, device):
    torch._dynamo.reset()

    def f(q, k, v):
        return fastctx.criss_cross_attention(q * 2, k, v, backend=backend).relu().sum()

    q, k, v = _inputs((2, 3, 5, 6, 7), torch.float32, device)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v)
    got.backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want = f(q, k, v)
    want.backward()
    assert_close(got, want.double(), torch.float32, "out")
    for name, g, t in zip(("dq", "dk", "dv"), grads, (q, k, v)):
        assert_close(g, t.grad.double(), torch.float32, name)


def test_compile_inductor_cpu():
    torch._dynamo.reset()
    q, k, v = _inputs((1, 4, 8, 5, 6), torch.float32, "cpu", False)
    f = torch.compile(lambda q, k, v: fastctx.criss_cross_attention(q, k, v, backend="cpu") + 1, fullgraph=True)
    assert_close(f(q, k, v), python_ref.criss_cross_attention(q.double(), k.double(), v.double()) + 1, torch.float32, "out")


def test_autocast_cpu_bf16():
    q, k, v = _inputs((1, 4, 8, 5, 6), torch.float32, "cpu", False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastctx.criss_cross_attention(q, k, v, backend="cpu")
    assert out.dtype == torch.bfloat16
    want = python_ref.criss_cross_attention(*(t.bfloat16().double() for t in (q, k, v)))
    assert_close(out, want, torch.bfloat16, "out")


def test_poison_is_active():
    # The conftest fixture must make uninitialised memory NaN, in Python and in C++ (at::empty).
    assert torch.isnan(torch.empty(16)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(3, 3))).all()
