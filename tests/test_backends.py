"""Backend choice: stated order, explicit requests never fall back, the choice is reported."""

from __future__ import annotations

import pytest
import torch

import fastctx
from fastctx import _ext, backends
from tests._utils import AUTO


def _qkv(dtype=torch.float32):
    return torch.randn(1, 4, 5, 6, dtype=dtype), torch.randn(1, 4, 5, 6, dtype=dtype), torch.randn(1, 8, 5, 6, dtype=dtype)


def test_auto_choice_on_cpu_is_the_compiled_kernel():
    fastctx.criss_cross_attention(*_qkv())
    assert fastctx.last_backend("criss_cross_attention") == "cpu"
    assert fastctx.last_backend() == "cpu"


def test_explicit_backend_never_falls_back():
    with pytest.raises(fastctx.BackendUnavailableError, match="backend 'cuda' cannot run.*cuda tensors"):
        fastctx.criss_cross_attention(*_qkv(), backend="cuda")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(fastctx.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        fastctx.criss_cross_attention(*_qkv(), backend="triton")


def test_triton_is_never_chosen_automatically_on_cpu():
    assert "triton" not in backends.ORDER["cpu"]


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fastctx.criss_cross_attention(*_qkv(), backend="fast")
    with pytest.raises(ValueError, match="fastctx.use_backend: unknown backend"):
        with fastctx.use_backend("gpu"):
            pass


def test_use_backend_and_environment(monkeypatch):
    q, k, v = _qkv()
    with fastctx.use_backend("reference"):
        fastctx.criss_cross_attention(q, k, v)
        assert fastctx.last_backend("criss_cross_attention") == "reference"
        with fastctx.use_backend(None):  # automatic again inside
            fastctx.criss_cross_attention(q, k, v)
            assert fastctx.last_backend("criss_cross_attention") == "cpu"
    monkeypatch.setenv("FASTCTX_BACKEND", "reference")
    fastctx.criss_cross_attention(q, k, v)
    assert fastctx.last_backend("criss_cross_attention") == "reference"
    # the argument wins over the environment
    fastctx.criss_cross_attention(q, k, v, backend="cpu")
    assert fastctx.last_backend("criss_cross_attention") == "cpu"
    monkeypatch.setenv("FASTCTX_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTCTX_BACKEND: unknown backend 'nope'"):
        fastctx.criss_cross_attention(q, k, v)


def test_explain_says_why_each_backend_declines(monkeypatch):
    why = fastctx.explain("criss_cross_attention", torch.randn(1, 2, 3, 3))
    assert why["reference"] == "ok" and why["cpu"] == "ok"
    assert "cuda tensors" in why["cuda"]
    monkeypatch.setitem(backends._OPS, "interlaced_attention", backends.OpSupport())  # as if it had no kernels
    why = fastctx.explain("interlaced_attention", torch.randn(1, 2, 3, 3))
    assert "no compiled cpu kernel" in why["cpu"] and "no Triton kernel" in why["triton"]


def test_ops_without_fast_kernels_use_the_reference(monkeypatch):
    monkeypatch.setitem(backends._OPS, "pyramid_pool", backends.OpSupport())  # as if it had no kernels
    x = torch.randn(1, 4, 6, 6)
    fastctx.pyramid_pool(x)
    assert fastctx.last_backend("pyramid_pool") == "reference"
    with pytest.raises(fastctx.BackendUnavailableError, match="no compiled cpu kernel"):
        fastctx.pyramid_pool(x, backend="cpu")


def test_missing_extension_is_explained(monkeypatch):
    # Simulate a machine where fastctx._C was never built.
    monkeypatch.setattr(_ext, "_load", lambda: (False, "the compiled extension fastctx._C is not built (test); " + _ext.BUILD_HINT))
    q, k, v = _qkv()
    with pytest.raises(fastctx.BackendUnavailableError, match="not built.*pip install --no-build-isolation"):
        fastctx.criss_cross_attention(q, k, v, backend="cpu")
    fastctx.criss_cross_attention(q, k, v)  # automatic choice still works, on the reference
    assert fastctx.last_backend("criss_cross_attention") == "reference"
    with pytest.raises(_ext.ExtensionMissingError, match="pip install"):
        _ext.require("cc_fwd", "CPU", "fastctx.criss_cross_attention")


@pytest.mark.parametrize("op", sorted(backends.REFERENCE_FIRST_ON_CUDA))
def test_reference_first_on_cuda_where_the_kernels_measured_slower(op):
    # backend=None on CUDA tensors takes the reference for these ops; a named backend still runs
    assert backends._choose(op, "cuda", torch.float32, None) == "reference"
    assert backends._choose(op, "cuda", torch.float32, "triton") == "triton"
    assert backends._choose(op, "cpu", torch.float32, None) == ("cpu" if _ext.available()[0] else "reference")


@pytest.mark.parametrize("op", ["criss_cross_attention", "semantic_pool", "semantic_pool_regions", "spatial_gather", "region_attention"])
def test_slower_or_unrun_cuda_kernels_never_chosen_automatically(monkeypatch, op):
    # without Triton, backend=None on CUDA tensors skips the CUDA C++ criss-cross kernels (measured
    # slower than the reference in every dtype) and the semantic pool's (not yet run on a GPU) for
    # the reference; named, they still run
    assert set(backends.CUDA_SLOWER_THAN_REFERENCE) <= set(backends._OPS)
    assert set(backends.CUDA_NOT_YET_RUN) <= set(backends._OPS)
    assert op in backends.CUDA_SLOWER_THAN_REFERENCE or op in backends.CUDA_NOT_YET_RUN
    real = backends.why_not

    def why_not(op, backend, device_type, dtype):  # Triton missing, the CUDA kernels built
        if backend == "triton":
            return "triton is not installed (test)"
        return None if backend == "cuda" else real(op, backend, device_type, dtype)

    monkeypatch.setattr(backends, "why_not", why_not)
    for dtype in (torch.float16, torch.float32):
        assert backends._choose(op, "cuda", dtype, None) == "reference"
        assert backends._choose(op, "cuda", dtype, "cuda") == "cuda"
    # an op without an entry would take the CUDA kernels
    monkeypatch.delitem(backends.CUDA_NOT_YET_RUN, "spatial_gather")
    assert "spatial_gather" not in backends.CUDA_SLOWER_THAN_REFERENCE
    assert backends._choose("spatial_gather", "cuda", torch.float16, None) == "cuda"


def test_triton_first_on_cuda_for_the_other_ops():
    for op in ("spatial_gather", "semantic_pool", "semantic_pool_regions"):
        assert op not in backends.REFERENCE_FIRST_ON_CUDA
        assert backends._choose(op, "cuda", torch.float16, None) == "triton"
    assert set(backends.REFERENCE_FIRST_ON_CUDA) <= set(backends._OPS)


def test_reference_first_only_for_the_dtypes_measured_slower():
    # criss-cross: the Triton kernels beat the reference in float16 (h200-session10), not float32
    assert backends._choose("criss_cross_attention", "cuda", torch.float16, None) == "triton"
    assert backends._choose("criss_cross_attention", "cuda", torch.float32, None) == "reference"
    assert backends.reference_first("criss_cross_attention", "cuda", torch.float32)
    assert backends.reference_first("criss_cross_attention", "cuda", torch.float16) is None
    assert backends.reference_first("criss_cross_attention", "cpu", torch.float32) is None
    # interlaced attention: the scratch backward beats the reference in float16 (h200-session11)
    assert backends._choose("interlaced_attention", "cuda", torch.float16, None) == "triton"
    assert backends._choose("interlaced_attention", "cuda", torch.float32, None) == "reference"


def test_kernel_lookup_is_cached(monkeypatch):
    """The dispatcher's has-kernel lookup (~13 us) runs once per (op, dispatch key), not on every
    call: a forward+backward asked it three times."""
    if not _ext.available()[0]:
        pytest.skip("needs the compiled extension")
    calls = []
    real = torch._C._dispatch_has_kernel_for_dispatch_key
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda *a: calls.append(a) or real(*a))
    _ext._registered.cache_clear()
    try:
        assert [_ext.has_kernel("cc_fwd", "CPU") for _ in range(3)] == [True] * 3
        assert calls == [("fastctx::cc_fwd", "CPU")]
    finally:
        _ext._registered.cache_clear()  # no entry computed through the patched lookup survives


