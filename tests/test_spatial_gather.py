"""spatial_gather: every backend that can run here against the float64 reference."""

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
if CUDA:  # the CUDA C++ kernels (csrc/cuda/spatial_gather.cu): only where a GPU is
    RUNS.append(("cuda", "cuda", (torch.float64, torch.float32, torch.float16, torch.bfloat16)))

# (B, C, K, H, W)
SHAPES = [(1, 3, 1, 1, 1), (2, 5, 19, 7, 5), (1, 13, 171, 5, 7), (2, 20, 7, 33, 65)]
LARGE = [(2, 48, 150, 33, 65), (1, 24, 19, 97, 97)]
# logits: finite; masked (some pixels -inf, one class of image 0 all -inf); ramp (rising along
# the pixels with a large spread, so the running max of every class moves block after block)
LOGITS = ["finite", "masked", "ramp"]
SCALE = 0.7


def _id(s):
    B, C, K, H, W = s
    return f"B{B}-C{C}-K{K}-{H}x{W}"


def _cases():
    for backend, device, dtypes in RUNS:
        interp = backend == "triton" and not CUDA
        for dtype in dtypes:
            for shape in SHAPES + ([] if interp or dtype in (torch.float16, torch.bfloat16) else LARGE):
                for kind in LOGITS if dtype in (torch.float32, torch.float64) else ["masked"]:
                    if interp and shape[3:] == (33, 65) and (dtype, kind) != (torch.float32, "ramp"):
                        continue  # the interpreter takes ~20 s per 33x65 case: one of them
                    yield pytest.param(backend, device, dtype, shape, kind, id=f"{backend}-{_id(shape)}-{DTYPE_NAMES[dtype]}-{kind}")


