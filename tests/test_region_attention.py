"""region_attention: every backend that can run here against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import fastctx
import python_ref
from tests._utils import DTYPE_NAMES, allocations, assert_close, has_triton

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
RUNS = [
    ("cpu", "cpu", (torch.float64, torch.float32, torch.float16, torch.bfloat16)),
    ("triton", DEV, (torch.float32, torch.float16, torch.bfloat16)),
]
if CUDA:  # the CUDA C++ kernels (csrc/cuda/region_attention.cu): only where a GPU is
    RUNS.append(("cuda", "cuda", (torch.float64, torch.float32, torch.float16, torch.bfloat16)))

# (B, Cqk, Cv, H, W, S)
SHAPES = [(1, 3, 5, 1, 1, 1), (2, 3, 13, 7, 5, 19), (2, 20, 24, 13, 9, 40), (1, 13, 3, 5, 7, 171)]
LARGE = [(2, 64, 96, 33, 65, 150)]
# bias: None, finite, some keys masked, one image with every key masked
BIASES = ["none", "finite", "masked", "all-masked"]


def _id(s):
    B, cq, cv, H, W, S = s
    return f"B{B}-C{cq}x{cv}-{H}x{W}-S{S}"


def _cases():
    for backend, device, dtypes in RUNS:
        interp = backend == "triton" and not CUDA
        for dtype in dtypes:
            for shape in SHAPES + ([] if interp or dtype in (torch.float16, torch.bfloat16) else LARGE):
                for bias in BIASES if dtype == torch.float32 else ["masked"]:
                    yield pytest.param(backend, device, dtype, shape, bias, id=f"{backend}-{_id(shape)}-{DTYPE_NAMES[dtype]}-bias_{bias}")


def _make_bias(kind, B, S, dtype, device):
    if kind == "none":
        return None
    b = torch.randn(B, S, dtype=dtype, device=device)
    if kind in ("masked", "all-masked") and S > 1:
        b[:, ::3] = float("-inf")
    if kind == "all-masked":
        b[0] = float("-inf")
    return b.requires_grad_(True)


@pytest.mark.parametrize("backend,device,dtype,shape,bias_kind", list(_cases()))
def test_parity(backend, device, dtype, shape, bias_kind):
    if backend == "triton" and not has_triton():
        pytest.fail("triton is not usable here")
    B, cq, cv, H, W, S = shape
    q = torch.randn(B, cq, H, W, dtype=dtype, device=device).mul_(cq**-0.25).requires_grad_(True)
    k = torch.randn(B, cq, S, dtype=dtype, device=device).mul_(cq**-0.25).requires_grad_(True)
    v = torch.randn(B, cv, S, dtype=dtype, device=device, requires_grad=True)
    bias = _make_bias(bias_kind, B, S, dtype, device)
    out = fastctx.region_attention(q, k, v, 0.8, bias, backend=backend)
    assert fastctx.last_backend("region_attention") == backend
    dout = torch.randn_like(out)
    out.backward(dout)
    leaves = [q, k, v] + ([bias] if bias is not None else [])
    l64 = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = python_ref.region_attention(l64[0], l64[1], l64[2], 0.8, l64[3] if bias is not None else None)
    ref.backward(dout.double())
    assert_close(out, ref, dtype, "out")
    for name, t, t64 in zip(("dq", "dk", "dv", "dbias"), leaves, l64):
        assert_close(t.grad, t64.grad, dtype, name)
    if bias_kind == "all-masked":
        assert (out[0] == 0).all() and (q.grad[0] == 0).all()


@pytest.mark.parametrize("backend,device", [(b, d) for b, d, _ in RUNS])
def test_strided_pixels(backend, device):
    q = torch.randn(2, 12, 9, 11, device=device).to(memory_format=torch.channels_last)[:, ::2].requires_grad_(True)
    k = torch.randn(2, 6, 7, device=device, requires_grad=True)
    v = torch.randn(2, 5, 7, device=device, requires_grad=True)
    out = fastctx.region_attention(q, k, v, backend=backend)
    dout = torch.randn_like(out).contiguous(memory_format=torch.channels_last)
    out.backward(dout)
    l64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = python_ref.region_attention(*l64)
    ref.backward(dout.double())
    assert_close(out, ref, torch.float32, "out")
    for name, t, t64 in zip(("dq", "dk", "dv"), (q, k, v), l64):
        assert_close(t.grad, t64.grad, torch.float32, name)


# (B, Cqk, Cv, H, W, S): channels and pixel blocks with and without tails of the 8 x 8 transposes;
# weights recomputed (S < 32) and kept; several pixel blocks, the last one merged
CL_SHAPES = [(2, 13, 9, 7, 11, 19), (2, 20, 24, 13, 9, 40), (1, 64, 16, 16, 16, 19), (1, 17, 5, 33, 65, 33)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("which", ["q", "dout", "both"])
@pytest.mark.parametrize("shape", CL_SHAPES, ids=_id)
def test_cpu_channels_last_read_in_place(dtype, which, shape):
    """A channels-last float32 / float64 q, and gradient of the output, are read as they are: the
    CPU kernels transpose each pixel block's columns themselves (pack_map), so the one q-sized
    tensor of a forward and backward is dq and the one out-sized tensor is out (before: a
    transposed copy of each in each pass too), and the output and every gradient match the
    reference."""
    B, cq, cv, H, W, S = shape
    q = torch.randn(B, cq, H, W, dtype=dtype)
    dout = torch.randn(B, cv, H, W, dtype=dtype)
    if which in ("q", "both"):
        q = q.contiguous(memory_format=torch.channels_last)
    if which in ("dout", "both"):
        dout = dout.contiguous(memory_format=torch.channels_last)
    for name, t in (("q", q), ("dout", dout)):
        assert (which in (name, "both")) == (not t.is_contiguous()), name
    q.requires_grad_(True)
    k = torch.randn(B, cq, S, dtype=dtype, requires_grad=True)
    v = torch.randn(B, cv, S, dtype=dtype, requires_grad=True)
    bias = _make_bias("masked", B, S, dtype, "cpu")
    got = {}

    def fwd_bwd():
        out = fastctx.region_attention(q, k, v, 0.7, bias, backend="cpu")
        got["out"] = out
        got["grads"] = torch.autograd.grad(out, (q, k, v, bias), dout)

    sizes = allocations(fwd_bwd)
    assert fastctx.last_backend("region_attention") == "cpu"
    assert sizes.count(q.numel() * q.element_size()) == 1, sizes  # dq
    assert sizes.count(dout.numel() * dout.element_size()) == 1, sizes  # out
    l64 = [t.detach().double().requires_grad_(True) for t in (q, k, v, bias)]
    ref = python_ref.region_attention(l64[0], l64[1], l64[2], 0.7, l64[3])
    ref.backward(dout.double())
    assert_close(got["out"], ref, dtype, "out")
    for name, g, t64 in zip(("dq", "dk", "dv", "dbias"), got["grads"], l64):
        assert_close(g, t64.grad, dtype, name)


@pytest.mark.parametrize("S", [6, 33])  # the weights recomputed (S < 32) and kept
def test_gradcheck_cpu_float64(S):
    q = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, S, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 4, S, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, S, dtype=torch.float64)
    bias[:, 1] = float("-inf")
    bias.requires_grad_(True)
    fn = lambda q, k, v, b: fastctx.region_attention(q, k, v, 0.9, b, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, bias), eps=1e-6, atol=1e-6)
    q_cl = q.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (q_cl, k, v, bias), eps=1e-6, atol=1e-6)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gradcheck_cuda_float64():
    q = torch.randn(2, 3, 4, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    k = torch.randn(2, 3, 40, dtype=torch.float64, device="cuda", requires_grad=True)
    v = torch.randn(2, 4, 40, dtype=torch.float64, device="cuda", requires_grad=True)
    bias = torch.randn(2, 40, dtype=torch.float64, device="cuda")
    bias[:, 1] = float("-inf")
    bias.requires_grad_(True)
    fn = lambda q, k, v, b: fastctx.region_attention(q, k, v, 0.9, b, backend="cuda")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, bias), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("S", [19, 40])
def test_cpu_backward_is_deterministic(S):
    q = torch.randn(2, 16, 33, 65, requires_grad=True)
    k = torch.randn(2, 16, S, requires_grad=True)
    v = torch.randn(2, 24, S, requires_grad=True)
    grads = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            out = fastctx.region_attention(q, k, v, backend="cpu")
            grads.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    finally:
        torch.set_num_threads(before)
    for g in grads[1:]:
        for a, b in zip(grads[0], g):
            assert torch.equal(a, b)


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("backend,device", [(b, d) for b, d, _ in RUNS])
def test_opcheck(backend, device, keep):
    q = torch.randn(2, 3, 6, 7, device=device, requires_grad=True)
    k = torch.randn(2, 3, 5, device=device, requires_grad=True)
    v = torch.randn(2, 4, 5, device=device, requires_grad=True)
    bias = torch.zeros(2, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastctx.region_attention_fwd.default, (q, k, v, bias, 1.0, backend, keep))


def test_compile_fullgraph_cpu():
    torch._dynamo.reset()
    q = torch.randn(2, 4, 5, 6, requires_grad=True)
    k = torch.randn(2, 4, 7, requires_grad=True)
    v = torch.randn(2, 8, 7, requires_grad=True)
    f = lambda q, k, v: fastctx.region_attention(q * 2, k, v, backend="cpu").tanh().sum()  # noqa: E731
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    g = torch.autograd.grad(got, (q, k, v))
    want = f(q, k, v)
    w = torch.autograd.grad(want, (q, k, v))
    assert_close(got, want.double(), torch.float32, "out")
    for name, a, b in zip(("dq", "dk", "dv"), g, w):
        assert_close(a, b.double(), torch.float32, name)


def test_cpu_forward_keeps_weights_only_for_a_backward_with_enough_keys():
    from fastctx.ops._kernels import keep_weights
    from fastctx.ops.ocr import RA_KEEP_MIN_KEYS, _ra_fwd, ra_keep_weights

    q = torch.randn(2, 3, 4, 5, requires_grad=True)
    k, v, bias = torch.randn(2, 3, 6), torch.randn(2, 4, 6), torch.zeros(2, 6)
    assert keep_weights("cpu", q, k, v, bias)
    assert not keep_weights("triton", q, k, v, bias)
    assert not keep_weights("cpu", q.detach(), k, v, bias)
    with torch.no_grad():
        assert not keep_weights("cpu", q, k, v, bias)
    assert ra_keep_weights("cpu", RA_KEEP_MIN_KEYS, q, k, v, bias)
    assert not ra_keep_weights("cpu", RA_KEEP_MIN_KEYS - 1, q, k, v, bias)
    assert not ra_keep_weights("cpu", RA_KEEP_MIN_KEYS, q.detach(), k, v, bias)
    assert not ra_keep_weights("triton", RA_KEEP_MIN_KEYS, q, k, v, bias)
    out, lse, p = _ra_fwd(q, k, v, bias, 0.5, "cpu", True)
    ref = torch.softmax(0.5 * torch.einsum("bcn,bcs->bsn", q.detach().flatten(2), k), dim=1)
    assert p.shape == (2, 6, 20)
    assert_close(p, ref.double(), torch.float32, "p")
    assert _ra_fwd(q.detach(), k, v, bias, 0.5, "cpu", False)[2].numel() == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("shape", [(1, 3, 5, 1, 1, 1), (2, 13, 7, 9, 11, 19), (2, 20, 24, 13, 9, 40)], ids=_id)
def test_cpu_backward_with_and_without_kept_weights(dtype, shape):
    """The CPU backward reads the weights the forward kept, or, given an empty p, recomputes them
    from lse (what fastctx does below RA_KEEP_MIN_KEYS keys): both give the reference's gradients
    at any S, masked keys and an image with every key masked included."""
    B, cq, cv, H, W, S = shape
    q = torch.randn(B, cq, H, W, dtype=dtype).mul_(cq**-0.25)
    k = torch.randn(B, cq, S, dtype=dtype).mul_(cq**-0.25)
    v = torch.randn(B, cv, S, dtype=dtype)
    bias = _make_bias("all-masked", B, S, dtype, "cpu").detach()
    dout = torch.randn(B, cv, H, W, dtype=dtype)
    l64 = [t.double().requires_grad_(True) for t in (q, k, v, bias)]
    python_ref.region_attention(l64[0], l64[1], l64[2], 0.8, l64[3]).backward(dout.double())
    for keep in (True, False):
        out, lse, p = torch.ops.fastctx.ra_fwd(q, k, v, bias, 0.8, keep)
        assert p.numel() == (B * S * H * W if keep else 0)
        grads = torch.ops.fastctx.ra_bwd(dout, q, k, v, bias, out, lse, p, 0.8)
        for name, g, t64 in zip(("dq", "dk", "dv", "dbias"), grads, l64):
            assert_close(g, t64.grad, dtype, f"{name} (keep_p={keep})")
        assert (grads[0][0] == 0).all()


def test_cpu_backward_checks_the_weights_or_lse():
    q, k, v, bias = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 6), torch.randn(2, 4, 6), torch.zeros(2, 6)
    out, lse, p = torch.ops.fastctx.ra_fwd(q, k, v, bias, 0.5, True)
    dout = torch.ones_like(out)
    with pytest.raises(RuntimeError, match=r"p must be the weights that ra_fwd kept \(keep_p=True\), of shape \[B, S, H\*W\] = \[2, 6, 20\], or empty; got \[2, 5, 20\]"):
        torch.ops.fastctx.ra_bwd(dout, q, k, v, bias, out, lse, p[:, :5], 0.5)
    with pytest.raises(RuntimeError, match=r"without kept weights p, lse must be the \[B, H, W\] = \[2, 4, 5\] Float log-sum-exp of ra_fwd, got \[2, 4, 4\]"):
        torch.ops.fastctx.ra_bwd(dout, q, k, v, bias, out, lse[:, :, :4], torch.empty(0), 0.5)


def test_backward_allocates_no_zero_gradients_for_lse_and_p():
    """The non-differentiable outputs (lse [B, H, W], the kept weights p [B, S, H*W]) get no
    gradient tensors of zeros in the backward (set_materialize_grads(False)): one tensor of p's
    size (the forward's p) and one of lse's in a whole fwd+bwd."""
    B, C, S, H, W = 1, 16, 150, 24, 40
    q = torch.randn(B, C, H, W, requires_grad=True)
    k, v = torch.randn(B, C, S, requires_grad=True), torch.randn(B, C, S, requires_grad=True)
    dout = torch.randn(B, C, H, W)

    def fwd_bwd(k, v):
        out = fastctx.region_attention(q, k, v, backend="cpu")
        torch.autograd.grad(out, (q, k, v), dout)

    sizes = allocations(lambda: fwd_bwd(k, v))
    assert sizes.count(4 * B * S * H * W) == 1, sizes
    assert sizes.count(4 * B * H * W) == 1, sizes
    # Few keys: the weights are not kept (recomputed from lse in the backward).
    S = 19
    sizes = allocations(lambda: fwd_bwd(k[:, :, :S], v[:, :, :S]))
    assert sizes.count(4 * B * S * H * W) == 0, sizes
    assert sizes.count(4 * B * H * W) == 1, sizes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("cq,cv,S", [(300, 5, 7), (6, 300, 7), (6, 5, 300)], ids=["Cqk300", "Cv300", "S300"])
def test_cpu_long_reductions_on_every_block_tail(dtype, cq, cv, S):
    """The CPU kernels split a reduction longer than 256 (over Cqk, Cv or S) into chunks whose
    sums add up in the output, and cover a pixel block whose size is not a multiple of the vector
    width by shifting its last vector window back to overlap the one before. Every tail of a
    block (1 x N maps, N = 1..40: one block; 97x97: 98 blocks, the last of 97 pixels) must give
    the reference's output and gradients. (Until session 14 an overlapped column took the later
    chunks twice when its two windows were in different register panels: 5x6 and 97x97 maps with
    S, Cqk or Cv over 256 came out wrong.)"""
    maps = [(1, n) for n in range(1, 41)] + [(97, 97)]
    for H, W in maps:
        q = torch.randn(1, cq, H, W, dtype=dtype).mul_(cq**-0.25).requires_grad_(True)
        k = torch.randn(1, cq, S, dtype=dtype).mul_(cq**-0.25).requires_grad_(True)
        v = torch.randn(1, cv, S, dtype=dtype, requires_grad=True)
        out = fastctx.region_attention(q, k, v, 0.8, backend="cpu")
        dout = torch.randn_like(out)
        out.backward(dout)
        l64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
        ref = python_ref.region_attention(*l64, 0.8)
        ref.backward(dout.double())
        assert_close(out, ref, dtype, f"out ({H}x{W})")
        for name, t, t64 in zip(("dq", "dk", "dv"), (q, k, v), l64):
            assert_close(t.grad, t64.grad, dtype, f"{name} ({H}x{W})")
