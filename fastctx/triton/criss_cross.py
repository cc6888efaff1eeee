"""Criss-cross attention in Triton: forward and backward kernels.

Layout NCHW, any strides (channels_last, slices): the kernels read the inputs through their
strides; outputs are allocated NCHW-contiguous. Contract (notes/cc_semantics.md): pixel (i, j)
attends to its column (i', j), i' != i, and its whole row (i, j'); one softmax over the
H + W - 1 energies ``scale * <q[:, i, j], k[:, pos]>``; ``lse`` is its logsumexp (float32).

Kernels, all in "positions x queries" tiles so that per-query vectors come from axis-0
reductions (the backward dk/dv kernel is the mirror: "queries x keys"):

- forward: a program owns queries (b, i, j-block) and a chunk of Cv. The column keys are
  visited one row i' at a time (elementwise products: the keys differ per query); the row keys
  a block of BLOCK_W at a time with ``tl.dot``. One online softmax (base 2) over both parts.
- backward, flash style, no atomics: ``D = <dout, out>`` (small kernel); a dq kernel that
  recomputes ``p = exp(s - lse)`` and ``dE = p * (<dout, v> - D)`` per query; a dk/dv kernel per
  KEY block that gathers from the queries attending to it (its row, and its column minus
  itself): one launch when Cqk and Cv each fit one block, else a dk launch over Cqk chunks and
  a dv launch over Cv chunks (dv needs only p, dk needs the full-Cv dA).

Scores and dA loop over channel chunks when the channels do not fit one block (ONE_CQK / ONE_CV
False); q, dout (dq kernel) or k, v (dk/dv kernel) are preloaded when they fit. 16-bit inputs
feed ``tl.dot`` directly (p and dE are rounded to the input dtype for the second dot, as in
FlashAttention); float32 uses ``input_precision="ieee"`` (no TF32; tf32x3 measured slower,
_common.F32_DOT). Accumulation is float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastctx.triton._common import _HEURISTICS, _LOG2E, _bwd_delta_kernel, _col_dot, _mm, _row_dot


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
# Addressing: scalar 64-bit base pointers hold the batch, row and block starts; tiles add offsets
# built from 1-D vectors (o_<tensor><dim> = arange * stride) inside the loops, a loop's row or
# column folded into one vector, so that no [rows, cols] pointer tile stays live across a loop.
@triton.heuristics(_HEURISTICS)
@triton.jit
def _cc_fwd_kernel(
    q, k, v, out, lse,
    stride_qb, stride_qc, stride_qh, stride_qw,
    stride_kb, stride_kc, stride_kh, stride_kw,
    stride_vb, stride_vc, stride_vh, stride_vw,
    H, W, Cqk, Cv, qk_scale,
    BLOCK_J: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_CQK: tl.constexpr,
    BLOCK_CV: tl.constexpr, ONE_CQK: tl.constexpr, ONE_CV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """out[b, cv-chunk, i, j-block] and lse[b, i, j-block] (qk_scale = scale * log2(e)).

    Grid: (B * H, cdiv(W, BLOCK_J), cdiv(Cv, BLOCK_CV))
    """
    i_bh = tl.program_id(0).to(tl.int64)
    i_jb = tl.program_id(1).to(tl.int64)
    i_cv = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    j_start = i_jb * BLOCK_J
    cv_start = i_cv * BLOCK_CV
    o_j = tl.arange(0, BLOCK_J)
    o_w = tl.arange(0, BLOCK_W)
    o_c = tl.arange(0, BLOCK_CQK)
    o_cv = tl.arange(0, BLOCK_CV)
    m_j = o_j < W - j_start
    m_cv = o_cv < Cv - cv_start
    o_qc, o_qj = o_c * stride_qc, o_j * stride_qw
    o_kc, o_kj, o_kw = o_c * stride_kc, o_j * stride_kw, o_w * stride_kw
    o_vc, o_vj, o_vw = o_cv * stride_vc, o_j * stride_vw, o_w * stride_vw

    p_q = q + i_b * stride_qb + i_h * stride_qh + j_start * stride_qw
    p_kc = k + i_b * stride_kb + j_start * stride_kw  # column keys: + i' * stride_kh
    p_vc = v + i_b * stride_vb + cv_start * stride_vc + j_start * stride_vw
    p_kr = k + i_b * stride_kb + i_h * stride_kh  # row keys: + j' * stride_kw
    p_vr = v + i_b * stride_vb + cv_start * stride_vc + i_h * stride_vh
    if ONE_CQK:
        b_q = tl.load(p_q + (o_qc[:, None] + o_qj[None, :]),
                      mask=(o_c < Cqk)[:, None] & m_j[None, :], other=0.0)  # [BLOCK_CQK, BLOCK_J]
    else:
        b_q = 0.0
    b_m = tl.full([BLOCK_J], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_J], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_CV, BLOCK_J], dtype=tl.float32)

    # column part: keys (i', j) for i' != i, one row i' at a time
    for ii in range(0, H - 1):
        i_key = ii + (ii >= i_h).to(tl.int64)
        b_s, _ = _col_dot(b_q, p_q, o_qc, o_qj, p_kc, o_kc, o_kj + i_key * stride_kh, stride_qc,
                          stride_kc, m_j, Cqk, BLOCK_CQK, BLOCK_J, ONE_CQK)
        b_s = b_s * qk_scale  # [BLOCK_J]
        b_m_new = tl.maximum(b_m, b_s)
        b_alpha = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s - b_m_new)
        b_l = b_l * b_alpha + b_p
        b_v = tl.load(p_vc + (o_vc[:, None] + (o_vj + i_key * stride_vh)[None, :]),
                      mask=m_cv[:, None] & m_j[None, :], other=0.0)  # [BLOCK_CV, BLOCK_J]
        b_acc = b_acc * b_alpha[None, :] + b_p[None, :] * b_v.to(tl.float32)
        b_m = b_m_new

    # row part: keys (i, j') for all j', BLOCK_W at a time
    for j0 in range(0, W, BLOCK_W):
        m_w = o_w < W - j0
        b_s, _ = _row_dot(b_q, p_q, o_qc, o_qj, p_kr + j0 * stride_kw, o_kw, o_kc, stride_qc,
                          stride_kc, m_j, m_w, Cqk, BLOCK_CQK, BLOCK_W, BLOCK_J, ONE_CQK,
                          DOT_PRECISION, DOT_F32)
        b_s = tl.where(m_w[:, None], b_s * qk_scale, float("-inf"))  # [BLOCK_W, BLOCK_J]
        b_m_new = tl.maximum(b_m, tl.max(b_s, 0))
        b_alpha = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s - b_m_new[None, :])  # [BLOCK_W, BLOCK_J]
        b_l = b_l * b_alpha + tl.sum(b_p, 0)
        b_v = tl.load(p_vr + j0 * stride_vw + (o_vc[:, None] + o_vw[None, :]),
                      mask=m_cv[:, None] & m_w[None, :], other=0.0)  # [BLOCK_CV, BLOCK_W]
        b_acc = b_acc * b_alpha[None, :] + _mm(b_v, b_p.to(b_v.dtype), DOT_PRECISION, DOT_F32)
        b_m = b_m_new

    b_out = b_acc / b_l[None, :]  # [BLOCK_CV, BLOCK_J]
    p_out = out + ((i_b * Cv + cv_start) * H + i_h) * W + j_start
    tl.store(p_out + (o_cv[:, None] * (H * W) + o_j[None, :]), b_out.to(out.dtype.element_ty),
             mask=m_cv[:, None] & m_j[None, :])
    b_lse = (b_m + tl.log2(b_l)) * 0.6931471805599453  # [BLOCK_J]
    tl.store(lse + i_bh * W + j_start + o_j, b_lse, mask=m_j & (i_cv == 0))


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.heuristics(_HEURISTICS)
@triton.jit
def _cc_bwd_dq_kernel(
    q, k, v, do, lse, delta, dq,
    stride_qb, stride_qc, stride_qh, stride_qw,
    stride_kb, stride_kc, stride_kh, stride_kw,
    stride_vb, stride_vc, stride_vh, stride_vw,
    stride_db, stride_dc, stride_dh, stride_dw,
    H, W, Cqk, Cv, qk_scale, scale,
    BLOCK_J: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_CQK: tl.constexpr,
    BLOCK_CV: tl.constexpr, ONE_CQK: tl.constexpr, ONE_CV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """dq[b, cqk-chunk, i, j-block] = scale * sum_pos dE[pos] * k[:, pos].

    Grid: (B * H, cdiv(W, BLOCK_J), cdiv(Cqk, BLOCK_CQK))
    """
    i_bh = tl.program_id(0).to(tl.int64)
    i_jb = tl.program_id(1).to(tl.int64)
    i_cq = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    j_start = i_jb * BLOCK_J
    cq_start = i_cq * BLOCK_CQK  # this program's dq channels
    o_j = tl.arange(0, BLOCK_J)
    o_w = tl.arange(0, BLOCK_W)
    o_c = tl.arange(0, BLOCK_CQK)
    o_cv = tl.arange(0, BLOCK_CV)
    m_j = o_j < W - j_start
    m_cq = o_c < Cqk - cq_start
    o_qc, o_qj = o_c * stride_qc, o_j * stride_qw
    o_kc, o_kj, o_kw = o_c * stride_kc, o_j * stride_kw, o_w * stride_kw
    o_vc, o_vj, o_vw = o_cv * stride_vc, o_j * stride_vw, o_w * stride_vw
    o_dc, o_dj = o_cv * stride_dc, o_j * stride_dw

    p_q = q + i_b * stride_qb + i_h * stride_qh + j_start * stride_qw
    p_do = do + i_b * stride_db + i_h * stride_dh + j_start * stride_dw
    p_kc = k + i_b * stride_kb + j_start * stride_kw  # column keys: + i' * stride_kh
    p_vc = v + i_b * stride_vb + j_start * stride_vw
    p_kr = k + i_b * stride_kb + i_h * stride_kh  # row keys: + j' * stride_kw
    p_vr = v + i_b * stride_vb + i_h * stride_vh
    if ONE_CQK:
        b_q = tl.load(p_q + (o_qc[:, None] + o_qj[None, :]),
                      mask=(o_c < Cqk)[:, None] & m_j[None, :], other=0.0)  # [BLOCK_CQK, BLOCK_J]
    else:
        b_q = 0.0
    if ONE_CV:
        b_do = tl.load(p_do + (o_dc[:, None] + o_dj[None, :]),
                       mask=(o_cv < Cv)[:, None] & m_j[None, :], other=0.0)  # [BLOCK_CV, BLOCK_J]
    else:
        b_do = 0.0
    b_lse = tl.load(lse + i_bh * W + j_start + o_j, mask=m_j, other=0.0) * 1.4426950408889634  # [BLOCK_J]
    b_delta = tl.load(delta + i_bh * W + j_start + o_j, mask=m_j, other=0.0)  # [BLOCK_J]
    b_dq = tl.zeros([BLOCK_CQK, BLOCK_J], dtype=tl.float32)

    # column part: keys (i', j) for i' != i
    for ii in range(0, H - 1):
        i_key = ii + (ii >= i_h).to(tl.int64)
        o_kjc = o_kj + i_key * stride_kh
        b_s, b_k = _col_dot(b_q, p_q, o_qc, o_qj, p_kc, o_kc, o_kjc, stride_qc, stride_kc, m_j,
                            Cqk, BLOCK_CQK, BLOCK_J, ONE_CQK)
        b_p = tl.exp2(b_s * qk_scale - b_lse)  # [BLOCK_J]
        b_da, _ = _col_dot(b_do, p_do, o_dc, o_dj, p_vc, o_vc, o_vj + i_key * stride_vh, stride_dc,
                           stride_vc, m_j, Cv, BLOCK_CV, BLOCK_J, ONE_CV)
        b_de = b_p * (b_da - b_delta)  # [BLOCK_J]
        if not ONE_CQK:
            b_k = tl.load(p_kc + cq_start * stride_kc + (o_kc[:, None] + o_kjc[None, :]),
                          mask=m_cq[:, None] & m_j[None, :], other=0.0)  # [BLOCK_CQK, BLOCK_J]
        b_dq += b_k.to(tl.float32) * b_de[None, :]

    # row part: keys (i, j') for all j'
    for j0 in range(0, W, BLOCK_W):
        m_w = o_w < W - j0
        b_s, b_kt = _row_dot(b_q, p_q, o_qc, o_qj, p_kr + j0 * stride_kw, o_kw, o_kc, stride_qc,
                             stride_kc, m_j, m_w, Cqk, BLOCK_CQK, BLOCK_W, BLOCK_J, ONE_CQK,
                             DOT_PRECISION, DOT_F32)
        b_p = tl.where(m_w[:, None], tl.exp2(b_s * qk_scale - b_lse[None, :]), 0.0)  # [BLOCK_W, BLOCK_J]
        b_da, _ = _row_dot(b_do, p_do, o_dc, o_dj, p_vr + j0 * stride_vw, o_vw, o_vc, stride_dc,
                           stride_vc, m_j, m_w, Cv, BLOCK_CV, BLOCK_W, BLOCK_J, ONE_CV,
                           DOT_PRECISION, DOT_F32)
        b_de = b_p * (b_da - b_delta[None, :])  # [BLOCK_W, BLOCK_J]
        if ONE_CQK:
            b_k = tl.trans(b_kt)  # [BLOCK_CQK, BLOCK_W]
        else:
            b_k = tl.load(p_kr + j0 * stride_kw + cq_start * stride_kc + (o_kc[:, None] + o_kw[None, :]),
                          mask=m_cq[:, None] & m_w[None, :], other=0.0)  # [BLOCK_CQK, BLOCK_W]
        b_dq += _mm(b_k, b_de.to(b_k.dtype), DOT_PRECISION, DOT_F32)

    p_dq = dq + ((i_b * Cqk + cq_start) * H + i_h) * W + j_start
    tl.store(p_dq + (o_c[:, None] * (H * W) + o_j[None, :]), (b_dq * scale).to(dq.dtype.element_ty),
             mask=m_cq[:, None] & m_j[None, :])


@triton.heuristics(_HEURISTICS)
@triton.jit
def _cc_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv,
    stride_qb, stride_qc, stride_qh, stride_qw,
    stride_kb, stride_kc, stride_kh, stride_kw,
    stride_vb, stride_vc, stride_vh, stride_vw,
    stride_db, stride_dc, stride_dh, stride_dw,
    H, W, Cqk, Cv, qk_scale, scale,
    BLOCK_J: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_CQK: tl.constexpr,
    BLOCK_CV: tl.constexpr, ONE_CQK: tl.constexpr, ONE_CV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr, COMPUTE_DK: tl.constexpr,
    COMPUTE_DV: tl.constexpr,
):
    """dk and/or dv of the keys (b, i, j-block), gathered from the queries that attend to them:
    their column (i', j), i' != i, and their row (i, j'') for all j''.

    Grid: (B * H, cdiv(W, BLOCK_J), n): n = 1 with COMPUTE_DK and COMPUTE_DV (then ONE_CQK and
    ONE_CV), cdiv(Cqk, BLOCK_CQK) dk chunks with COMPUTE_DK alone, cdiv(Cv, BLOCK_CV) dv chunks
    with COMPUTE_DV alone.
    """
    i_bh = tl.program_id(0).to(tl.int64)
    i_jb = tl.program_id(1).to(tl.int64)
    i_x = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    j_start = i_jb * BLOCK_J
    ck_start = i_x * BLOCK_CQK  # this program's dk channels (COMPUTE_DK)
    cd_start = i_x * BLOCK_CV  # this program's dv channels (COMPUTE_DV)
    o_j = tl.arange(0, BLOCK_J)
    o_w = tl.arange(0, BLOCK_W)
    o_c = tl.arange(0, BLOCK_CQK)
    o_cv = tl.arange(0, BLOCK_CV)
    m_j = o_j < W - j_start
    m_ck = o_c < Cqk - ck_start
    m_cd = o_cv < Cv - cd_start
    o_kc, o_kj = o_c * stride_kc, o_j * stride_kw
    o_vc, o_vj = o_cv * stride_vc, o_j * stride_vw
    o_qc, o_qj, o_qw = o_c * stride_qc, o_j * stride_qw, o_w * stride_qw
    o_dc, o_dj, o_dw = o_cv * stride_dc, o_j * stride_dw, o_w * stride_dw

    p_k = k + i_b * stride_kb + i_h * stride_kh + j_start * stride_kw
    p_v = v + i_b * stride_vb + i_h * stride_vh + j_start * stride_vw
    p_qc = q + i_b * stride_qb + j_start * stride_qw  # column queries: + i' * stride_qh
    p_dc = do + i_b * stride_db + j_start * stride_dw
    p_qr = q + i_b * stride_qb + i_h * stride_qh  # row queries: + j'' * stride_qw
    p_dr = do + i_b * stride_db + i_h * stride_dh
    if ONE_CQK:
        b_k = tl.load(p_k + (o_kc[:, None] + o_kj[None, :]),
                      mask=(o_c < Cqk)[:, None] & m_j[None, :], other=0.0)  # [BLOCK_CQK, BLOCK_J]
    else:
        b_k = 0.0
    if ONE_CV:
        b_v = tl.load(p_v + (o_vc[:, None] + o_vj[None, :]),
                      mask=(o_cv < Cv)[:, None] & m_j[None, :], other=0.0)  # [BLOCK_CV, BLOCK_J]
    else:
        b_v = 0.0
    b_dk = tl.zeros([BLOCK_CQK, BLOCK_J], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_CV, BLOCK_J], dtype=tl.float32)

    # column part: queries (i', j) for i' != i
    for ii in range(0, H - 1):
        i_q = ii + (ii >= i_h).to(tl.int64)
        o_stat = (i_b * H + i_q) * W + j_start
        b_lse = tl.load(lse + o_stat + o_j, mask=m_j, other=0.0) * 1.4426950408889634  # [BLOCK_J]
        o_qjc = o_qj + i_q * stride_qh
        o_djc = o_dj + i_q * stride_dh
        b_s, b_q = _col_dot(b_k, p_k, o_kc, o_kj, p_qc, o_qc, o_qjc, stride_kc, stride_qc, m_j,
                            Cqk, BLOCK_CQK, BLOCK_J, ONE_CQK)
        b_p = tl.exp2(b_s * qk_scale - b_lse)  # [BLOCK_J]
        if COMPUTE_DK:
            b_delta = tl.load(delta + o_stat + o_j, mask=m_j, other=0.0)  # [BLOCK_J]
            b_da, b_do = _col_dot(b_v, p_v, o_vc, o_vj, p_dc, o_dc, o_djc, stride_vc, stride_dc,
                                  m_j, Cv, BLOCK_CV, BLOCK_J, ONE_CV)
            b_de = b_p * (b_da - b_delta)  # [BLOCK_J]
            if not ONE_CQK:
                b_q = tl.load(p_qc + ck_start * stride_qc + (o_qc[:, None] + o_qjc[None, :]),
                              mask=m_ck[:, None] & m_j[None, :], other=0.0)  # [BLOCK_CQK, BLOCK_J]
            b_dk += b_q.to(tl.float32) * b_de[None, :]
        if COMPUTE_DV:
            if not COMPUTE_DK:
                b_do = tl.load(p_dc + cd_start * stride_dc + (o_dc[:, None] + o_djc[None, :]),
                               mask=m_cd[:, None] & m_j[None, :], other=0.0)  # [BLOCK_CV, BLOCK_J]
            b_dv += b_p[None, :] * b_do.to(tl.float32)

    # row part: queries (i, j'') for all j'', BLOCK_W at a time; tiles are [queries, keys]
    for j0 in range(0, W, BLOCK_W):
        m_w = o_w < W - j0
        b_lse = tl.load(lse + i_bh * W + j0 + o_w, mask=m_w, other=0.0) * 1.4426950408889634  # [BLOCK_W]
        b_s, b_qt = _row_dot(b_k, p_k, o_kc, o_kj, p_qr + j0 * stride_qw, o_qw, o_qc, stride_kc,
                             stride_qc, m_j, m_w, Cqk, BLOCK_CQK, BLOCK_W, BLOCK_J, ONE_CQK,
                             DOT_PRECISION, DOT_F32)
        b_p = tl.where(m_w[:, None], tl.exp2(b_s * qk_scale - b_lse[:, None]), 0.0)  # [BLOCK_W, BLOCK_J]
        if COMPUTE_DK:
            b_delta = tl.load(delta + i_bh * W + j0 + o_w, mask=m_w, other=0.0)  # [BLOCK_W]
            b_da, b_dot = _row_dot(b_v, p_v, o_vc, o_vj, p_dr + j0 * stride_dw, o_dw, o_dc,
                                   stride_vc, stride_dc, m_j, m_w, Cv, BLOCK_CV, BLOCK_W, BLOCK_J,
                                   ONE_CV, DOT_PRECISION, DOT_F32)
            b_de = b_p * (b_da - b_delta[:, None])  # [BLOCK_W, BLOCK_J]
            if ONE_CQK:
                b_q = tl.trans(b_qt)  # [BLOCK_CQK, BLOCK_W]
            else:
                b_q = tl.load(p_qr + j0 * stride_qw + ck_start * stride_qc + (o_qc[:, None] + o_qw[None, :]),
                              mask=m_ck[:, None] & m_w[None, :], other=0.0)  # [BLOCK_CQK, BLOCK_W]
            b_dk += _mm(b_q, b_de.to(b_q.dtype), DOT_PRECISION, DOT_F32)
        if COMPUTE_DV:
            if COMPUTE_DK:
                b_do = tl.trans(b_dot)  # [BLOCK_CV, BLOCK_W]
            else:
                b_do = tl.load(p_dr + j0 * stride_dw + cd_start * stride_dc + (o_dc[:, None] + o_dw[None, :]),
                               mask=m_cd[:, None] & m_w[None, :], other=0.0)  # [BLOCK_CV, BLOCK_W]
            b_dv += _mm(b_do, b_p.to(b_do.dtype), DOT_PRECISION, DOT_F32)

    if COMPUTE_DK:
        p_dk = dk + ((i_b * Cqk + ck_start) * H + i_h) * W + j_start
        tl.store(p_dk + (o_c[:, None] * (H * W) + o_j[None, :]), (b_dk * scale).to(dk.dtype.element_ty),
                 mask=m_ck[:, None] & m_j[None, :])
    if COMPUTE_DV:
        p_dv = dv + ((i_b * Cv + cd_start) * H + i_h) * W + j_start
        tl.store(p_dv + (o_cv[:, None] * (H * W) + o_j[None, :]), b_dv.to(dv.dtype.element_ty),
                 mask=m_cd[:, None] & m_j[None, :])


# ----------------------------------------------------------------------------------------------
# host functions
# ----------------------------------------------------------------------------------------------
def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            "fastctx.criss_cross_attention: the Triton backend supports float32, float16 and "
            f"bfloat16 inputs, got {t.dtype} (use the CPU/CUDA backend for float64)")


def _config(W: int, Cqk: int, Cv: int, dtype: torch.dtype) -> dict:
    """Block sizes (tl.dot needs every dim >= 16): 32 queries per program, 64 row keys per step
    (32 in float32), the Cqk channels in one block up to 128 (64 in float32), else chunks of half
    that, and Cv chunks of up to 128 (32 in float32).

    Checked by compiling for sm_90 without a GPU (ptxas -v): no register spills for CCNet's
    64 x 512 channels in 16-bit; at most ~250 bytes elsewhere (chunked Cqk, float32). Timed, not
    tuned, on an H200 (bench/results/h200-session9).
    """
    f32 = dtype == torch.float32
    np2 = triton.next_power_of_2
    cqk_max = 64 if f32 else 128
    block_j = min(32, max(16, np2(W)))
    cfg = {
        "BLOCK_J": block_j,
        "BLOCK_W": min(32 if f32 else 64, max(16, np2(W))),
        "BLOCK_CQK": max(16, np2(Cqk)) if Cqk <= cqk_max else cqk_max // 2,
        "BLOCK_CV": min(32 if f32 else 128, max(16, np2(Cv))),
    }
    return cfg


def _launch(cfg: dict, dtype: torch.dtype) -> dict:
    """num_warps from the largest [channels or keys, queries] tile; 2 pipeline stages for
    float32, else Triton's default 3."""
    f32 = dtype == torch.float32
    tile = cfg["BLOCK_J"] * max(cfg["BLOCK_CQK"], cfg["BLOCK_CV"], cfg["BLOCK_W"])
    return {"num_warps": 8 if tile >= (2048 if f32 else 4096) else 4,
            "num_stages": 2 if f32 else 3}


def _check_extent(C: int, H: int, W: int, strides: tuple[int, ...] = ()) -> None:
    # the kernels address within one sample with 32-bit offsets (the batch offset is 64-bit)
    extent = max(C * H * W, sum((n - 1) * s for n, s in zip((C, H, W), strides)) + 1)
    if extent >= 2**31:
        raise ValueError(
            "fastctx.criss_cross_attention: the Triton backend needs each sample to span fewer "
            f"than 2**31 elements, got {C} x {H} x {W} channels x positions, strides {strides}")


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    _check_extent(*t.shape[1:], strides=t.stride()[1:])
    return tuple(t.stride())


def _fwd(q, k, v, scale: float, cfg: dict):
    _check_dtype(q)
    B, Cqk, H, W = q.shape
    Cv = v.shape[1]
    _check_extent(max(Cqk, Cv), H, W)
    out = torch.empty((B, Cv, H, W), dtype=v.dtype, device=v.device)
    lse = torch.empty((B, H, W), dtype=torch.float32, device=v.device)
    bj, bcv = cfg["BLOCK_J"], cfg["BLOCK_CV"]
    grid = (B * H, triton.cdiv(W, bj), triton.cdiv(Cv, bcv))
    _cc_fwd_kernel[grid](
        q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v),
        H, W, Cqk, Cv, float(scale) * _LOG2E, **cfg,
        **_launch(cfg, q.dtype))
    return out, lse


