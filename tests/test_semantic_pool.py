"""semantic_pool / semantic_pool_regions: every backend that can run here against the float64
reference (python_ref), outputs and both gradients."""

from __future__ import annotations

import pytest
import torch

import fastctx
import python_ref
from fastctx.ops import semantic as sem
from tests._utils import DTYPE_NAMES, allocations, assert_close, has_triton

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
NEG_INF = float("-inf")
RUNS = [
    ("cpu", "cpu", (torch.float64, torch.float32, torch.float16, torch.bfloat16)),
    ("triton", DEV, (torch.float32, torch.float16, torch.bfloat16)),
]
if CUDA:  # the CUDA C++ kernels (csrc/cuda/semantic_pool.cu): only where a GPU is
    RUNS.append(("cuda", "cuda", (torch.float64, torch.float32, torch.float16, torch.bfloat16)))
BACKENDS = [(b, d) for b, d, _ in RUNS]

# (B, C, K, H, W)
SHAPES = [(2, 5, 4, 7, 5), (1, 3, 1, 5, 7), (2, 13, 19, 9, 11), (1, 6, 150, 11, 13)]
LARGE = [(1, 16, 19, 33, 65)]


def _id(s):
    B, C, K, H, W = s
    return f"B{B}-C{C}-K{K}-{H}x{W}"


def _cases():
    for backend, device, dtypes in RUNS:
        interp = backend == "triton" and not CUDA
        for dtype in dtypes:
            big = dtype == torch.float32 or (dtype == torch.float64 and not interp)
            for shape in SHAPES + (LARGE if big else []):
                yield pytest.param(backend, device, dtype, shape, id=f"{backend}-{_id(shape)}-{DTYPE_NAMES[dtype]}")


def _need(backend):
    if backend == "triton" and not has_triton():
        pytest.fail("triton is not usable here")


def _run(backend, feats, logits):
    """Fast path: (regions, counts, labels, pooled) and the gradients of feats and logits for
    random upstream gradients of regions and pooled; the float64 reference likewise."""
    f = feats.detach().clone().requires_grad_(True)
    lg = logits.detach().clone().requires_grad_(True)
    regions, counts, labels = fastctx.semantic_pool_regions(f, lg, backend=backend)
    assert fastctx.last_backend("semantic_pool_regions") == backend
    pooled = fastctx.semantic_pool(f, lg, backend=backend)
    assert fastctx.last_backend("semantic_pool") == backend
    dr, dp = torch.randn_like(regions), torch.randn_like(pooled)
    grads = torch.autograd.grad((regions * dr).sum() + (pooled * dp).sum(), (f, lg))

    f64 = feats.detach().double().requires_grad_(True)
    l64 = logits.detach().double().requires_grad_(True)
    r64, c64, lab64 = python_ref.semantic_pool_regions(f64, l64)
    p64 = python_ref.semantic_pool(f64, l64)
    g64 = torch.autograd.grad((r64 * dr.double()).sum() + (p64 * dp.double()).sum(), (f64, l64))
    return (regions, counts, labels, pooled, *grads), (r64, c64, lab64, p64, *g64)


def _compare(got, want, dtype):
    regions, counts, labels, pooled, df, dl = got
    r64, c64, lab64, p64, df64, dl64 = want
    assert regions.dtype == dtype and pooled.dtype == dtype
    assert counts.dtype == torch.int64 and labels.dtype == torch.int64
    assert torch.equal(labels.cpu(), lab64.cpu()), "labels"
    assert torch.equal(counts.cpu(), c64.cpu()), "counts"
    assert_close(regions, r64, dtype, "regions")
    assert_close(pooled, p64, dtype, "pooled")
    assert_close(df, df64, dtype, "dfeats")
    assert_close(dl, dl64, dtype, "dlogits")
    for t in (regions, pooled, df, dl):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("backend,device,dtype,shape", list(_cases()))
