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
    interlaced_attention): the CPU kernels do, when a backward can follow, and their backward
    reads them instead of recomputing them (the reference's autograd keeps them too); the Triton
    and CUDA backwards recompute them. region_attention adds a condition on the number of keys
    (``fastctx.ops.ocr.ra_keep_weights``)."""
    return backend == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


class FusedOp:
    """A ``torch.library`` custom op (``fastctx::name``) that eager calls reach without the
    dispatcher.

    Under ``torch.compile`` (and for tensor subclasses: fake, functional, distributed tensors)
    a call goes through the custom op, with its fake implementation and registered autograd.
    Plain eager calls run the same Python function inside a ``torch.autograd.Function`` built
    from the same ``setup_context`` and ``backward``: the custom op's Python dispatch and
    generated autograd cost ~140 us per forward+backward on the 2-core CPU (criss-cross on 4x4
    maps through the API: 247 vs 105 us) and set much of the time of small GPU calls.
    """

    def __init__(self, name: str, fn: Callable):
        self.op = torch.library.custom_op(name, fn, mutates_args=())
        self.fn = fn
        self._function: type[torch.autograd.Function] | None = None

    def register_fake(self, fake: Callable) -> Callable:
        return self.op.register_fake(fake)

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        fn = self.fn

        def forward(ctx, *args):
            # the old-style forward (ctx first), not a setup_context staticmethod: with one,
            # torch >= 2.13 binds the arguments through inspect.signature on every call (~20 us)
            output = fn(*args)
            setup_context(ctx, args, output)
            return output

        self._function = type(f"{fn.__name__}_eager", (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(backward),
        })

    def __call__(self, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not tensors or torch.compiler.is_compiling() or any(type(t) not in _PLAIN for t in tensors):
            return self.op(*args)  # also FX proxies and other stand-ins that are not tensors
        if self._function is not None:
            return self._function.apply(*args)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return self.op(*args)  # no autograd registered: the custom op says so
        return self.fn(*args)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def fused_op(name: str) -> Callable[[Callable], FusedOp]:
    """Decorator: ``fn`` becomes the :class:`FusedOp` ``name`` (no argument is mutated)."""
    return lambda fn: FusedOp(name, fn)
