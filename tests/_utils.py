"""Test helpers: the shared tolerance rows and a comparison that shows the worst elements."""

from __future__ import annotations

import os

import pytest
import torch

from fastctx.testing import TOLERANCES, mismatch

__all__ = ["AUTO", "TOLERANCES", "DTYPE_NAMES", "allocations", "assert_close", "has_triton", "has_compiled"]

DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """``actual`` matches the float64 ``expected`` within the tolerance row of ``dtype``."""
    report = mismatch(actual, expected, dtype, name)
    if report is not None:
        pytest.fail(report)


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def has_compiled(dispatch_key: str) -> bool:
    from fastctx import _ext

    return _ext.has_kernel("cc_fwd", dispatch_key)


def _auto() -> str:
    from fastctx import _ext

    return "cpu" if _ext.available()[0] else "reference"


#: The backend ``backend=None`` takes for CPU tensors: the compiled kernels when built.
AUTO = _auto()


def allocations(fn) -> list[int]:
    """The sizes in bytes of the CPU tensors (and fastctx kernel scratch) that ``fn()`` allocates,
    in order (fastctx.bench.measure's record of the allocator)."""
    from fastctx.bench.measure import cpu_memory_events

    return [n for n in cpu_memory_events(fn) if n > 0]