def test_parity(backend, device, dtype, shape):
    _need(backend)
    B, C, K, H, W = shape
    feats = torch.randn(B, C, H, W, dtype=dtype, device=device)
    logits = (torch.randn(B, K, H, W, device=device) * 2).to(dtype)
    _compare(*_run(backend, feats, logits), dtype)


def _special(case, device):
    """-> feats, logits (float32) for the named case."""
    B, C, K, H, W = 2, 6, 5, 7, 5
    f = torch.randn(B, C, H, W, device=device)
    lg = torch.randn(B, K, H, W, device=device)
    if case == "ties":  # small integers: many exact ties, lowest index wins
        lg = torch.randint(0, 3, (B, K, H, W), device=device).float()
    elif case == "one-class-owns-all":
        lg[:, 3] += 100.0
    elif case == "absent-classes":  # only classes 0 and 3 can win
        lg[:, (1, 2, 4)] -= 100.0
    elif case == "dead-class":  # class 0 owns only pixels whose logits are all -inf in image 0
        lg[:, 0] = -100.0
        lg[0, :, 1, 2] = NEG_INF
        lg[0, :, 4, 0] = NEG_INF
        lg[1, 0, 0, 0] = 100.0
        lg[1, 0, 0, 1] = NEG_INF
    elif case == "partly-inf":  # a class owning finite and all -inf pixels; -inf scattered
        lg[0, 0] = -100.0
        lg[0, 0, 0, :2] = 50.0
        lg[0, :, 2, 3] = NEG_INF
        lg[1, 2, ::2] = NEG_INF
    elif case == "large":  # softmax over pixels of logits around 1e4 (exp would overflow)
        lg = lg * 30.0 + 1e4
    else:
        raise AssertionError(case)
    return f, lg


SPECIAL = ["ties", "one-class-owns-all", "absent-classes", "dead-class", "partly-inf", "large"]


