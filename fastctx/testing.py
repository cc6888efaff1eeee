"""Comparison helpers shared by the tests and the benchmark's parity check."""

from __future__ import annotations

import torch

#: (atol, rtol) per dtype, against a float64 reference; atol is relative to max(1, max|ref|).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (4e-3, 1e-2),
    torch.bfloat16: (2e-2, 4e-2),
}


def mismatch(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str, scale: float = 1.0
) -> str | None:
    """None when ``actual`` matches ``expected`` within the row of ``dtype``, else a report of the
    worst elements. The absolute tolerance scales with ``max(1, max|expected|)`` so that sums of
    many terms (gradients of keys and values) are judged relative to their size. NaN never passes.
    """
    if actual.shape != expected.shape:
        return f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol, rtol = (t * scale for t in TOLERANCES[dtype])  # scale: widened for whole networks
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    atol = atol * max(1.0, float(e.abs().max()) if e.numel() else 1.0)
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs())  # NaN compares False, so it is bad
    if not bool(bad.any()):
        return None
    idx = torch.nonzero(bad)[:5]
    rows = "\n".join(
        f"  at {tuple(i.tolist())}: got {a[tuple(i)].item():.6g}, expected {e[tuple(i)].item():.6g}"
        for i in idx
    )
    worst = float(torch.nan_to_num(err, nan=float("inf")).max())
    return (
        f"{name}: {int(bad.sum())} of {bad.numel()} elements differ "
        f"(atol {atol:.3g}, rtol {rtol:.3g}, worst |diff| {worst:.3g}):\n{rows}"
    )
