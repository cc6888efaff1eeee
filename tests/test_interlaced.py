"""interlaced_attention: every backend in BACKENDS against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import fastctx
import python_ref
from tests._utils import DTYPE_NAMES, allocations, assert_close, has_triton

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

#: The backends under test.
BACKENDS = ["cpu", "triton"]
DEVICES = {"cpu": "cpu", "triton": DEV}
# Triton's float16 / bfloat16 and strided cases are in tests/test_interlaced_triton.py (the host
# functions directly); here the op path, under the interpreter, is kept to float32.
DTYPES = {
    "cpu": (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32,) if not CUDA else (torch.float32, torch.float16, torch.bfloat16),
}
INTERPRETED = {"cpu": False, "triton": not CUDA}

# (B, Cqk, Cv, H, W, block)
SHAPES = [
    (2, 8, 12, 16, 24, (8, 8)),  # mmseg's default block
    (1, 5, 7, 9, 10, (3, 5)),  # odd block, channels not a power of two
    (2, 3, 4, 5, 7, (1, 1)),  # long: one group of every position; short: groups of one member
    (1, 6, 5, 6, 4, (6, 4)),  # long: groups of one member; short: one group of every position
    (2, 24, 40, 12, 20, (4, 4)),  # Cqk != Cv
    # long mode, bw 8: the cpu kernels' 8 x 8 register transposes (17 = 8 + 8 + 1 members a row),
    # bands of two phases (bh even) and of one (bh odd)
    (1, 6, 10, 16, 136, (8, 8)),
    (1, 5, 7, 9, 72, (3, 8)),
    # long mode, bw 8 on maps narrower than 64: 4 members a row, each block of 8 members spans
    # two map rows (32x32: 16 members, no tail)
    (1, 6, 10, 32, 32, (8, 8)),
    # long mode, bw 4 (4 x 4 register transposes): bands of one phase (bh odd), 9 members a row
    # (blocks span map rows), a tail of 3; (2, 24, 40, 12, 20, (4, 4)) has bands of two phases
    (1, 5, 7, 9, 36, (3, 4)),
]
# groups of 12 (long) and 64 (short) members; channels past the cpu kernels' chunk of 128. Groups
# of at most 8 members (float32: the cpu kernels' own small GEMMs) past one chunk: 8 (long,
# 16x32 block 8x8) and 7 (long, 21x4 block 3x4)
LARGE = [(1, 130, 260, 24, 32, (8, 8)), (1, 136, 200, 16, 32, (8, 8)), (2, 140, 9, 21, 4, (3, 4))]
MODES = ["long", "short"]


def _id(shape, mode):
    B, cq, cv, H, W, (bh, bw) = shape
    return f"B{B}-C{cq}x{cv}-{H}x{W}-blk{bh}x{bw}-{mode}"


def _cases():
    for backend in BACKENDS:
        for dtype in DTYPES[backend]:
            low = dtype in (torch.float16, torch.bfloat16)
            shapes = SHAPES[:2] if low else SHAPES + ([] if INTERPRETED[backend] else LARGE)
            for shape in shapes:
                for mode in MODES:
                    yield pytest.param(backend, dtype, shape, mode, id=f"{backend}-{_id(shape, mode)}-{DTYPE_NAMES[dtype]}")


def _inputs(B, cq, cv, H, W, dtype, device):
    q = torch.randn(B, cq, H, W, dtype=dtype, device=device).mul_(cq**-0.25)
    k = torch.randn(B, cq, H, W, dtype=dtype, device=device).mul_(cq**0.25)  # energies ~ N(0, 1) after the scale
    v = torch.randn(B, cv, H, W, dtype=dtype, device=device)
    return q, k, v


def _check_against_reference(backend, q, k, v, block, mode, scale, dtype):
    """out and dq, dk, dv of ``backend`` against the float64 reference, one random dout."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = fastctx.interlaced_attention(*leaves, block=block, mode=mode, scale=scale, backend=backend)
    assert fastctx.last_backend("interlaced_attention") == backend
    assert out.shape == v.shape and out.dtype == v.dtype
    dout = torch.randn_like(out)
    out.backward(dout)
    l64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = python_ref.interlaced_attention(*l64, block, mode, scale)
    ref.backward(dout.double())
    assert_close(out, ref, dtype, "out")
    for name, t, t64 in zip(("dq", "dk", "dv"), leaves, l64):
        assert_close(t.grad, t64.grad, dtype, name)


