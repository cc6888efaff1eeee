"""Criss-cross attention in Triton: forward and backward as two passes of the line-attention
kernels (:mod:`fastctx.triton._line`).

Layout NCHW, any strides (channels_last, slices); outputs are allocated NCHW-contiguous. Contract
(OPERATORS.md, section 1): pixel (i, j) attends to its column (i', j), i' != i, and its whole row
(i, j'); one softmax over the H + W - 1 energies ``scale * <q[:, i, j], k[:, pos]>``; ``lse`` is
its logsumexp (float32).

The criss-cross of a pixel is the union of two lines: its column without itself, then its row.

- forward: the column pass gives each pixel its column-normalized output and column logsumexp
  (float32 partials, channels-last); the row pass computes the row part and merges the two in
  its epilogue (weights ``exp(lse_part - lse)``), writing ``out`` and ``lse``.
- backward, no atomics: ``D = <dout, out>``; with the full ``lse`` and ``D`` each line's part of
  the gradients is an ordinary attention backward: the column pass writes float32 partial
  gradients, the row pass adds them in its epilogue.

Both passes read channels-last copies of the inputs by default (``channels_last=True``: one read
and write of q, k, v, and of dout in the backward, unless they are channels-last already; each
pixel's channel vector contiguous for the dots; reading NCHW directly measured 1.5-2.3x slower
on an H200).
float32 dots use ``F32_DOT`` ("tf32x3": three TF32 products, float32's accuracy).
"""

from __future__ import annotations

import functools

import torch

from fastctx.triton import _line
from fastctx.triton._common import bwd_delta, check_extent

def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            "fastctx.criss_cross_attention: the Triton backend supports float32, float16 and "
            f"bfloat16 inputs, got {t.dtype} (use the CPU/CUDA backend for float64)")


@functools.lru_cache(maxsize=256)
def _config(L: int, Cqk: int, Cv: int, dtype: torch.dtype) -> dict:
    """Block sizes per kernel ("fwd", "dq", and "dkdv" or "mm") of a pass over lines of L
    positions (tl.dot needs every dim >= 16): BLOCK_M queries and BLOCK_N keys per step, the Cqk
    channels in one block up to 128 (else chunks of 64), Cv chunks of BLOCK_CV.

    Timed on an H200 (bench/results/h200-session10, bench/cc_sweep.py, since replaced by
    bench/line_sweep.py: configs side by side, each change measured alone at 97x97 and 65x129):
    float16 forward 4 warps (0.157 vs 0.204 ms with 8), dk and dv in one launch with Cv 512 in
    one block (<dout, v> once per key and query block instead of once per Cv chunk:
    forward+backward 0.644 vs 0.836 ms), 64 queries per dk/dv step (0.604 vs 0.644); float32
    dots "tf32x3" (float32's accuracy; forward+backward 3.7 vs 7.1 ms with "ieee" in the
    backward), forward 32 queries x 128 Cv (0.68 vs 0.90 ms). float32 dq with 64 queries and
    dk/dv with 64 keys measured faster too (forward+backward 2.7 ms with both) but each of them
    alone faults (illegal memory access) on a 17x33 map with Cqk 8 (H200 run 3; H100, session
    11, bench/cc_fault.py): the backward keeps 32 x 32. Compiled for sm_90 without a GPU
    (bench/compile_check.py, ptxas -v): the float32 dq and dk kernels spill up to ~110 bytes per
    thread, the float16 dk/dv kernel 16; faster than the spill-free configs all the same.
    float32 lines short enough (:func:`fastctx.triton._line.scratch_fits`) take the engine's
    scratch backward (p and dE stored once per line, dk/dv as products with them): forward+backward
    2.057 vs 3.601 ms at 97x97 (H200, session 11, bench/line_sweep.py; float16 measured no
    faster with it: 0.612 vs 0.606 ms at 97x97, 0.655 vs 0.596 at 65x129). Cached per shape
    (callers must not modify it).
    """
    blocks = functools.partial(_line.blocks, L, Cqk, Cv)
    if dtype == torch.float32:  # dk and dv in one launch would need 300 KB of shared memory: Cv in chunks
        if _line.scratch_fits(L, Cv):  # the scratch backward: 0.99x vs 0.57x the reference
            return {"fwd": blocks(32, 32, 128, 8), "dq": blocks(32, 32, 64, 8),
                    "mm": _line.mm_blocks(L, 32, 32, 64, 4)}
        return {"fwd": blocks(32, 32, 128, 8), "dq": blocks(32, 32, 64, 8),
                "dkdv": blocks(32, 32, 64, 8)}
    return {"fwd": blocks(64, 64, 128, 4), "dq": blocks(64, 32, 128, 8),
            "dkdv": blocks(64, 32, 512, 8)}