def test_info_says_what_backend_none_takes(capsys, monkeypatch):
    from fastctx import cli

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"criss_cross_attention: backend=None takes {AUTO}" in out
    monkeypatch.setenv("FASTCTX_BACKEND", "cuda")  # cannot run on CPU tensors: said, no crash
    assert cli.main(["info"]) == 0
    assert "criss_cross_attention: backend=None takes nothing: fastctx.criss_cross_attention: backend 'cuda' cannot run" in capsys.readouterr().out


def test_fused_op_eager_calls_skip_the_dispatcher(monkeypatch):
    """Eager calls of a fused op run its Python function in an autograd.Function (the custom op's
    dispatch cost ~116 us per forward+backward); fake tensors still go through the custom op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    backend = "cpu" if _ext.available()[0] else pytest.skip("the compiled extension is not built")
    q, k, v = _qkv()
    for t in (q, k, v):
        t.requires_grad_(True)
    out = fastctx.criss_cross_attention(q, k, v, backend=backend)
    assert type(out.grad_fn).__name__ == "_fwd_eagerBackward"
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    monkeypatch.setenv("FASTCTX_CHECK_NAN", "0")  # data-dependent: not for fake tensors
    mode = FakeTensorMode()
    fq, fk, fv = (mode.from_tensor(t.detach()) for t in (q, k, v))
    with mode:
        fake = fastctx.criss_cross_attention(fq, fk, fv, backend=backend)
    assert fake.shape == out.shape
