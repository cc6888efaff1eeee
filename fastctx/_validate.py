"""Input checks shared by every op: clear errors that name the op, the argument and the shapes.

NaN inputs are refused with a ValueError. That check reads the inputs once (and synchronises a
GPU), so it can be turned off with ``FASTCTX_CHECK_NAN=0``; it is skipped while torch.compile or
export traces a function.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate, and keep statistics such as lse, in: float64 for float64,
    float32 for the rest (``acc_dtype`` of csrc/ops/checks.h)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def tensor(op: str, name: str, t: object, ndim: int, layout: str) -> Tensor:
    """``t`` must be a floating-point tensor of rank ``ndim`` (``layout`` names the dims)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"fastctx.{op}: {name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(
            f"fastctx.{op}: {name} must be a {ndim}-D tensor {layout}, got shape {_shape(t)}"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"fastctx.{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
        )
    if t.numel() == 0:
        raise ValueError(f"fastctx.{op}: {name} is empty (shape {_shape(t)})")
    return t


def same(op: str, **tensors: Tensor) -> None:
    """All ``tensors`` share one device and one dtype (any floating dtypes under autocast, which
    casts them all to its own, as matmul does)."""
    items = list(tensors.items())
    n0, t0 = items[0]
    dev = t0.device.type
    mixed_ok = dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev)
    for n, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(
                f"fastctx.{op}: {n} is on {t.device} but {n0} is on {t0.device}; "
                "all inputs must be on one device"
            )
        if t.dtype != t0.dtype and not (mixed_ok and t.is_floating_point() and t0.is_floating_point()):
            raise TypeError(
                f"fastctx.{op}: {n} is {t.dtype} but {n0} is {t0.dtype}; all inputs must share a dtype"
            )


def qkv_map(op: str, q: object, k: object, v: object) -> None:
    """q, k ``[B, Cqk, H, W]`` and v ``[B, Cv, H, W]`` on one map: one device, one dtype."""
    tensor(op, "q", q, 4, "[B, Cqk, H, W]")
    tensor(op, "k", k, 4, "[B, Cqk, H, W]")
    tensor(op, "v", v, 4, "[B, Cv, H, W]")
    same(op, q=q, k=k, v=v)
    if q.shape != k.shape:
        raise ValueError(f"fastctx.{op}: q and k must have the same shape, got {_shape(q)} and {_shape(k)}")
    if (v.shape[0], v.shape[2], v.shape[3]) != (q.shape[0], q.shape[2], q.shape[3]):
        raise ValueError(
            f"fastctx.{op}: v must match q in batch and spatial size, got q {_shape(q)} and v {_shape(v)}"
        )


def feats_logits(op: str, feats: object, logits: object) -> None:
    """feats ``[B, C, H, W]`` and logits ``[B, K, H, W]`` of one map; NaN-free (logits may be -inf)."""
    tensor(op, "feats", feats, 4, "[B, C, H, W]")
    tensor(op, "logits", logits, 4, "[B, K, H, W]")
    same(op, feats=feats, logits=logits)
    if (feats.shape[0], *feats.shape[2:]) != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"fastctx.{op}: feats and logits must agree in batch and spatial size, got feats "
            f"{_shape(feats)} and logits {_shape(logits)}"
        )
    no_nan(op, feats=feats)
    no_nan(op, allow_inf=True, logits=logits)


def check_nan_enabled() -> bool:
    if torch.compiler.is_compiling():
        return False
    return os.environ.get("FASTCTX_CHECK_NAN", "1") != "0"


def no_nan(op: str, allow_inf: bool = False, **tensors: Tensor) -> None:
    """No NaN in ``tensors`` (and no infinity unless ``allow_inf``); see the module docstring.

    One ``aminmax`` pass per tensor: a NaN anywhere makes both extremes NaN, an infinity is an
    extreme. (``~isfinite(t).any()`` gives the same answer, but on CPU it ran 30x slower: 43 ms
    against 1.5 ms on a 2 x 512 x 64 x 128 float32 tensor, two threads, most of a
    region_attention call at that size.)
    """
    if not check_nan_enabled():
        return
    for n, t in tensors.items():
        if t.numel() == 0 or t.device.type == "meta":  # meta tensors have no values to check
            continue
        extremes = _extremes(t)
        bad = torch.isnan(extremes) if allow_inf else ~torch.isfinite(extremes)
        if bool(bad.any()):
            what = "NaN" if allow_inf else "NaN or infinite values"
            raise ValueError(f"fastctx.{op}: {n} (shape {_shape(t)}) contains {what}")


def _extremes(t: Tensor) -> Tensor:
    """[min, max] of ``t`` (NaN if it holds one), without a copy of ``t``. ``aminmax`` copies a
    non-contiguous input first: on CPU, 34 ms for a channels_last 2 x 512 x 65 x 129 float32
    map against 0.48 ms contiguous, and 13.8 ms for a channel slice (session 15). Its dims
    ordered by stride, a channels_last map (any dense permutation) is contiguous; other strided
    views take ``amin`` and ``amax``, which read the strides (1.3 ms for that slice)."""
    view = t.permute(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
    if view.is_contiguous():
        return torch.stack(torch.aminmax(view))
    return torch.stack((t.amin(), t.amax()))


def no_posinf(op: str, name: str, t: Tensor, why: str) -> None:
    """No ``+inf`` in ``t`` (where ``-inf`` is meaningful: a masked key, an absent class); skipped
    with the NaN checks, and for meta tensors."""
    if check_nan_enabled() and t.device.type != "meta" and bool(torch.isposinf(t).any()):
        raise ValueError(f"fastctx.{op}: {name} (shape {_shape(t)}) contains +inf; {why}")


def scale(op: str, value: object, default: float | None = None) -> float:
    """A finite python float (``None`` -> ``default``)."""
    if value is None:
        if default is None:
            raise TypeError(f"fastctx.{op}: scale must be a number, got None")
        return default
    if isinstance(value, Tensor) or not isinstance(value, (int, float)):
        raise TypeError(f"fastctx.{op}: scale must be a python number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"fastctx.{op}: scale must be finite, got {value}")
    return value


def autocast(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Under an autocast region, cast the inputs to its lower-precision dtype (as matmul does)."""
    t0 = tensors[0]
    dev = t0.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return tuple(t.to(dt) if t.is_floating_point() else t for t in tensors)
    return tensors