def _check_inputs(*tensors: torch.Tensor) -> None:
    """The extent check of the caller's tensors, once per host function call (the tensors
    fastctx allocates, NCHW or channels-last, span no more than the inputs of their shape)."""
    for t in tensors:
        check_extent("fastctx.criss_cross_attention", t)


def _partial(B: int, C: int, H: int, W: int, device) -> torch.Tensor:
    """A float32 [B, C, H, W] partial result of the column pass, channels-last."""
    return torch.empty((B, H, W, C), dtype=torch.float32, device=device).permute(0, 3, 1, 2)


def _fwd(q, k, v, scale: float, cfg: dict | None = None, channels_last: bool = True):
    _check_dtype(q)
    B, Cqk, H, W = q.shape
    Cv = v.shape[1]
    _check_inputs(q, k, v)
    if channels_last:
        q, k, v = _line.channels_last(q, k, v)
    out = torch.empty((B, Cv, H, W), dtype=v.dtype, device=v.device)
    lse = torch.empty((B, H, W), dtype=torch.float32, device=v.device)
    o_col, lse_col = out, lse  # unused when H == 1 (no column keys: the row pass alone)
    if H > 1:
        o_col = _partial(B, Cv, H, W, v.device)
        lse_col = torch.empty((B, H, W), dtype=torch.float32, device=v.device)
        _line.fwd(q, k, v, o_col, lse_col, o_col, lse_col, scale, _line.column_geometry(H, W),
                  False, True, False, (cfg or _config(H, Cqk, Cv, q.dtype))["fwd"])
    _line.fwd(q, k, v, out, lse, o_col, lse_col, scale, _line.row_geometry(H, W), False, False,
              H > 1, (cfg or _config(W, Cqk, Cv, q.dtype))["fwd"])
    return out, lse


def _bwd(dout, q, k, v, out, lse, scale: float, cfg: dict | None = None,
         channels_last: bool = True):
    _check_dtype(q)
    B, Cqk, H, W = q.shape
    Cv = v.shape[1]
    if dout.dtype != v.dtype:
        dout = dout.to(v.dtype)
    _check_inputs(q, k, v, dout, out)
    lse = lse.contiguous()
    delta = bwd_delta(dout, out)

    grads = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if channels_last:
        q, k, v, dout = _line.channels_last(q, k, v, dout)
    parts = None
    if H > 1:
        parts = tuple(_partial(B, t.shape[1], H, W, t.device) for t in (q, k, v))
        _line.bwd(q, k, v, dout, lse, delta, parts, None, scale, _line.column_geometry(H, W),
                  False, True, cfg or _config(H, Cqk, Cv, q.dtype))
    _line.bwd(q, k, v, dout, lse, delta, grads, parts, scale, _line.row_geometry(H, W), False,
              False, cfg or _config(W, Cqk, Cv, q.dtype))
    return grads


def cc_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Criss-cross attention forward.

    Args:
        q (Tensor): [B, Cqk, H, W] queries, any strides.
        k (Tensor): [B, Cqk, H, W] keys.
        v (Tensor): [B, Cv, H, W] values.
        scale (float): multiplies the energies ``<q, k>``.

    Returns:
        out [B, Cv, H, W] (dtype of v, NCHW-contiguous), lse [B, H, W] float32.
    """
    return _fwd(q, k, v, scale)


def cc_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           out: torch.Tensor, lse: torch.Tensor,
           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Criss-cross attention backward from the saved ``out`` and ``lse`` (no atomics).

    Args:
        dout (Tensor): [B, Cv, H, W] gradient of ``out``, any strides.
        q, k, v (Tensor): the forward inputs.
        out (Tensor): [B, Cv, H, W] and lse (Tensor): [B, H, W] from :func:`cc_fwd`.
        scale (float): the forward's scale.

    Returns:
        dq, dk, dv: NCHW-contiguous, shapes and dtypes of q, k, v.
    """
    return _bwd(dout, q, k, v, out, lse, scale)
