"""Pyramid pool (ANN) in Triton: forward and backward kernels.

At every scale ``s``, key ``(s, i, j)`` averages rows ``floor(i*H/s) .. ceil((i+1)*H/s)`` and the
same columns (``adaptive_avg_pool2d``'s bins, overlapping when ``H % s != 0``); keys are
flattened row-major and the scales concatenated: ``S = sum(s * s)``. Semantics:
shared/docs/OPERATORS.md section 3. The bins of one call are a small table (first/last row and
column, ``1 / area`` per key), built once per (scales, H, W, device) on the host.

Both kernels are a matmul with the 0/1 bin-membership matrix ``P[n, key]`` (pixels x keys),
generated tile by tile from the table, never stored:

- forward, ``out[c, key] = inv_area[key] * sum_n x[c, n] P[n, key]``: a program owns a block of
  channels, a block of keys and a group of pixels; it reads its pixels once for every scale
  (``tl.dot`` of an x tile [BLOCK_C, BLOCK_N] with a P tile [BLOCK_N, BLOCK_S]). x is read in its
  own dtype through its strides: P is exact in every dtype, and the dot accumulates in float32
  (``input_precision="tf32x3"`` for float32). With one pixel group the program stores the output
  directly; with several (more programs for a small batch) it stores float32 partial sums
  [B, G, C, S] that torch adds over G (deterministic).
- backward, ``dx[c, n] = sum_key dout[c, key] inv_area[key] P[n, key]``: a program owns a block
  of pixels and a block of channels and loops over the keys; float32 operands, ``"tf32x3"`` dot;
  every element of dx is written once, no atomics.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastctx.triton._common import (
    F32_DOT, _INTERPRET, _mm, cdiv, check_extent, dot_f32, heuristics, next_pow2,
)

_OP = "fastctx.pyramid_pool"

_HEURISTICS = {
    # pixels at a constant stride (NCHW-contiguous or channels_last maps): n * stride_w
    "FLAT": lambda a: a["N"] == a["W"] or a["stride_xh"] == a["W"] * a["stride_xw"],
    # float32 dots in float32's accuracy (tf32x3); P is 0/1, exact in the 16-bit types
    "DOT_PRECISION": lambda a: F32_DOT if a["x"].dtype == torch.float32 else "tf32",
    "DOT_F32": lambda a: dot_f32(a["x"].dtype),
}


@triton.jit
def _membership(o_n, W, r0, r1, c0, c1):
    """P[n, key] as booleans [BLOCK_N, BLOCK_S]: pixel o_n = h * W + w lies in the key's bin."""
    h = (o_n // W)[:, None]
    w = (o_n % W)[:, None]
    return (h >= r0[None, :]) & (h < r1[None, :]) & (w >= c0[None, :]) & (w < c1[None, :])


@triton.jit
def _load_bins(bins, o_s, m_s, S):
    """First row, end row, first column, end column [BLOCK_S] (int32) and 1 / area (float32)
    of keys o_s; masked keys get an empty bin and 0."""
    r0 = tl.load(bins + o_s, mask=m_s, other=0)
    r1 = tl.load(bins + S + o_s, mask=m_s, other=0)
    c0 = tl.load(bins + 2 * S + o_s, mask=m_s, other=0)
    c1 = tl.load(bins + 3 * S + o_s, mask=m_s, other=0)
    return r0, r1, c0, c1


@heuristics(_HEURISTICS)
@triton.jit
def _pp_fwd_kernel(
    x, bins, inv, out,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_ob, stride_og, stride_oc, stride_os,
    C, W, N, S, n_per_group,
    N_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    FLAT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """out[b, g, c-block, key-block] = inv_area * sum over pixel group g of x * P.

    Grid: (cdiv(C, BLOCK_C) * N_S, B, G), N_S = cdiv(S, BLOCK_S); group g owns the pixels
    [g * n_per_group, (g + 1) * n_per_group) (n_per_group a multiple of BLOCK_N).
    """
    i_cs = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    i_g = tl.program_id(2).to(tl.int64)
    i_c = i_cs // N_S
    i_s = i_cs % N_S
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    o_s = i_s * BLOCK_S + tl.arange(0, BLOCK_S)  # [BLOCK_S]
    m_c = o_c < C
    m_s = o_s < S
    r0, r1, c0, c1 = _load_bins(bins, o_s, m_s, S)
    p_x = x + i_b * stride_xb + (o_c * stride_xc)[:, None]  # [BLOCK_C, 1]
    n_start = i_g * n_per_group
    n_end = tl.minimum(N, n_start + n_per_group)
    b_acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        m_n = o_n < n_end
        if FLAT:
            o_px = o_n * stride_xw
        else:
            o_px = (o_n // W) * stride_xh + (o_n % W) * stride_xw
        b_x = tl.load(p_x + o_px[None, :], mask=m_c[:, None] & m_n[None, :], other=0.0)  # [BLOCK_C, BLOCK_N]
        # (bool -> float32 -> x's dtype: the interpreter converts bool to bfloat16 wrongly)
        b_p = _membership(o_n, W, r0, r1, c0, c1).to(tl.float32).to(b_x.dtype)  # [BLOCK_N, BLOCK_S]
        b_acc += _mm(b_x, b_p, DOT_PRECISION, DOT_F32)
    b_inv = tl.load(inv + o_s, mask=m_s, other=0.0)  # [BLOCK_S]
    b_acc = b_acc * b_inv[None, :]
    p_o = out + i_b * stride_ob + i_g * stride_og + (o_c * stride_oc)[:, None] + (o_s * stride_os)[None, :]
    tl.store(p_o, b_acc.to(out.dtype.element_ty), mask=m_c[:, None] & m_s[None, :])


@triton.jit
def _pp_bwd_kernel(
    dout, bins, inv, dx,
    stride_db, stride_dc, stride_ds,
    C, W, N, S,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dx[b, c-block, n-block] = sum_key dout * inv_area * P; dx contiguous [B, C, N].

    Grid: (cdiv(N, BLOCK_N), cdiv(C, BLOCK_C), B)
    """
    i_n = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    m_n = o_n < N
    m_c = o_c < C
    p_d = dout + i_b * stride_db + (o_c * stride_dc)[:, None]  # [BLOCK_C, 1]
    b_acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        o_s = s0 + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        m_s = o_s < S
        r0, r1, c0, c1 = _load_bins(bins, o_s, m_s, S)
        b_inv = tl.load(inv + o_s, mask=m_s, other=0.0)
        b_d = tl.load(p_d + (o_s * stride_ds)[None, :], mask=m_c[:, None] & m_s[None, :], other=0.0)
        b_d = b_d.to(tl.float32) * b_inv[None, :]  # [BLOCK_C, BLOCK_S]
        h = (o_n // W)[None, :]
        w = (o_n % W)[None, :]
        b_pt = ((h >= r0[:, None]) & (h < r1[:, None]) & (w >= c0[:, None]) & (w < c1[:, None])).to(tl.float32)  # [BLOCK_S, BLOCK_N]
        b_acc += tl.dot(b_d, b_pt, input_precision=DOT_PRECISION)
    p_dx = dx + (i_b * C + o_c)[:, None] * N + o_n[None, :]
    tl.store(p_dx, b_acc.to(dx.dtype.element_ty), mask=m_c[:, None] & m_n[None, :])


# ----------------------------------------------------------------------------------------------
# host functions
# ----------------------------------------------------------------------------------------------
def _check(t: torch.Tensor, name: str) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"{_OP}: the Triton backend supports float32, float16 and bfloat16 inputs, got "
            f"{name} {t.dtype} (use the CPU backend for float64)")
    check_extent(_OP, t, name)


@functools.lru_cache(maxsize=64)
def _bins(scales: tuple[int, ...], H: int, W: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """([4, S] int32: first row, end row, first column, end column; [S] float32: 1 / area)."""
    if any(s <= 0 for s in scales) or H <= 0 or W <= 0:
        raise ValueError(f"{_OP}: scales must be positive and the map non-empty, got scales {scales}, map {H}x{W}")
    if max(H, W) >= 2**31:
        raise ValueError(f"{_OP}: the Triton backend needs H, W < 2**31, got {H}x{W}")
    S = sum(s * s for s in scales)
    if 4 * S >= 2**31:  # the kernels read the table at 32-bit offsets up to 4 * S
        raise ValueError(f"{_OP}: the Triton backend takes fewer than 2**29 pooled keys, got S = {S} from scales {scales}")
    parts = []  # per scale: first row, end row, first column, end column of its s * s keys
    for s in scales:
        i = torch.arange(s, dtype=torch.int64)
        r0, r1 = i * H // s, -(-(i + 1) * H // s)
        c0, c1 = i * W // s, -(-(i + 1) * W // s)
        parts.append(torch.stack([r0.repeat_interleave(s), r1.repeat_interleave(s), c0.repeat(s), c1.repeat(s)]))
    b = torch.cat(parts, dim=1)  # [4, S], rows of keys row-major per scale
    area = (b[1] - b[0]) * (b[3] - b[2])
    bins = b.to(torch.int32).to(device)
    inv = (1.0 / area.to(torch.float64)).to(device, torch.float32)
    return bins, inv


def _blocks(C: int, S: int, max_c: int, max_s: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_N, BLOCK_S): tl.dot needs every dim >= 16; larger pixel blocks under the
    interpreter, whose cost is per block. On sm_90 (ptxas -v; the float32 dots' tf32x3 keeps
    operand halves) 128 keys per block spilled 1-7 KB per thread, and the float32 forward with 64
    channels 1.2-1.6 KB: the forward takes up to 64 keys (32 channels in float32), the backward,
    which loops over the keys, 32. The float32 forward's were timed on an H200
    (bench/results/h200-session9, run 2); the others not yet."""
    np2 = next_pow2
    bc = min(max_c if not _INTERPRET else 64, max(16, np2(C)))
    return bc, 512 if _INTERPRET else 64, min(max_s, max(16, np2(S)))


def _n_groups(n_blocks: int, programs: int, device: torch.device) -> int:
    """Pixel groups of the forward: about 2 programs per SM (1 on the CPU interpreter)."""
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_blocks // 4, cdiv(target, programs)))


def pp_fwd(x: torch.Tensor, scales: list[int], n_groups: int | None = None) -> torch.Tensor:
    """Pyramid pool forward.

    Args:
        x (Tensor): [B, C, H, W], any strides; float32, float16 or bfloat16.
        scales (list[int]): positive pool sizes.
        n_groups (int | None): pixel groups (default: enough programs for the GPU; tests force it).

    Returns:
        Tensor: [B, C, S] contiguous, dtype of x.
    """
    _check(x, "x")
    B, C, H, W = x.shape
    N = H * W
    bins, inv = _bins(tuple(int(s) for s in scales), H, W, x.device)
    S = inv.numel()
    bc, bn, bs = _blocks(C, S, 32 if x.dtype == torch.float32 else 64, 64)
    n_s = cdiv(S, bs)
    programs = cdiv(C, bc) * n_s * B
    n_blocks = cdiv(N, bn)
    g = n_groups or _n_groups(n_blocks, programs, x.device)
    per = cdiv(n_blocks, max(1, min(g, n_blocks))) * bn  # whole pixel blocks per group
    g = cdiv(N, per)  # no empty group
    out = torch.empty((B, C, S), dtype=x.dtype, device=x.device)
    if g == 1:
        dst, dst_strides = out, (out.stride(0), 0, out.stride(1), out.stride(2))
    else:
        dst = torch.empty((B, g, C, S), dtype=torch.float32, device=x.device)
        dst_strides = tuple(dst.stride())
    _pp_fwd_kernel[(cdiv(C, bc) * n_s, B, g)](
        x, bins, inv, dst, *x.stride(), *dst_strides, C, W, N, S, per,
        N_S=n_s, BLOCK_C=bc, BLOCK_N=bn, BLOCK_S=bs, num_warps=4,
        num_stages=2 if x.dtype == torch.float32 else 3)  # float32, 3 stages: spills
    if g > 1:
        out.copy_(dst.sum(1))  # deterministic second-level sum over the pixel groups
    return out


def pp_bwd(dout: torch.Tensor, scales: list[int], H: int, W: int) -> torch.Tensor:
    """Pyramid pool backward: every pixel gets the sum of dout / area over its bins.

    Args:
        dout (Tensor): [B, C, S] gradient of the output, any strides.
        scales (list[int]): the forward's scales; H, W (int): the forward's map size.

    Returns:
        Tensor: dx [B, C, H, W], NCHW-contiguous, dtype of dout.
    """
    _check(dout, "dout")
    B, C, S = dout.shape
    bins, inv = _bins(tuple(int(s) for s in scales), int(H), int(W), dout.device)
    if inv.numel() != S:
        raise ValueError(f"{_OP}: dout must be [B, C, S] with S = {inv.numel()} for scales {list(scales)}, got {tuple(dout.shape)}")
    N = H * W
    dx = torch.empty((B, C, H, W), dtype=dout.dtype, device=dout.device)
    _check(dx, "dx")
    bc, bn, bs = _blocks(C, S, 64, 32)
    _pp_bwd_kernel[(cdiv(N, bn), cdiv(C, bc), B)](
        dout, bins, inv, dx, *dout.stride(), C, W, N, S,
        BLOCK_C=bc, BLOCK_N=bn, BLOCK_S=bs, DOT_PRECISION=F32_DOT, num_warps=4)
    return dx