@pytest.mark.parametrize("case", SPECIAL)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_special_inputs(backend, device, case):
    _need(backend)
    feats, logits = _special(case, device)
    got, want = _run(backend, feats, logits)
    _compare(got, want, torch.float32)
    regions, counts = got[0], got[1]
    if case == "ties":
        top2 = logits.topk(2, dim=1).values
        assert (top2[:, 0] == top2[:, 1]).sum() >= 5
    if case == "one-class-owns-all":
        assert (counts[:, 3] == 35).all()
    if case == "absent-classes":
        assert (counts[:, (1, 2, 4)] == 0).all() and (counts[:, (0, 3)] > 0).all()
        assert (regions[:, :, (1, 2, 4)] == 0).all()
    if case == "dead-class":  # present (2 pixels) but every logit -inf: zero region, zero grads
        assert counts[0, 0] == 2 and (regions[0, :, 0] == 0).all()
        assert (got[4][0, :, 1, 2] == 0).all() and (got[5][0, :, 1, 2] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fp16_large_logits(backend, device):
    """sssegmentation PR#83: float16 logits in the thousands overflowed exp in the original."""
    _need(backend)
    feats = torch.randn(2, 7, 9, 6, device=device).half()
    logits = (torch.randn(2, 4, 9, 6, device=device) * 20 + 3e4).half()
    got, want = _run(backend, feats, logits)
    _compare(got, want, torch.float16)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_noncontiguous(backend, device):
    _need(backend)
    feats = torch.randn(2, 10, 9, 11, device=device).to(memory_format=torch.channels_last)[:, ::2]
    logits = torch.randn(2, 7, 11, 9, device=device).transpose(2, 3)
    assert not feats.is_contiguous() and not logits.is_contiguous()
    _compare(*_run(backend, feats, logits), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("which", ["feats", "logits", "dpooled", "all"])
@pytest.mark.parametrize("shape,ties", [((2, 13, 19, 9, 11), False), ((1, 40, 5, 33, 65), False),
                                        ((2, 20, 150, 11, 13), False), ((2, 6, 5, 7, 5), True)],
                         ids=lambda x: _id(x) if isinstance(x, tuple) else ("ties" if x else ""))
def test_cpu_channels_last_read_in_place(shape, ties, which, dtype):
    """Channels-last feats, logits and gradient of the pooled map are read where they lie by the
    CPU kernels (no copy of them is allocated: the only feats- and logits-sized tensors of a
    forward and backward are the outputs and gradients), and every result matches the reference.
    Channel tiles of 16 with a tail (13, 40), several pixel blocks (33x65), K = 150, and logits
    of small integers (ties: the lowest class wins)."""
    B, C, K, H, W = shape
    feats = torch.randn(B, C, H, W, dtype=dtype)
    logits = torch.randint(0, 3, (B, K, H, W)).to(dtype) if ties else torch.randn(B, K, H, W, dtype=dtype) * 2
    dpooled = torch.randn(B, C, H, W, dtype=dtype)
    cl = lambda t, name: t.contiguous(memory_format=torch.channels_last) if which in (name, "all") else t  # noqa: E731
    feats, logits, dpooled = cl(feats, "feats"), cl(logits, "logits"), cl(dpooled, "dpooled")
    f, lg = feats.requires_grad_(True), logits.requires_grad_(True)
    got = {}

    def regions_fwd_bwd():
        regions, counts, labels = fastctx.semantic_pool_regions(f, lg, backend="cpu")
        got["regions"] = (regions, counts, labels)
        got["dregions"] = torch.randn_like(regions)
        got["g_regions"] = torch.autograd.grad(regions, (f, lg), got["dregions"])

    def pool_fwd_bwd():
        got["pooled"] = fastctx.semantic_pool(f, lg, backend="cpu")
        got["g_pooled"] = torch.autograd.grad(got["pooled"], (f, lg), dpooled)

    fsize, lsize = feats.numel() * feats.element_size(), logits.numel() * logits.element_size()
    sizes = allocations(regions_fwd_bwd)
    assert (sizes.count(fsize), sizes.count(lsize)) == (1, 1), sizes  # dfeats, dlogits
    sizes = allocations(pool_fwd_bwd)
    assert (sizes.count(fsize), sizes.count(lsize)) == (2, 1), sizes  # pooled, dfeats; dlogits
    assert fastctx.last_backend("semantic_pool") == "cpu"

    f64, l64 = (t.detach().double().requires_grad_(True) for t in (feats, logits))
    r64, c64, lab64 = python_ref.semantic_pool_regions(f64, l64)
    g64 = torch.autograd.grad(r64, (f64, l64), got["dregions"].double())
    regions, counts, labels = got["regions"]
    assert torch.equal(labels, lab64) and torch.equal(counts, c64)
    assert_close(regions, r64, dtype, "regions")
    for name, a, b in zip(("dfeats", "dlogits"), got["g_regions"], g64):
        assert_close(a, b, dtype, f"{name} (regions)")
    f64, l64 = (t.detach().double().requires_grad_(True) for t in (feats, logits))
    p64 = python_ref.semantic_pool(f64, l64)
    g64 = torch.autograd.grad(p64, (f64, l64), dpooled.double())
    assert_close(got["pooled"], p64, dtype, "pooled")
    for name, a, b in zip(("dfeats", "dlogits"), got["g_pooled"], g64):
        assert_close(a, b, dtype, f"{name} (pooled)")


def _separated(B, C, K, H, W, dtype=torch.float64):
    """feats and logits whose winning class leads by at least 1: the argmax is stable under the
    finite differences of gradcheck."""
    feats = torch.randn(B, C, H, W, dtype=dtype)
    lab = torch.randint(0, K, (B, H, W))
    logits = torch.randn(B, K, H, W, dtype=dtype) * 0.3
    logits = logits + 3.0 * torch.nn.functional.one_hot(lab, K).permute(0, 3, 1, 2).to(dtype)
    return feats, logits


def test_gradcheck_cpu_float64():
    feats, logits = _separated(2, 3, 4, 3, 5)
    f, lg = feats.requires_grad_(True), logits.requires_grad_(True)
    pool = lambda f, lg: fastctx.semantic_pool(f, lg, backend="cpu")  # noqa: E731
    regions = lambda f, lg: fastctx.semantic_pool_regions(f, lg, backend="cpu")[0]  # noqa: E731
    assert torch.autograd.gradcheck(pool, (f, lg), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(regions, (f, lg), eps=1e-6, atol=1e-7)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gradcheck_cuda_float64():
    feats, logits = _separated(2, 3, 4, 3, 5)
    f, lg = feats.cuda().requires_grad_(True), logits.cuda().requires_grad_(True)
    pool = lambda f, lg: fastctx.semantic_pool(f, lg, backend="cuda")  # noqa: E731
    regions = lambda f, lg: fastctx.semantic_pool_regions(f, lg, backend="cuda")[0]  # noqa: E731
    assert torch.autograd.gradcheck(pool, (f, lg), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(regions, (f, lg), eps=1e-6, atol=1e-7)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_NAMES.get)
def test_cuda_many_classes_and_pixel_groups(dtype):
    """K past one class tile of the segmented sum (232 classes a block in float32, 48 in float64)
    and maps of several pixel groups (partials summed over the groups), blobby labels (long runs
    of one class, as in segmentation maps) and scattered ones."""
    B, C, K, H, W = 2, 37, 300, 45, 67
    feats = torch.randn(B, C, H, W, dtype=dtype, device="cuda")
    blobs = torch.randint(0, K, (B, K, 5, 7), device="cuda").to(dtype)
    blobby = torch.nn.functional.interpolate(blobs, size=(H, W), mode="nearest") + 0.1 * torch.randn(B, K, H, W, dtype=dtype, device="cuda")
    for logits in (blobby, torch.randn(B, K, H, W, dtype=dtype, device="cuda") * 2):
        _compare(*_run("cuda", feats, logits), dtype)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_compiled_ops_check_their_inputs():
    regions, labels = _r(1, 4, 3).cuda(), torch.zeros(1, 5, 6, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match="labels must be int64"):
        torch.ops.fastctx.sp_gather(regions, labels.int(), torch.float32)
    with pytest.raises(RuntimeError, match=r"feats and logits must agree"):
        torch.ops.fastctx.sp_fwd(_r(1, 4, 5, 6).cuda(), _r(2, 3, 5, 6).cuda())
    with pytest.raises(RuntimeError, match=r"dregions must be"):
        torch.ops.fastctx.sp_bwd(_r(1, 4, 2).cuda(), _r(1, 4, 5, 6).cuda(), labels, _r(1, 5, 6).cuda(), regions)
    with pytest.raises(RuntimeError, match=r"fastctx.semantic_pool \(sp_fwd\): logits has dtype Double but feats has dtype Float"):
        torch.ops.fastctx.sp_fwd(_r(1, 4, 5, 6).cuda(), _r(1, 3, 5, 6).double().cuda())
    with pytest.raises(RuntimeError, match=r"fastctx.semantic_pool \(sp_scatter\): dpooled must be float16, bfloat16, float32 or float64, got Long"):
        torch.ops.fastctx.sp_scatter(torch.zeros(1, 4, 5, 6, dtype=torch.int64, device="cuda"), labels, 3)
    # labels outside [0, K) (only a direct caller can pass them) select nothing: no host sync to raise
    bad = _with(labels, (0, 2, 2), 3)
    out = torch.ops.fastctx.sp_gather(regions, bad, torch.float32)
    assert (out[0, :, 2, 2] == 0).all() and torch.equal(out[0, :, 0, 0], regions[0, :, 0])
    dr = torch.ops.fastctx.sp_scatter(torch.ones(1, 4, 5, 6, device="cuda"), bad, 3)
    assert (dr[0, :, 0] == 29).all() and (dr[0, :, 1:] == 0).all()


def test_cpu_is_deterministic_across_threads():
    feats = torch.randn(2, 40, 33, 65)
    logits = torch.randn(2, 19, 33, 65)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            f, lg = feats.clone().requires_grad_(True), logits.clone().requires_grad_(True)
            regions, _, _ = fastctx.semantic_pool_regions(f, lg, backend="cpu")
            pooled = fastctx.semantic_pool(f, lg, backend="cpu")
            g = torch.autograd.grad(regions.sum() + (pooled * pooled).sum(), (f, lg))
            results.append((regions, pooled, *g))
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device"))])
def test_gpu_backends_are_deterministic(backend):
    _need(backend)
    feats = torch.randn(2, 20, 17, 23, device=DEV)
    logits = torch.randn(2, 19, 17, 23, device=DEV)
    results = []
    for _ in range(3):
        f, lg = feats.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        regions, _, _ = fastctx.semantic_pool_regions(f, lg, backend=backend)
        pooled = fastctx.semantic_pool(f, lg, backend=backend)
        g = torch.autograd.grad(regions.sum() + (pooled * pooled).sum(), (f, lg))
        results.append((regions, pooled, *g))
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    _need(backend)
    feats, logits = _separated(2, 3, 4, 5, 6, torch.float32)
    feats, logits = feats.to(device).requires_grad_(True), logits.to(device).requires_grad_(True)
    torch.library.opcheck(sem._sp_fwd.op, (feats, logits, backend))
    regions, _, labels, w = sem._sp_fwd(feats.detach(), logits.detach(), backend)
    torch.library.opcheck(sem._sp_gather.op, (regions.clone().requires_grad_(True), labels, torch.float32, backend))
    # the backward ops have no autograd of their own: schema and fake checks
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(sem._sp_bwd.op, (torch.randn_like(regions), feats.detach(), labels, w, regions, backend), test_utils=utils)
    torch.library.opcheck(sem._sp_scatter.op, (torch.randn(2, 3, 5, 6, device=device), labels, 4, backend), test_utils=utils)


def test_compile_fullgraph_cpu():
    torch._dynamo.reset()
    feats, logits = _separated(2, 4, 3, 5, 6, torch.float32)
    feats.requires_grad_(True)
    logits.requires_grad_(True)

    def f(x, lg):
        pooled = fastctx.semantic_pool(x * 2, lg, backend="cpu")
        regions = fastctx.semantic_pool_regions(x, lg, backend="cpu")[0]
        return pooled.tanh().sum() + regions.sin().sum()

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(feats, logits)
    g = torch.autograd.grad(got, (feats, logits))
    want = f(feats, logits)
    w = torch.autograd.grad(want, (feats, logits))
    assert_close(got, want.double(), torch.float32, "out")
    for name, a, b in zip(("dfeats", "dlogits"), g, w):
        assert_close(a, b.double(), torch.float32, name)


def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _with(t, idx, value):
    t = t.clone()
    t[idx] = value
    return t


BAD = {
    "feats-rank": (lambda: (_r(4, 8, 8), _r(1, 3, 8, 8)), ValueError, "feats must be a 4-D tensor"),
    "logits-rank": (lambda: (_r(1, 4, 8, 8), _r(3, 8, 8)), ValueError, "logits must be a 4-D tensor"),
    "batch": (lambda: (_r(2, 4, 8, 8), _r(1, 3, 8, 8)), ValueError, "feats and logits must agree in batch and spatial size"),
    "spatial": (lambda: (_r(1, 4, 8, 8), _r(1, 3, 8, 7)), ValueError, "feats and logits must agree in batch and spatial size"),
    "dtype": (lambda: (_r(1, 4, 8, 8), _r(1, 3, 8, 8).double()), TypeError, "logits is torch.float64 but feats is torch.float32"),
    "int": (lambda: (_r(1, 4, 8, 8), torch.ones(1, 3, 8, 8, dtype=torch.int64)), TypeError, "logits must be float16"),
    "empty": (lambda: (_r(1, 0, 8, 8), _r(1, 3, 8, 8)), ValueError, "feats is empty"),
    "empty-K": (lambda: (_r(1, 4, 8, 8), _r(1, 0, 8, 8)), ValueError, "logits is empty"),
    "nan-feats": (lambda: (_with(_r(1, 4, 8, 8), (0, 1, 2, 3), float("nan")), _r(1, 3, 8, 8)), ValueError, "feats (shape (1, 4, 8, 8)) contains NaN"),
    "inf-feats": (lambda: (_with(_r(1, 4, 8, 8), (0, 1, 2, 3), float("inf")), _r(1, 3, 8, 8)), ValueError, "feats (shape (1, 4, 8, 8)) contains NaN or infinite"),
    "nan-logits": (lambda: (_r(1, 4, 8, 8), _with(_r(1, 3, 8, 8), (0, 1, 2, 3), float("nan"))), ValueError, "logits (shape (1, 3, 8, 8)) contains NaN"),
    "posinf-logits": (lambda: (_r(1, 4, 8, 8), _with(_r(1, 3, 8, 8), (0, 1, 2, 3), float("inf"))), ValueError, "contains +inf"),
    "not-tensor": (lambda: ([1.0], _r(1, 3, 8, 8)), TypeError, "feats must be a torch.Tensor"),
}


@pytest.mark.parametrize("fn_name", ["semantic_pool", "semantic_pool_regions"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, fn_name):
    make, exc, msg = BAD[case]
    feats, logits = make()
    with pytest.raises(exc, match=f"fastctx.{fn_name}: .*" + msg.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        getattr(fastctx, fn_name)(feats, logits, backend="cpu")


def test_named_backend_never_falls_back():
    with pytest.raises(fastctx.BackendUnavailableError, match="fastctx.semantic_pool: backend 'cuda'"):
        fastctx.semantic_pool(_r(1, 4, 8, 8), _r(1, 3, 8, 8), backend="cuda")


def test_compiled_ops_check_their_inputs():
    regions, labels = _r(1, 4, 3), torch.zeros(1, 5, 6, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, K\) with K = 3"):
        torch.ops.fastctx.sp_gather(regions, _with(labels, (0, 2, 2), 3), torch.float32)
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, K\)"):
        torch.ops.fastctx.sp_scatter(_r(1, 4, 5, 6), _with(labels, (0, 0, 0), -1), 3)
    with pytest.raises(RuntimeError, match="labels must be int64"):
        torch.ops.fastctx.sp_gather(regions, labels.int(), torch.float32)
    with pytest.raises(RuntimeError, match=r"feats and logits must agree"):
        torch.ops.fastctx.sp_fwd(_r(1, 4, 5, 6), _r(2, 3, 5, 6))
    with pytest.raises(RuntimeError, match=r"dregions must be"):
        torch.ops.fastctx.sp_bwd(_r(1, 4, 2), _r(1, 4, 5, 6), labels, _r(1, 5, 6), regions)
    # the argument checks of csrc/cpu/common.h: op, stage, argument, shape / dtype
    with pytest.raises(RuntimeError, match=r"fastctx.semantic_pool \(sp_fwd\): logits has dtype Double but feats has dtype Float"):
        torch.ops.fastctx.sp_fwd(_r(1, 4, 5, 6), _r(1, 3, 5, 6).double())
    with pytest.raises(RuntimeError, match=r"fastctx.semantic_pool \(sp_fwd\): feats must be 4-D \[B, C, H, W\], got shape \[4, 5, 6\]"):
        torch.ops.fastctx.sp_fwd(_r(4, 5, 6), _r(1, 3, 5, 6))
    with pytest.raises(RuntimeError, match=r"fastctx.semantic_pool \(sp_scatter\): dpooled must be float16, bfloat16, float32 or float64, got Long"):
        torch.ops.fastctx.sp_scatter(torch.zeros(1, 4, 5, 6, dtype=torch.int64), labels, 3)
    with pytest.raises(RuntimeError, match=r"fastctx.semantic_pool \(sp_gather\): labels must be 3-D \[B, H, W\], got shape \[5, 6\]"):
        torch.ops.fastctx.sp_gather(regions, labels[0], torch.float32)
