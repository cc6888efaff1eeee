"""Where each backend's host functions live: one resolver for every op."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from fastctx import _ext


def kernels(op: str, backend: str, compiled: tuple[str, str], triton: tuple[str, str, str]) -> tuple[Callable, Callable]:
    """The (forward, backward) host functions of ``op`` for ``backend``.

    Args:
        op (str): the public name, for error messages.
        backend (str): "cpu", "cuda" or "triton".
        compiled (tuple): names of the compiled ops in ``torch.ops.fastctx`` (fwd, bwd).
        triton (tuple): module, fwd function and bwd function of the Triton host code.
    """
    if backend == "triton":
        module, fwd, bwd = triton
        mod = importlib.import_module(module)
        return getattr(mod, fwd), getattr(mod, bwd)
    _ext.require(compiled[0], "CPU" if backend == "cpu" else "CUDA", f"fastctx.{op}")
    return getattr(torch.ops.fastctx, compiled[0]), getattr(torch.ops.fastctx, compiled[1])


def keep_weights(backend: str, *inputs: torch.Tensor) -> bool:
    """Whether an attention forward keeps its softmax weights for the backward (region_attention,
    interlaced_attention): the compiled kernels do, when a backward can follow, and their backward
    reads them instead of recomputing them (the reference's autograd keeps them too); Triton's
    backward recomputes them from the log-sum-exp. region_attention adds a condition on the number
    of keys (``fastctx.ops.ocr.ra_keep_weights``)."""
    return backend != "triton" and torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