def _make_logits(kind, B, K, H, W, dtype, device):
    lg = torch.randn(B, K, H, W, device=device) * 2
    if kind == "ramp":
        lg = lg + torch.linspace(0, 40, H * W, device=device).reshape(H, W)
    if kind == "masked":
        lg[:, :, ::3, 1::2] = float("-inf")
        lg[0, K // 2] = float("-inf")
    return lg.to(dtype).requires_grad_(True)


def _check(feats, logits, out, dout, dtype, scale=SCALE):
    f64 = feats.detach().double().requires_grad_(True)
    l64 = logits.detach().double().requires_grad_(True)
    ref = python_ref.spatial_gather(f64, l64, scale)
    ref.backward(dout.double())
    assert_close(out, ref, dtype, "regions")
    assert_close(feats.grad, f64.grad, dtype, "dfeats")
    assert_close(logits.grad, l64.grad, dtype, "dlogits")


@pytest.mark.parametrize("backend,device,dtype,shape,kind", list(_cases()))
def test_parity(backend, device, dtype, shape, kind):
    if backend == "triton" and not has_triton():
        pytest.fail("triton is not usable here")
    B, C, K, H, W = shape
    feats = torch.randn(B, C, H, W, dtype=dtype, device=device, requires_grad=True)
    logits = _make_logits(kind, B, K, H, W, dtype, device)
    out = fastctx.spatial_gather(feats, logits, SCALE, backend=backend)
    assert fastctx.last_backend("spatial_gather") == backend
    assert out.shape == (B, C, K) and out.dtype == dtype
    dout = torch.randn_like(out)
    out.backward(dout)
    _check(feats, logits, out, dout, dtype)
    if kind == "masked":  # the class of image 0 whose logits are all -inf
        assert (out[0, :, K // 2] == 0).all()
        assert (logits.grad[0, K // 2] == 0).all()
        assert torch.isfinite(feats.grad).all() and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("layout", ["flat", "cropped"])
@pytest.mark.parametrize("backend,device", [(b, d) for b, d, _ in RUNS])
def test_strided_inputs(backend, device, layout):
    # flat: channels_last feats with a channel stride of 2, logits with a width stride of 2 (one
    # stride per pixel); cropped: windows of larger maps (rows and columns at unrelated strides)
    if layout == "flat":
        feats = torch.randn(2, 14, 9, 11, device=device).to(memory_format=torch.channels_last)[:, ::2]
        logits = torch.randn(2, 5, 9, 22, device=device)[..., ::2]
    else:
        feats = torch.randn(2, 14, 10, 13, device=device).to(memory_format=torch.channels_last)[:, ::2, 1:, 1:12]
        logits = torch.randn(2, 5, 11, 13, device=device)[:, :, 2:, :11]
    feats.requires_grad_(True)
    logits.requires_grad_(True)
    assert not feats.is_contiguous() and not logits.is_contiguous()
    out = fastctx.spatial_gather(feats, logits, backend=backend)
    dout = torch.randn(2, 7, 5, device=device).transpose(1, 2).contiguous().transpose(1, 2)
    out.backward(dout)
    _check(feats, logits, out, dout, torch.float32, scale=1.0)


@pytest.mark.skipif(not has_triton(), reason="triton is not usable here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_split_and_class_blocks(dtype):
    """The forward's pixel splits and combine kernel (one split on the CPU interpreter unless
    forced), and the backward's several class blocks (K above one block)."""
    from fastctx.triton import spatial_gather as tsg

    B, C, K, H, W = 2, 20, 150, 5, 21
    feats = torch.randn(B, C, H, W, dtype=dtype, device=DEV)
    logits = _make_logits("masked", B, K, H, W, dtype, DEV).detach()
    cfg = tsg._config(C, K, dtype)
    assert K > cfg["BLOCK_K"]
    out, lse = tsg._fwd(feats, logits, SCALE, cfg, n_split=3)
    f64, l64 = feats.double(), logits.double()
    assert_close(out, python_ref.spatial_gather(f64, l64, SCALE), dtype, "regions")
    want_lse = torch.logsumexp(SCALE * l64.flatten(2), -1)
    empty = torch.isneginf(want_lse)
    assert empty.any() and torch.equal(torch.isneginf(lse), empty)
    assert_close(lse[~empty], want_lse[~empty], torch.float32, "lse")
    dout = torch.randn_like(out)
    dfeats, dlogits = tsg.sg_bwd(dout, feats, logits, out, lse, SCALE)
    f64.requires_grad_(True)
    l64.requires_grad_(True)
    python_ref.spatial_gather(f64, l64, SCALE).backward(dout.double())
    assert_close(dfeats, f64.grad, dtype, "dfeats")
    assert_close(dlogits, l64.grad, dtype, "dlogits")


# (B, C, K, H, W): channels and pixels with and without tails of the 8 x 8 transposes; several
# forward chunks and panels, backward blocks with a merged tail (45x50); K above 128
CL_SHAPES = [(2, 13, 5, 7, 11), (1, 64, 19, 33, 65), (2, 20, 150, 45, 50), (1, 9, 3, 1, 7)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("which", ["feats", "logits", "both"])
@pytest.mark.parametrize("shape", CL_SHAPES, ids=_id)
def test_cpu_channels_last_read_in_place(dtype, which, shape):
    """Channels-last float32 / float64 feats and logits are read as they are: the CPU kernels
    transpose each block themselves (vec.h's pack_nhwc), so the only feats- and logits-sized
    tensors of a forward and backward are the gradients (before: a transposed copy in each
    pass too), and the regions and both gradients match the reference."""
    B, C, K, H, W = shape
    feats = torch.randn(B, C, H, W, dtype=dtype)
    logits = _make_logits("masked", B, K, H, W, dtype, "cpu").detach()
    if which in ("feats", "both"):
        feats = feats.contiguous(memory_format=torch.channels_last)
    if which in ("logits", "both"):
        logits = logits.contiguous(memory_format=torch.channels_last)
    feats.requires_grad_(True)
    logits.requires_grad_(True)
    dout = torch.randn(B, C, K, dtype=dtype)
    got = {}

    def fwd_bwd():
        got["out"] = fastctx.spatial_gather(feats, logits, SCALE, backend="cpu")
        feats.grad, logits.grad = torch.autograd.grad(got["out"], (feats, logits), dout)

    sizes = allocations(fwd_bwd)
    assert fastctx.last_backend("spatial_gather") == "cpu"
    for name, t in (("feats", feats), ("logits", logits)):
        cl = not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
        assert cl == (which in (name, "both")), name
    for t in (feats, logits):
        assert sizes.count(t.numel() * t.element_size()) == 1, sizes  # its gradient; no copy
    _check(feats, logits, got["out"], dout, dtype)


def test_gradcheck_cpu_float64():
    feats = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(2, 4, 3, 4, dtype=torch.float64)
    logits[0, 1, 1:, :] = float("-inf")  # a partly masked class
    logits[1, 2] = float("-inf")  # an empty class
    logits.requires_grad_(True)
    fn = lambda f, lg: fastctx.spatial_gather(f, lg, 0.9, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (feats, logits), eps=1e-6, atol=1e-6)
    cl = (t.detach().contiguous(memory_format=torch.channels_last) for t in (feats, logits))
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_(True) for t in cl), eps=1e-6, atol=1e-6)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gradcheck_cuda_float64():
    feats = torch.randn(2, 3, 3, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    logits = torch.randn(2, 4, 3, 4, dtype=torch.float64, device="cuda")
    logits[0, 1, 1:, :] = float("-inf")  # a partly masked class
    logits[1, 2] = float("-inf")  # an empty class
    logits.requires_grad_(True)
    fn = lambda f, lg: fastctx.spatial_gather(f, lg, 0.9, backend="cuda")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (feats, logits), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpu_is_deterministic(layout):
    # 33x65 = 2145 pixels: two forward chunks per image, many backward blocks
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    feats = torch.randn(2, 24, 33, 65).contiguous(memory_format=fmt).requires_grad_(True)
    logits = torch.randn(2, 19, 33, 65).contiguous(memory_format=fmt).requires_grad_(True)
    dout = torch.randn(2, 24, 19)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 2, 3):
            torch.set_num_threads(threads)
            out = fastctx.spatial_gather(feats, logits, backend="cpu")
            results.append((out, *torch.autograd.grad(out, (feats, logits), dout)))
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", [(b, d) for b, d, _ in RUNS])
def test_opcheck(backend, device):
    feats = torch.randn(2, 3, 6, 7, device=device, requires_grad=True)
    logits = torch.randn(2, 5, 6, 7, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastctx.spatial_gather_fwd.default, (feats, logits, 0.8, backend))
    out, lse = torch.ops.fastctx.spatial_gather_fwd(feats.detach(), logits.detach(), 0.8, backend)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fastctx.spatial_gather_bwd.default, (dout, feats.detach(), logits.detach(), out, lse, 0.8, backend))


def test_compile_fullgraph_cpu():
    torch._dynamo.reset()
    feats = torch.randn(2, 4, 5, 6, requires_grad=True)
    logits = torch.randn(2, 3, 5, 6, requires_grad=True)
    f = lambda x, lg: fastctx.spatial_gather(x * 2, lg, backend="cpu").tanh().sum()  # noqa: E731
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(feats, logits)
    g = torch.autograd.grad(got, (feats, logits))
    want = f(feats, logits)
    w = torch.autograd.grad(want, (feats, logits))
    assert_close(got, want.double(), torch.float32, "out")
    for name, a, b in zip(("dfeats", "dlogits"), g, w):
        assert_close(a, b.double(), torch.float32, name)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
r = torch.randn


def test_rejects_plus_inf_logits():
    logits = r(1, 3, 5, 6)
    logits[0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"fastctx.spatial_gather: logits \(shape \(1, 3, 5, 6\)\) contains \+inf"):
        fastctx.spatial_gather(r(1, 4, 5, 6), logits)


def test_triton_refuses_float64():
    with pytest.raises(fastctx.BackendUnavailableError, match="spatial_gather: backend 'triton' cannot run"):
        fastctx.spatial_gather(r(1, 4, 5, 6, dtype=torch.float64), r(1, 3, 5, 6, dtype=torch.float64), backend="triton")


@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda: torch.ops.fastctx.sg_fwd(r(1, 4, 5, 6), r(1, 3, 5, 7), 1.0), r"feats and logits must agree in batch and spatial size, got feats \[1, 4, 5, 6\] and logits \[1, 3, 5, 7\]"),
        (lambda: torch.ops.fastctx.sg_fwd(r(1, 4, 5, 6), r(1, 3, 5, 6), 0.0), "scale must be positive and finite, got 0"),
        (lambda: torch.ops.fastctx.sg_fwd(r(4, 5, 6), r(1, 3, 5, 6), 1.0), r"feats must be 4-D \[B, C, H, W\], got shape \[4, 5, 6\]"),
        (lambda: torch.ops.fastctx.sg_fwd(r(1, 0, 5, 6), r(1, 3, 5, 6), 1.0), r"feats and logits must not be empty, got feats \[1, 0, 5, 6\]"),
        (lambda: torch.ops.fastctx.sg_fwd(r(1, 4, 5, 6), r(1, 3, 5, 6).double(), 1.0), "logits has dtype Double but feats has dtype Float"),
        (lambda: torch.ops.fastctx.sg_bwd(r(1, 4, 2), r(1, 4, 5, 6), r(1, 3, 5, 6), r(1, 4, 3), r(1, 3), 1.0), r"dregions and regions must be \[B, C, K\] = \[1, 4, 3\], got \[1, 4, 2\]"),
        (lambda: torch.ops.fastctx.sg_bwd(r(1, 4, 3), r(1, 4, 5, 6), r(1, 3, 5, 6), r(1, 4, 3), r(1, 3).double(), 1.0), "lse must have dtype Float for Float inputs, got Double"),
        (lambda: torch.ops.fastctx.sg_bwd(r(1, 4, 3), r(1, 4, 5, 6), r(1, 3, 5, 6), r(1, 4, 3), r(3), 1.0), r"lse must have shape \[B, K\] = \[1, 3\], got \[3\]"),
    ],
    ids=["fwd-size", "fwd-scale", "fwd-rank", "fwd-empty", "fwd-dtype", "bwd-dregions", "bwd-lse-dtype", "bwd-lse-shape"],
)
def test_compiled_op_checks(call, pattern):
    """The compiled ops check their inputs themselves (they are reachable as torch.ops)."""
    with pytest.raises(RuntimeError, match="fastctx.spatial_gather .*" + pattern):
        call()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("C,K", [(300, 5), (6, 150)], ids=["C300", "K150"])
def test_cpu_long_reductions_on_every_block_tail(dtype, C, K):
    """The CPU backward splits its reductions over the channels (dlogits, chunks of 256) and over
    the classes (dfeats, chunks of 128) and covers a pixel block whose size is not a multiple of
    the vector width by shifting its last vector window back to overlap the one before: every
    tail of a block (1 x N maps, N = 1..40; 97x97, 13 blocks) must give the reference's
    gradients. (Until session 14 an overlapped column took the later chunks twice when its two
    windows were in different register panels: OCR's C = 512 and ADE20K's K = 150 on 97x97 maps
    came out wrong.)"""
    maps = [(1, n) for n in range(1, 41)] + [(97, 97)]
    for H, W in maps:
        feats = torch.randn(1, C, H, W, dtype=dtype, requires_grad=True)
        logits = _make_logits("finite", 1, K, H, W, dtype, "cpu")
        out = fastctx.spatial_gather(feats, logits, SCALE, backend="cpu")
        dout = torch.randn_like(out)
        out.backward(dout)
        _check(feats, logits, out, dout, dtype)
