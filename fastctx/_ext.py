"""Loading the compiled extension ``fastctx._C``.

``import fastctx`` never fails because the extension is missing: the compiled backends ("cpu",
"cuda") then decline with the reason, and calling one by name raises :class:`ExtensionMissingError`
with the command that builds it.
"""

from __future__ import annotations

import functools

import torch

BUILD_HINT = (
    "build it from the repository root with `make install` (or, with torch installed, "
    "`pip install --no-build-isolation .`); set FASTCTX_BUILD_CUDA=1 to require the CUDA kernels"
)


class ExtensionMissingError(RuntimeError):
    """The compiled extension (or its CUDA part) is not available."""


@functools.cache
def _load() -> tuple[bool, str]:
    try:
        from fastctx import _C  # noqa: F401  (importing registers the torch.ops.fastctx.* kernels)
    except ImportError as e:
        return False, f"the compiled extension fastctx._C is not built ({e}); {BUILD_HINT}"
    return True, ""


def available() -> tuple[bool, str]:
    """(True, "") when ``fastctx._C`` imports, else (False, why and how to fix)."""
    return _load()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``torch.ops.fastctx.<op>`` has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    if not _load()[0]:
        return False
    return _registered(op, dispatch_key)


@functools.cache
def _registered(op: str, dispatch_key: str) -> bool:
    # The kernels register when fastctx._C is imported (once, _load), so the answer is cached: the
    # dispatcher's lookup took ~13 us, three per forward+backward call of an op (uncached: 17% of
    # a criss-cross forward+backward's host time on small maps, measured on the 2-core CPU).
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastctx::{op}", dispatch_key)


def require(op: str, dispatch_key: str, public_name: str) -> None:
    """Raise :class:`ExtensionMissingError` unless ``op`` has a compiled ``dispatch_key`` kernel."""
    ok, why = _load()
    if not ok:
        raise ExtensionMissingError(f"{public_name}: {why}")
    if not has_kernel(op, dispatch_key):
        what = "CUDA kernels" if dispatch_key == "CUDA" else "CPU kernels"
        raise ExtensionMissingError(
            f"{public_name}: fastctx._C was built without {what} for {op}; {BUILD_HINT}"
        )