@pytest.mark.parametrize("backend,dtype,shape,mode", list(_cases()))
def test_parity(backend, dtype, shape, mode):
    if backend == "triton" and not has_triton():
        pytest.fail("triton is not usable here")
    B, cq, cv, H, W, block = shape
    q, k, v = _inputs(B, cq, cv, H, W, dtype, DEVICES[backend])
    _check_against_reference(backend, q, k, v, block, mode, None, dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_scale(backend, mode):
    q, k, v = _inputs(2, 4, 6, 6, 8, torch.float32, DEVICES[backend])
    _check_against_reference(backend, q, k, v, (2, 4), mode, -0.7, torch.float32)


@pytest.mark.parametrize(
    "backend,mode,layout",
    [
        (b, m, lay)
        for b in BACKENDS
        for m in MODES
        for lay in ("channels_last", "channel-slice", "transposed-map")
        if b == "cpu" or CUDA or lay == "channels_last"
    ],
)
def test_strided_inputs(backend, mode, layout):
    dev = DEVICES[backend]
    if layout == "channels_last":
        q, k, v = (t.to(memory_format=torch.channels_last) for t in _inputs(2, 136, 40, 8, 12, torch.float32, dev))
    elif layout == "channel-slice":  # every other channel of wider maps
        q, k, v = (t[:, ::2] for t in _inputs(2, 272, 20, 8, 12, torch.float32, dev))
    else:  # H and W swapped by a transpose: stride 1 along H
        q, k, v = (t.transpose(2, 3) for t in _inputs(2, 6, 140, 12, 8, torch.float32, dev))
    assert not q.is_contiguous()
    _check_against_reference(backend, q, k, v, (4, 3), mode, None, torch.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bw", [8, 4])
@pytest.mark.parametrize("layout", ["channel-slice", "row-slice", "column-crop"])
def test_strided_inputs_vector_packing(layout, bw, mode):
    """The cpu kernels' vector packing for bw 8 or 4 in float32 (long mode: 8 x 8 and 4 x 4
    register transposes; short mode: runs of bw members) on views whose rows are contiguous but
    not where a contiguous map's would be: every other channel, every other map row, and a crop
    that starts 3 values into each row (unaligned rows)."""
    if layout == "channel-slice":
        q, k, v = (t[:, ::2, :, 3:] for t in _inputs(1, 10, 14, 8, 139, torch.float32, "cpu"))
    elif layout == "row-slice":
        q, k, v = (t[:, :, ::2, 3:] for t in _inputs(1, 5, 7, 16, 139, torch.float32, "cpu"))
    else:
        q, k, v = (t[..., 3:] for t in _inputs(1, 5, 7, 8, 139, torch.float32, "cpu"))
    assert q.stride(3) == 1 and not q.is_contiguous() and q.shape[3] == 136  # 17 (34) members a row
    _check_against_reference("cpu", q, k, v, (2, bw), mode, None, torch.float32)


# (B, Cqk, Cv, H, W, block): the cpu kernels' channels-last packing transposes blocks of 8
# members x 8 channels. Long mode, over a group's members (blocks span map rows): 34 (16x136,
# block 8x8: 17 a row, 4 blocks and a tail of 2), 18 (6x18, block 3x2: 2 blocks and a tail of
# 2), 16 (8x12, block 2x3: 4 a row, no tail). Short mode, over a block's map row: 8 members (a
# block), 10 (a block and a tail), 2 and 3 (all tail). Channels: 9, 13 and 20 (blocks of 8 and a
# tail), 136 (past the chunk of 128).
CL_SHAPES = [
    (1, 13, 20, 16, 136, (8, 8)),
    (2, 136, 13, 6, 18, (3, 2)),
    (1, 13, 9, 16, 40, (2, 10)),
    (2, 9, 20, 8, 12, (2, 3)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("which", ["q", "v", "dout", "qkvdout"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", CL_SHAPES, ids=lambda s: _id(s, "")[:-1])
def test_cpu_channels_last_read_in_place(shape, mode, which, dtype):
    """Channels-last q, k, v and dout are read where they lie by the CPU kernels (no copy of them
    is allocated: each q/k/v-sized tensor of a forward and backward is the output or a
    gradient), and the output and every gradient match the reference."""
    B, cq, cv, H, W, block = shape
    q, k, v = _inputs(B, cq, cv, H, W, dtype, "cpu")
    dout = torch.randn(B, cv, H, W, dtype=dtype)
    names = ("q", "k", "v", "dout")
    q, k, v, dout = (t.contiguous(memory_format=torch.channels_last) if n in which else t
                     for n, t in zip(names, (q, k, v, dout)))
    for n, t in zip(names, (q, k, v, dout)):
        assert (n in which) == (not t.is_contiguous()), n
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    got = {}

    def fwd_bwd():
        got["out"] = fastctx.interlaced_attention(q, k, v, block=block, mode=mode, scale=0.7, backend="cpu")
        got["grads"] = torch.autograd.grad(got["out"], (q, k, v), dout)

    sizes = allocations(fwd_bwd)
    assert fastctx.last_backend("interlaced_attention") == "cpu"
    size = lambda c: B * c * H * W * q.element_size()  # noqa: E731
    assert sizes.count(size(cq)) == 2, sizes  # dq, dk (Cqk != Cv in every shape)
    assert sizes.count(size(cv)) == 2, sizes  # out, dv
    l64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = python_ref.interlaced_attention(*l64, block, mode, 0.7)
    want = (ref, *torch.autograd.grad(ref, l64, dout.double()))
    for name, g, w in zip(("out", "dq", "dk", "dv"), (got["out"], *got["grads"]), want):
        assert_close(g, w, dtype, name)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_cpu_float64(mode):
    q = torch.randn(1, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v: fastctx.interlaced_attention(q, k, v, block=(2, 3), mode=mode, scale=0.9, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)


def test_lse_is_the_log_sum_exp_of_each_group():
    q, k, v = _inputs(1, 4, 3, 4, 6, torch.float64, "cpu")
    out, lse, p = torch.ops.fastctx.isa_fwd(q, k, v, 2, 3, True, 0.5, False)
    assert lse.dtype == torch.float64 and lse.shape == (1, 4, 6)
    assert p.numel() == 0  # not kept
    # position (i, j) attends to the 4 positions of equal (i % 2, j % 3)
    for i in range(4):
        for j in range(6):
            keys = k[0, :, i % 2 :: 2, j % 3 :: 3].reshape(4, -1)
            want = torch.logsumexp(0.5 * q[0, :, i, j] @ keys, 0)
            assert torch.allclose(lse[0, i, j], want, atol=1e-12)
    _, lse32, _ = torch.ops.fastctx.isa_fwd(q.half(), k.half(), v.half(), 2, 3, True, 0.5, False)
    assert lse32.dtype == torch.float32


@pytest.mark.parametrize("mode", MODES)
def test_kept_weights_are_each_groups_softmax(mode):
    q, k, v = _inputs(2, 4, 3, 4, 6, torch.float64, "cpu")
    long_mode = mode == "long"
    _, _, p = torch.ops.fastctx.isa_fwd(q, k, v, 2, 3, long_mode, 0.5, True)
    if long_mode:  # the 4 positions of equal (i % 2, j % 3), in row-major order
        groups = [[(i, j) for i in range(pi, 4, 2) for j in range(pj, 6, 3)] for pi in range(2) for pj in range(3)]
    else:  # the 2 x 3 blocks
        groups = [[(a0 + a, b0 + c) for a in range(2) for c in range(3)] for a0 in (0, 2) for b0 in (0, 3)]
    L = len(groups[0])
    assert p.shape == (2, len(groups), L, L) and p.dtype == torch.float64
    got = list(p.reshape(-1, L, L))
    for b in range(2):
        for idx in groups:
            qs = torch.stack([q[b, :, i, j] for i, j in idx], 1)
            ks = torch.stack([k[b, :, i, j] for i, j in idx], 1)
            want = torch.softmax(0.5 * qs.T @ ks, -1)
            # groups are stored in the kernel's own order: each must be there exactly once
            assert sum(torch.allclose(g, want, atol=1e-12) for g in got) == 1


def test_cpu_is_deterministic_across_thread_counts():
    q, k, v = (t.requires_grad_(True) for t in _inputs(2, 16, 24, 16, 24, torch.float32, "cpu"))
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            out = fastctx.interlaced_attention(q, k, v, block=(4, 4), backend="cpu")
            results.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, mode):
    dev = DEVICES[backend]
    q, k, v = (t.requires_grad_(True) for t in _inputs(2, 3, 5, 6, 4, torch.float32, dev))
    long_mode = mode == "long"
    torch.library.opcheck(torch.ops.fastctx.interlaced_attention_fwd.default, (q, k, v, 2, 2, long_mode, 0.8, backend, True))
    out, lse, p = torch.ops.fastctx.interlaced_attention_fwd(q, k, v, 2, 2, long_mode, 0.8, backend, True)
    dout = torch.randn_like(out)
    args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, p, 2, 2, long_mode, 0.8, backend)
    torch.library.opcheck(torch.ops.fastctx.interlaced_attention_bwd.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    dev = DEVICES[backend]
    q, k, v = (t.requires_grad_(True) for t in _inputs(2, 4, 6, 6, 8, torch.float32, dev))

    def f(q, k, v):
        x = fastctx.interlaced_attention(q * 2, k, v, block=(2, 4), mode="long", backend=backend)
        return fastctx.interlaced_attention(q, k, x.tanh(), block=(2, 4), mode="short", backend=backend).sum()

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    g = torch.autograd.grad(got, (q, k, v))
    want = f(q, k, v)
    w = torch.autograd.grad(want, (q, k, v))
    assert_close(got, want.double(), torch.float32, "out")
    for name, a, b in zip(("dq", "dk", "dv"), g, w):
        assert_close(a, b.double(), torch.float32, name)


r = torch.randn
BAD = {
    "divide-H": (lambda: fastctx.interlaced_attention(r(1, 4, 9, 16), r(1, 4, 9, 16), r(1, 8, 9, 16), block=(4, 8), backend="cpu"), ValueError, r"the map 9x16 is not divisible by block 4x8 \(H % bh = 1, W % bw = 0\)"),
    "divide-W": (lambda: fastctx.interlaced_attention(r(1, 4, 8, 10), r(1, 4, 8, 10), r(1, 8, 8, 10), block=(4, 4), backend="cpu"), ValueError, r"the map 8x10 is not divisible by block 4x4 \(H % bh = 0, W % bw = 2\)"),
    "block-type": (lambda: fastctx.interlaced_attention(r(1, 4, 8, 8), r(1, 4, 8, 8), r(1, 8, 8, 8), block=(2.0, 2), backend="cpu"), ValueError, "block must be two positive ints"),
    "block-len": (lambda: fastctx.interlaced_attention(r(1, 4, 8, 8), r(1, 4, 8, 8), r(1, 8, 8, 8), block=(2,), backend="cpu"), ValueError, "block must be two positive ints"),
    "mode": (lambda: fastctx.interlaced_attention(r(1, 4, 8, 8), r(1, 4, 8, 8), r(1, 8, 8, 8), mode="global", backend="cpu"), ValueError, "mode must be 'long' or 'short', got 'global'"),
    "qk-shape": (lambda: fastctx.interlaced_attention(r(1, 4, 8, 8), r(1, 5, 8, 8), r(1, 8, 8, 8), backend="cpu"), ValueError, r"q and k must have the same shape, got \(1, 4, 8, 8\) and \(1, 5, 8, 8\)"),
    "v-shape": (lambda: fastctx.interlaced_attention(r(1, 4, 8, 8), r(1, 4, 8, 8), r(2, 8, 8, 8), backend="cpu"), ValueError, r"v must match q in batch and spatial size, got q \(1, 4, 8, 8\) and v \(2, 8, 8, 8\)"),
    "rank": (lambda: fastctx.interlaced_attention(r(4, 8, 8), r(4, 8, 8), r(8, 8, 8), backend="cpu"), ValueError, r"q must be a 4-D tensor \[B, Cqk, H, W\], got shape \(4, 8, 8\)"),
    "dtype": (lambda: fastctx.interlaced_attention(r(1, 4, 8, 8), r(1, 4, 8, 8).double(), r(1, 8, 8, 8), backend="cpu"), TypeError, "k is torch.float64 but q is torch.float32"),
    "empty": (lambda: fastctx.interlaced_attention(r(0, 4, 8, 8), r(0, 4, 8, 8), r(0, 8, 8, 8), backend="cpu"), ValueError, r"q is empty \(shape \(0, 4, 8, 8\)\)"),
    "empty-v": (lambda: fastctx.interlaced_attention(r(1, 4, 8, 8), r(1, 4, 8, 8), r(1, 0, 8, 8), backend="cpu"), ValueError, r"v is empty"),
    "nan": (lambda: fastctx.interlaced_attention(r(1, 4, 8, 8), r(1, 4, 8, 8).index_fill_(1, torch.tensor([2]), float("nan")), r(1, 8, 8, 8), backend="cpu"), ValueError, r"k \(shape \(1, 4, 8, 8\)\) contains NaN"),
    "scale": (lambda: fastctx.interlaced_attention(r(1, 4, 8, 8), r(1, 4, 8, 8), r(1, 8, 8, 8), scale=float("inf"), backend="cpu"), ValueError, "scale must be finite"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    fn, exc, pattern = BAD[case]
    with pytest.raises(exc, match=pattern) as info:
        fn()
    assert str(info.value).startswith("fastctx.interlaced_attention: ")


# The compiled ops check their arguments too (they can be called directly through torch.ops).
BAD_COMPILED = {
    "divide": (lambda: torch.ops.fastctx.isa_fwd(r(1, 4, 9, 8), r(1, 4, 9, 8), r(1, 8, 9, 8), 4, 4, True, 1.0, True), r"isa_fwd\): the map 9x8 is not divisible by block 4x4"),
    "block": (lambda: torch.ops.fastctx.isa_fwd(r(1, 4, 8, 8), r(1, 4, 8, 8), r(1, 8, 8, 8), 0, 4, True, 1.0, True), r"block must be positive, got 0x4"),
    "qk": (lambda: torch.ops.fastctx.isa_fwd(r(1, 4, 8, 8), r(1, 3, 8, 8), r(1, 8, 8, 8), 4, 4, True, 1.0, True), r"q and k must have the same shape"),
    "v": (lambda: torch.ops.fastctx.isa_fwd(r(1, 4, 8, 8), r(1, 4, 8, 8), r(1, 8, 8, 4), 4, 4, True, 1.0, True), r"v must match q in batch and spatial size"),
    "dtype": (lambda: torch.ops.fastctx.isa_fwd(r(1, 4, 8, 8), r(1, 4, 8, 8).double(), r(1, 8, 8, 8), 4, 4, True, 1.0, True), r"k has dtype Double but q has dtype Float"),
    "int": (lambda: torch.ops.fastctx.isa_fwd(*(torch.ones(1, 4, 8, 8, dtype=torch.int32),) * 3, 4, 4, True, 1.0, True), r"q must be float16, bfloat16, float32 or float64"),
    "dout": (lambda: torch.ops.fastctx.isa_bwd(r(1, 8, 8, 4), r(1, 4, 8, 8), r(1, 4, 8, 8), r(1, 8, 8, 8), r(1, 8, 8, 8), r(1, 8, 8), r(1, 16, 4, 4), 4, 4, True, 1.0), r"dout must have the shape of v"),
    "p-missing": (lambda: torch.ops.fastctx.isa_bwd(r(1, 8, 8, 8), r(1, 4, 8, 8), r(1, 4, 8, 8), r(1, 8, 8, 8), r(1, 8, 8, 8), r(1, 8, 8), r(0), 4, 4, True, 1.0), r"p must be the weights that isa_fwd kept \(keep_p=True\), of shape \[B, groups, L, L\] = \[1, 16, 4, 4\]; got \[0\]"),
    "p-shape": (lambda: torch.ops.fastctx.isa_bwd(r(1, 8, 8, 8), r(1, 4, 8, 8), r(1, 4, 8, 8), r(1, 8, 8, 8), r(1, 8, 8, 8), r(1, 8, 8), r(1, 4, 16, 16), 4, 4, True, 1.0), r"= \[1, 16, 4, 4\]; got \[1, 4, 16, 16\]"),
    "p-dtype": (lambda: torch.ops.fastctx.isa_bwd(r(1, 8, 8, 8), r(1, 4, 8, 8), r(1, 4, 8, 8), r(1, 8, 8, 8), r(1, 8, 8, 8), r(1, 8, 8), r(1, 16, 4, 4).double(), 4, 4, True, 1.0), r"p must have dtype Float"),
}


@pytest.mark.parametrize("case", list(BAD_COMPILED))
def test_bad_input_compiled(case):
    fn, pattern = BAD_COMPILED[case]
    with pytest.raises(RuntimeError, match=pattern):
        fn()


def test_backward_allocates_no_zero_gradients_for_lse_and_p():
    """The non-differentiable outputs (lse [B, H, W], the kept weights p [B, groups, L, L]) get
    no gradient tensors of zeros in the backward (set_materialize_grads(False)): one tensor of p's
    size (the forward's p) in a whole fwd+bwd."""
    B, C, H, W = 1, 8, 40, 48  # long mode, block 4x4: 16 groups of L = 10 * 12 = 120 members
    q, k, v = (torch.randn(B, C, H, W, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, C, H, W)

    def fwd_bwd():
        out = fastctx.interlaced_attention(q, k, v, block=(4, 4), mode="long", backend="cpu")
        torch.autograd.grad(out, (q, k, v), dout)

    sizes = allocations(fwd_bwd)
    assert sizes.count(4 * B * 16 * 120 * 120) == 1, sizes
