"""Backend choice that explains itself.

Backends, by name:

========== ==================================================================================
reference  ``python_ref``: pure PyTorch (einsum/matmul), any device, autograd through PyTorch.
cpu        the compiled C++ kernels of ``fastctx._C`` on CPU tensors.
cuda       the compiled CUDA kernels of ``fastctx._C`` on CUDA tensors.
triton     the Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
           (slow; for tests only, so never chosen automatically on CPU).
========== ==================================================================================

``backend=None`` picks the first backend of :data:`ORDER` for the tensors' device that can run
the op (on CUDA tensors the reference first for the ops and dtypes of
:data:`REFERENCE_FIRST_ON_CUDA`, and never "cuda" for the ops of
:data:`CUDA_SLOWER_THAN_REFERENCE` and :data:`CUDA_NOT_YET_RUN`);
:func:`explain` says why each of the others declined. An explicitly named backend (the
``backend=`` argument, :func:`use_backend` or ``FASTCTX_BACKEND``) that cannot run raises
:class:`BackendUnavailableError`: it never falls back. :func:`last_backend` tells which backend
the most recent call of an op used.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from fastctx import _ext

BACKENDS = ("reference", "cpu", "cuda", "triton")

#: Order of preference for ``backend=None``, by device type.
ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}


_ALL = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: Ops whose fused CUDA-tensor kernels measured slower than the reference, forward+backward at the
#: models' sizes on NVIDIA H200 / H100 (bench/results/h200-session9, -session10, -session11), with the dtypes
#: where they did (op -> (dtypes, what was measured)): ``backend=None`` takes the reference for
#: those on CUDA tensors until the kernels win. Name "triton" (or "cuda") to run the kernels
#: anyway: they often hold less memory.
REFERENCE_FIRST_ON_CUDA: dict[str, tuple[tuple[torch.dtype, ...], str]] = {
    "criss_cross_attention": (
        (torch.float32, torch.float64),
        "triton 0.65x the reference's speed at 97x97 float32 through the op (H100, session 11; the "
        "float32 scratch backward since: 0.99x in the sweep of the host functions, H200); float16 2.05x"),
    "region_attention": (_ALL, "triton 0.09-0.52x the reference's speed in float32, 0.82-1.53x in float16"),
    "interlaced_attention": (
        (torch.float32, torch.float64, torch.bfloat16),
        "triton 0.49-1.57x the reference's speed in float32 (ISANet's sizes, H200 sweep, session 11); "
        "bfloat16 not timed; float16 through the op 1.13-1.56x"),
    "pyramid_pool": (_ALL, "triton 0.76-0.91x the reference's speed in float32, 0.63-0.82x in float16"),
    "pyramid_attention": (_ALL, "triton 0.41-0.45x the reference's speed in float32, 0.94-0.96x in float16"),
}


#: Ops whose compiled CUDA kernels (the "cuda" backend) measured slower than the reference,
#: forward+backward at the models' sizes, in every dtype timed (op -> what was measured):
#: ``backend=None`` never takes "cuda" for them, so a machine without Triton gets the reference,
#: not these. Name ``backend="cuda"`` to run them.
CUDA_SLOWER_THAN_REFERENCE: dict[str, str] = {
    "criss_cross_attention": (
        "the CUDA C++ kernels 0.07-0.10x the reference's speed at 65x129 and 97x97, float32 and "
        "float16 (H100, session 11; H200 sessions 9-10: 0.06-0.16x)"),
}


#: Ops whose compiled CUDA kernels have not yet run on a GPU (written in sessions without one;
#: their parity tests run on the first GPU): ``backend=None`` never takes "cuda" for them. Name
#: ``backend="cuda"`` to run them.
CUDA_NOT_YET_RUN: dict[str, str] = {
    op: f"the CUDA C++ {what} compiles in CI and passes its tests there under a CPU emulation of CUDA "
        f"({test}), but has not run on a GPU yet (session 18 had none)"
    for op, what, test in (
        ("semantic_pool", "semantic pool", "tests/test_semantic_pool_cuda_emu.py"),
        ("semantic_pool_regions", "semantic pool", "tests/test_semantic_pool_cuda_emu.py"),
        ("spatial_gather", "spatial gather", "tests/test_spatial_gather_cuda_emu.py"),
        ("region_attention", "region attention", "tests/test_region_attention_cuda_emu.py"),
    )
}


def reference_first(op: str, device_type: str, dtype: torch.dtype) -> str | None:
    """Why ``backend=None`` takes the reference first for ``op`` on these tensors, or None."""
    entry = REFERENCE_FIRST_ON_CUDA.get(op) if device_type == "cuda" else None
    return entry[1] if entry is not None and dtype in entry[0] else None


class BackendUnavailableError(RuntimeError):
    """A backend that was asked for by name cannot run this call."""


@dataclass(frozen=True)
class OpSupport:
    """Which backends implement one op, and their dtypes.

    Attributes:
        compiled (str | None): name of the compiled op in ``torch.ops.fastctx`` whose CPU/CUDA
            kernels serve the "cpu"/"cuda" backends, or None when the op has no compiled kernels.
        triton (bool): whether a Triton kernel exists.
        triton_dtypes (tuple): dtypes the Triton kernels take.
    """

    compiled: str | None = None
    triton: bool = False
    triton_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    compiled_dtypes: tuple[torch.dtype, ...] = field(
        default=(torch.float64, torch.float32, torch.float16, torch.bfloat16)
    )


_OPS: dict[str, OpSupport] = {}


def register_op(op: str, support: OpSupport) -> None:
    """Declare the backends of ``op`` (called once by each op's module)."""
    _OPS[op] = support


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def why_not(op: str, backend: str, device_type: str, dtype: torch.dtype) -> str | None:
    """None when ``backend`` can run ``op`` on tensors of this device type and dtype, else why not."""
    support = _OPS[op]
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if device_type != backend:
            return f"the '{backend}' backend runs on {backend} tensors, these are on {device_type}"
        if support.compiled is None:
            return f"no compiled {backend} kernel for {op} yet"
        ok, reason = _ext.available()
        if not ok:
            return reason
        key = "CPU" if backend == "cpu" else "CUDA"
        if not _ext.has_kernel(support.compiled, key):
            return f"fastctx._C was built without {key} kernels ({_ext.BUILD_HINT})"
        if dtype not in support.compiled_dtypes:
            return f"the '{backend}' kernels of {op} do not take {dtype}"
        return None
    # triton
    if not support.triton:
        return f"no Triton kernel for {op} yet"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    if device_type not in ("cpu", "cuda"):
        return f"Triton does not run on {device_type} tensors"
    if dtype not in support.triton_dtypes:
        return f"the Triton kernels of {op} do not take {dtype}"
    return None


_default: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastctx_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager: calls inside it that pass ``backend=None`` use ``name``.

    ``name=None`` restores automatic choice inside the block. Example::

        with fastctx.use_backend("triton"):
            out = fastctx.criss_cross_attention(q, k, v)
    """
    if name is not None:
        _check_name(name, "fastctx.use_backend")
    token = _default.set(name if name is not None else "")
    try:
        yield
    finally:
        _default.reset(token)


def default_backend() -> str | None:
    """The backend named by :func:`use_backend` or, outside it, by ``FASTCTX_BACKEND``; or None."""
    name = _default.get()
    if name is None:  # not inside use_backend(): the environment decides
        name = os.environ.get("FASTCTX_BACKEND", "").strip()
        if name:
            _check_name(name, "FASTCTX_BACKEND")
    return name or None


def _order(op: str, device_type: str, dtype: torch.dtype) -> tuple[str, ...]:
    order = ORDER.get(device_type, ("reference",))
    if device_type == "cuda" and (op in CUDA_SLOWER_THAN_REFERENCE or op in CUDA_NOT_YET_RUN):
        order = tuple(b for b in order if b != "cuda")
    if reference_first(op, device_type, dtype) is not None:
        order = ("reference",) + tuple(b for b in order if b != "reference")
    return order


@torch.compiler.assume_constant_result
def _choose(op: str, device_type: str, dtype: torch.dtype, requested: str | None) -> str:
    if requested is not None:
        reason = why_not(op, requested, device_type, dtype)
        if reason is not None:
            raise BackendUnavailableError(
                f"fastctx.{op}: backend '{requested}' cannot run this call: {reason}"
            )
        return requested
    for name in _order(op, device_type, dtype):
        if why_not(op, name, device_type, dtype) is None:
            return name
    raise BackendUnavailableError(f"fastctx.{op}: no backend can run on {device_type}")  # unreachable


def choose_backend(op: str, tensor: torch.Tensor, backend: str | None = None) -> str:
    """The backend that runs ``op`` for inputs like ``tensor`` (device and dtype decide).

    Args:
        op (str): the op's public name, e.g. ``"criss_cross_attention"``.
        tensor (Tensor): a representative input.
        backend (str | None): an explicit request; it raises instead of falling back. Default:
            :func:`default_backend`, then the first of :data:`ORDER` that can run (the
            reference first on CUDA tensors for the ops and dtypes of
            :data:`REFERENCE_FIRST_ON_CUDA`).
    """
    requested = _check_name(backend, f"fastctx.{op}") if backend is not None else default_backend()
    name = _choose(op, tensor.device.type, tensor.dtype, requested)
    _record(op, name)
    return name


def explain(op: str, tensor: torch.Tensor) -> dict[str, str]:
    """For each backend: "ok" or why it declines ``op`` on inputs like ``tensor``.

    Example::

        >>> fastctx.explain("criss_cross_attention", torch.randn(1, 8, 5, 5))
        {'reference': 'ok', 'cpu': 'ok', 'cuda': "the 'cuda' backend runs on cuda tensors, ...", ...}
    """
    out = {}
    for name in BACKENDS:
        reason = why_not(op, name, tensor.device.type, tensor.dtype)
        out[name] = "ok" if reason is None else reason
    return out


_last = threading.local()


def _record(op: str, name: str) -> None:
    if not hasattr(_last, "ops"):
        _last.ops = {}
    _last.ops[op] = name
    _last.any = name


def last_backend(op: str | None = None) -> str | None:
    """The backend of the most recent call (of ``op``, or of any op) in this thread, or None.

    Under ``torch.compile`` the choice is made, and recorded, when the function is traced.
    """
    if op is None:
        return getattr(_last, "any", None)
    return getattr(_last, "ops", {}).get(op)
