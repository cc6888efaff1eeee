"""Semantic pooling (ISNet's per-class pooling) in Triton: forward and backward kernels.

Per image, each pixel's class is the argmax of its K logits (ties: lowest index); per class c,
``w = softmax over the pixels of c of logits[c]`` and ``regions[:, c] = sum w * feats``
(semantics: shared/docs/OPERATORS.md section 5; host contract: csrc/ops/semantic_pool.cpp).
Inputs are made contiguous (NCHW); accumulation is float32; no float atomics anywhere: every
reduction over pixels is two-level, per-block (or per-group) partials written by the kernels,
then a fixed-order torch reduction over the partials (deterministic run to run).

Forward, a fixed number of launches whatever K is:

1. ``_argmax_kernel`` per pixel block: labels, the winning logit ``best`` and the block's
   per-class maximum of it (partials ``[B, NB, K]``); torch: ``m = amax`` over the blocks (0 for a
   class without a finite logit, so that ``exp(-inf - m) = 0`` and nothing is NaN).
2. ``_expsum_kernel`` per pixel block: ``e = exp(best - m[label])`` and the block's per-class sums
   of e and pixel counts; torch: ``Z``, ``counts`` summed over the blocks.
3. ``_segsum_kernel`` per (pixel group, channel chunk, class tile): ``w = e / Z[label]`` (0 where
   Z = 0) and the partial sums ``sum_n w_n x[:, n] [label_n == k]`` as ``tl.dot`` of the feature
   tile with the w-weighted one-hot tile; torch: regions = sum over the groups. The same kernel
   without weights is the scatter (the adjoint of the gather).

Backward (``_bwd_kernel`` per pixel block, no reduction over pixels): ``dfeats = w * dr[:, label]``
and ``dlogits[label, n] = w (<dr[:, label], f_n> - <dr[:, label], r[:, label]>)``, 0 at the other
classes; ``<dr_c, r_c>`` is one torch reduction over C.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastctx.triton._common import F32_DOT, _INTERPRET, cdiv, next_pow2

_OP = "fastctx.semantic_pool"


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _argmax_kernel(logits, labels, best, pmax, N, K, NB,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """labels [B, N] (int64), best [B, N] (float32) and pmax [B, NB, K] (the block's per-class
    maximum of best, -inf for classes without pixels in the block).

    Grid: (NB, B), NB = cdiv(N, BLOCK_N)
    """
    i_nb = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_n = i_nb * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    p_l = logits + i_b * K * N + o_n
    b_best = tl.load(p_l, mask=m_n, other=float("-inf")).to(tl.float32)  # [BLOCK_N]
    b_lab = tl.zeros([BLOCK_N], dtype=tl.int64)
    for k in range(1, K):
        b_v = tl.load(p_l + k * N, mask=m_n, other=float("-inf")).to(tl.float32)
        b_gt = b_v > b_best  # strict: ties keep the lowest index
        b_best = tl.where(b_gt, b_v, b_best)
        b_lab = tl.where(b_gt, k, b_lab)
    tl.store(labels + i_b * N + o_n, b_lab, mask=m_n)
    tl.store(best + i_b * N + o_n, b_best, mask=m_n)
    o_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        b_own = (b_lab[None, :] == (k0 + o_k)[:, None]) & m_n[None, :]  # [BLOCK_K, BLOCK_N]
        b_pm = tl.max(tl.where(b_own, b_best[None, :], float("-inf")), 1)  # [BLOCK_K]
        tl.store(pmax + (i_b * NB + i_nb) * K + k0 + o_k, b_pm, mask=o_k < K - k0)


@triton.jit
def _expsum_kernel(labels, best, m, e, pz, pc, N, K, NB,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """e [B, N] = exp(best - m[label]); pz [B, NB, K] (float32) and pc [B, NB, K] (int32): the
    block's per-class sums of e and pixel counts.

    Grid: (NB, B)
    """
    i_nb = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_n = i_nb * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_lab = tl.load(labels + i_b * N + o_n, mask=m_n, other=0)  # [BLOCK_N]
    b_best = tl.load(best + i_b * N + o_n, mask=m_n, other=float("-inf"))
    b_m = tl.load(m + i_b * K + b_lab, mask=m_n, other=0.0)
    b_e = tl.where(m_n, tl.exp(b_best - b_m), 0.0)  # [BLOCK_N]
    tl.store(e + i_b * N + o_n, b_e, mask=m_n)
    o_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        b_own = (b_lab[None, :] == (k0 + o_k)[:, None]) & m_n[None, :]  # [BLOCK_K, BLOCK_N]
        b_z = tl.sum(tl.where(b_own, b_e[None, :], 0.0), 1)  # [BLOCK_K]
        b_c = tl.sum(b_own.to(tl.int32), 1)
        o_p = (i_b * NB + i_nb) * K + k0 + o_k
        tl.store(pz + o_p, b_z, mask=o_k < K - k0)
        tl.store(pc + o_p, b_c, mask=o_k < K - k0)


@triton.jit
def _segsum_kernel(x, labels, e, z, w, part, N, C, K, G, pix_per_group,
                   N_C: tl.constexpr, N_K: tl.constexpr, HAS_W: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """part [B, G, C, K] (float32) = sum over the pixels n of group g with label k of
    wt_n * x[b, c, n]: wt = e / z[label] (0 where z = 0; written to w [B, N] by the programs of
    channel chunk 0 and class tile 0) with HAS_W, else 1.

    Grid: (G * N_C * N_K, B)
    """
    i_x = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    i_k = i_x % N_K
    i_c = (i_x // N_K) % N_C
    i_g = i_x // (N_K * N_C)
    c_start = i_c * BLOCK_C
    k_start = i_k * BLOCK_K
    o_c = tl.arange(0, BLOCK_C)
    o_k = tl.arange(0, BLOCK_K)
    o_n = tl.arange(0, BLOCK_N)
    m_c = o_c < C - c_start
    p_x = x + (i_b * C + c_start) * N
    b_acc = tl.zeros([BLOCK_C, BLOCK_K], dtype=tl.float32)
    g_start = i_g * pix_per_group
    g_end = tl.minimum(g_start + pix_per_group, N)
    for n0 in range(g_start, g_end, BLOCK_N):
        m_n = o_n < g_end - n0
        b_lab = tl.load(labels + i_b * N + n0 + o_n, mask=m_n, other=-1)  # [BLOCK_N]
        if HAS_W:
            b_e = tl.load(e + i_b * N + n0 + o_n, mask=m_n, other=0.0)
            b_z = tl.load(z + i_b * K + b_lab, mask=m_n, other=0.0)
            b_w = tl.where(b_z > 0.0, b_e / tl.where(b_z > 0.0, b_z, 1.0), 0.0)  # [BLOCK_N]
            tl.store(w + i_b * N + n0 + o_n, b_w, mask=m_n & (i_c == 0) & (i_k == 0))
        else:
            b_w = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
        b_oh = tl.where(b_lab[:, None] == (k_start + o_k)[None, :], b_w[:, None], 0.0)  # [BLOCK_N, BLOCK_K]
        b_xt = tl.load(p_x + (o_c[:, None] * N + (n0 + o_n)[None, :]),
                       mask=m_c[:, None] & m_n[None, :], other=0.0).to(tl.float32)  # [BLOCK_C, BLOCK_N]
        b_acc += tl.dot(b_xt, b_oh, input_precision=DOT_PRECISION)
    p_part = part + ((i_b * G + i_g) * C + c_start) * K + k_start
    tl.store(p_part + (o_c[:, None] * K + o_k[None, :]), b_acc,
             mask=m_c[:, None] & (o_k < K - k_start)[None, :])


@triton.jit
def _bwd_kernel(feats, dr, drr, labels, w, dfeats, dlogits, N, C, K,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """dfeats [B, C, N] = w * dr[:, label]; dlogits [B, K, N]: w * (<dr[:, label], f> - drr[label])
    at k = label, 0 elsewhere. dr [B, C, K] and drr [B, K] float32.

    Grid: (cdiv(N, BLOCK_N), B)
    """
    i_nb = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    o_n = i_nb * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_c = tl.arange(0, BLOCK_C)
    o_k = tl.arange(0, BLOCK_K)
    b_lab = tl.load(labels + i_b * N + o_n, mask=m_n, other=0)  # [BLOCK_N]
    b_w = tl.load(w + i_b * N + o_n, mask=m_n, other=0.0)
    b_dot = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        m_cn = (o_c < C - c0)[:, None] & m_n[None, :]  # [BLOCK_C, BLOCK_N]
        b_g = tl.load(dr + (i_b * C + c0 + o_c)[:, None] * K + b_lab[None, :], mask=m_cn, other=0.0)
        o_f = (i_b * C + c0 + o_c)[:, None] * N + o_n[None, :]
        b_f = tl.load(feats + o_f, mask=m_cn, other=0.0).to(tl.float32)
        tl.store(dfeats + o_f, (b_w[None, :] * b_g).to(dfeats.dtype.element_ty), mask=m_cn)
        b_dot += tl.sum(b_g * b_f, 0)
    b_drr = tl.load(drr + i_b * K + b_lab, mask=m_n, other=0.0)
    b_dl = b_w * (b_dot - b_drr)  # [BLOCK_N]
    for k0 in range(0, K, BLOCK_K):
        b_own = b_lab[None, :] == (k0 + o_k)[:, None]  # [BLOCK_K, BLOCK_N]
        b_v = tl.where(b_own, b_dl[None, :], 0.0)
        tl.store(dlogits + (i_b * K + k0 + o_k)[:, None] * N + o_n[None, :],
                 b_v.to(dlogits.dtype.element_ty), mask=(o_k < K - k0)[:, None] & m_n[None, :])


@triton.jit
def _gather_kernel(regions, labels, out, N, C, K,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """out [B, C, N] = regions[b, c, labels[b, n]] (labels outside [0, K) read nothing: 0).

    Grid: (cdiv(N, BLOCK_N), cdiv(C, BLOCK_C), B)
    """
    i_nb = tl.program_id(0).to(tl.int64)
    i_cb = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    o_n = i_nb * BLOCK_N + tl.arange(0, BLOCK_N)
    o_c = i_cb * BLOCK_C + tl.arange(0, BLOCK_C)
    m_n = o_n < N
    b_lab = tl.load(labels + i_b * N + o_n, mask=m_n, other=0)  # [BLOCK_N]
    m = (o_c < C)[:, None] & (m_n & (b_lab >= 0) & (b_lab < K))[None, :]  # [BLOCK_C, BLOCK_N]
    b_r = tl.load(regions + (i_b * C + o_c)[:, None] * K + b_lab[None, :], mask=m, other=0.0)
    tl.store(out + (i_b * C + o_c)[:, None] * N + o_n[None, :], b_r.to(out.dtype.element_ty),
             mask=(o_c < C)[:, None] & m_n[None, :])


# ----------------------------------------------------------------------------------------------
# host functions
# ----------------------------------------------------------------------------------------------
_BLOCK_N = 128
#: pixels per step of the segmented sum: 128 spilled 0.5-5.7 KB per thread on sm_90 (ptxas -v;
#: the tf32x3 dot keeps operand halves); the interpreter, whose cost is per block, keeps 128
_SEGSUM_BLOCK_N = 128 if _INTERPRET else 32


def _check_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"{_OP}: the Triton backend supports float32, float16 and bfloat16, got {name} "
            f"{t.dtype} (use the cpu backend for float64)")


def _block_k(K: int) -> int:
    return min(64, max(16, next_pow2(K)))


def _n_groups(n_blocks: int, programs_per_group: int, device: torch.device) -> int:
    """Pixel groups of the segmented sum: about 4 programs per SM (4 on the CPU interpreter)."""
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(n_blocks, cdiv(target, programs_per_group)))


def _segsum(x: torch.Tensor, labels: torch.Tensor, K: int, e=None, z=None, w=None) -> torch.Tensor:
    """[B, C, K] float32 segmented sum of x [B, C, N] (contiguous) weighted by e / z[label] when
    e is given (then w [B, N] receives the weights)."""
    B, C = x.shape[0], x.shape[1]
    N = labels[0].numel()
    bc, bk = min(32, max(16, next_pow2(C))), _block_k(K)
    n_c, n_k, n_blocks = cdiv(C, bc), cdiv(K, bk), cdiv(N, _SEGSUM_BLOCK_N)
    g = _n_groups(n_blocks, B * n_c * n_k, x.device)
    pix = cdiv(n_blocks, g) * _SEGSUM_BLOCK_N
    g = cdiv(N, pix)  # no empty group
    part = torch.empty((B, g, C, K), dtype=torch.float32, device=x.device)
    has_w = e is not None
    _segsum_kernel[(g * n_c * n_k, B)](
        x, labels, e if has_w else x, z if has_w else x, w if has_w else x, part, N, C, K, g, pix,
        N_C=n_c, N_K=n_k, HAS_W=has_w, BLOCK_N=_SEGSUM_BLOCK_N, BLOCK_C=bc, BLOCK_K=bk,
        DOT_PRECISION=F32_DOT, num_warps=4)
    return part.sum(1)  # deterministic second level


def sp_fwd(feats: torch.Tensor, logits: torch.Tensor):
    """Semantic pooling forward.

    Args:
        feats (Tensor): [B, C, H, W] (any strides; made contiguous).
        logits (Tensor): [B, K, H, W], same dtype; -inf allowed, no NaN or +inf.

    Returns:
        regions [B, C, K] float32, counts [B, K] int64, labels [B, H, W] int64, w [B, H, W]
        float32 (each pixel's softmax weight within its class).
    """
    _check_dtype(feats, "feats")
    B, C, H, W = feats.shape
    K, N = logits.shape[1], H * W
    feats, logits = feats.contiguous(), logits.contiguous()
    dev = feats.device
    nb, bk = cdiv(N, _BLOCK_N), _block_k(K)
    f32 = {"dtype": torch.float32, "device": dev}
    labels = torch.empty((B, H, W), dtype=torch.int64, device=dev)
    best = torch.empty((B, N), **f32)
    pmax = torch.empty((B, nb, K), **f32)
    _argmax_kernel[(nb, B)](logits, labels, best, pmax, N, K, nb, BLOCK_N=_BLOCK_N, BLOCK_K=bk)
    m = pmax.amax(1)
    m = torch.where(m == float("-inf"), 0.0, m)
    e = torch.empty((B, N), **f32)
    pz = torch.empty((B, nb, K), **f32)
    pc = torch.empty((B, nb, K), dtype=torch.int32, device=dev)
    _expsum_kernel[(nb, B)](labels, best, m, e, pz, pc, N, K, nb, BLOCK_N=_BLOCK_N, BLOCK_K=bk)
    z = pz.sum(1)
    counts = pc.sum(1, dtype=torch.int64)
    w = torch.empty((B, H, W), **f32)
    regions = _segsum(feats, labels, K, e, z, w)
    return regions, counts, labels, w


def sp_bwd(dregions, feats, labels, w, regions):
    """Gradients of feats and logits from dregions [B, C, K] (see the module docstring).

    Returns:
        dfeats [B, C, H, W], dlogits [B, K, H, W]: contiguous, in the dtype of feats.
    """
    _check_dtype(feats, "feats")
    B, C, H, W = feats.shape
    K, N = regions.shape[2], H * W
    feats = feats.contiguous()
    dr = dregions.to(torch.float32).contiguous()
    drr = (dr * regions.to(torch.float32)).sum(1).contiguous()  # [B, K]
    dfeats = torch.empty((B, C, H, W), dtype=feats.dtype, device=feats.device)
    dlogits = torch.empty((B, K, H, W), dtype=feats.dtype, device=feats.device)
    _bwd_kernel[(cdiv(N, _BLOCK_N), B)](
        feats, dr, drr, labels.contiguous(), w.to(torch.float32).contiguous(), dfeats, dlogits,
        N, C, K, BLOCK_N=_BLOCK_N, BLOCK_C=min(32, next_pow2(C)), BLOCK_K=_block_k(K))
    return dfeats, dlogits


def sp_gather(regions: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """pooled [B, C, H, W] in ``dtype`` = regions [B, C, K] gathered by labels [B, H, W]."""
    B, C, K = regions.shape
    H, W = labels.shape[1], labels.shape[2]
    out = torch.empty((B, C, H, W), dtype=dtype, device=regions.device)
    bc = min(32, next_pow2(C))
    _gather_kernel[(cdiv(H * W, _BLOCK_N), cdiv(C, bc), B)](
        regions.contiguous(), labels.contiguous(), out, H * W, C, K, BLOCK_N=_BLOCK_N, BLOCK_C=bc)
    return out


def sp_scatter(dpooled: torch.Tensor, labels: torch.Tensor, K: int) -> torch.Tensor:
    """dregions [B, C, K] float32: the sum of dpooled [B, C, H, W] over the pixels of each class."""
    _check_dtype(dpooled, "dpooled")
    return _segsum(dpooled.contiguous(), labels.contiguous(), K)