def _bwd(dout, q, k, v, out, lse, scale: float, cfg: dict):
    _check_dtype(q)
    B, Cqk, H, W = q.shape
    Cv = v.shape[1]
    if dout.dtype != v.dtype:
        dout = dout.to(v.dtype)
    bj, bcq, bcv = cfg["BLOCK_J"], cfg["BLOCK_CQK"], cfg["BLOCK_CV"]
    nj = triton.cdiv(W, bj)
    lse = lse.contiguous()

    delta = torch.empty((B, H, W), dtype=torch.float32, device=v.device)
    _bwd_delta_kernel[(B * H, nj)](
        dout, out, delta, *_strides(dout), *_strides(out), H, W, Cv,
        BLOCK_J=bj, BLOCK_CV=min(bcv, 64))

    dq = torch.empty((B, Cqk, H, W), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Cqk, H, W), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Cv, H, W), dtype=v.dtype, device=v.device)
    args = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout),
            H, W, Cqk, Cv, float(scale) * _LOG2E, float(scale))
    opts = _launch(cfg, q.dtype)
    _cc_bwd_dq_kernel[(B * H, nj, triton.cdiv(Cqk, bcq))](
        q, k, v, dout, lse, delta, dq, *args, **cfg, **opts)
    if Cqk <= bcq and Cv <= bcv:  # one launch for dk and dv
        _cc_bwd_dkdv_kernel[(B * H, nj, 1)](
            q, k, v, dout, lse, delta, dk, dv, *args, **cfg,
            COMPUTE_DK=True, COMPUTE_DV=True, **opts)
    else:
        _cc_bwd_dkdv_kernel[(B * H, nj, triton.cdiv(Cqk, bcq))](
            q, k, v, dout, lse, delta, dk, dv, *args, **cfg,
            COMPUTE_DK=True, COMPUTE_DV=False, **opts)
        _cc_bwd_dkdv_kernel[(B * H, nj, triton.cdiv(Cv, bcv))](
            q, k, v, dout, lse, delta, dk, dv, *args, **cfg,
            COMPUTE_DK=False, COMPUTE_DV=True, **opts)
    return dq, dk, dv


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
    B, Cqk, H, W = q.shape
    return _fwd(q, k, v, scale, _config(W, Cqk, v.shape[1], q.dtype))


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
    B, Cqk, H, W = q.shape
    return _bwd(dout, q, k, v, out, lse, scale, _config(W, Cqk, v.shape[1], q.dtype))
