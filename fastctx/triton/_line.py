"""Attention along "lines" of an NCHW map: the Triton kernels behind criss-cross attention (a
pixel's column, then its row) and interlaced sparse self-attention (a pixel's group).

A *line* is a set of L positions of one sample; line g's member m sits at row
``(g // GW) * G_SH + (m // MW) * M_SH`` and column ``(g % GW) * G_SW + (m % MW) * M_SW`` (the
geometry, runtime ints; GROUPED False skips the divisions for the plain rows and columns of
criss-cross: ``g * G_SH + m * M_SH`` and ``g * G_SW + m * M_SW``). Every tensor is read and
written through its own (batch, channel, row, column) strides, so any layout works: NCHW,
channels-last, slices. Per-position statistics (lse, delta) are contiguous ``[B, H, W]``.

FlashAttention-style, in "queries x keys" tiles, every product a ``tl.dot``:

- forward (:func:`_line_fwd_kernel`): a program owns a block of a line's queries and a chunk of
  Cv, loops over the line's keys (online softmax in base 2), writes the normalized output and
  the logsumexp; EXCLUDE_DIAG leaves each query's own position out (criss-cross's columns);
  MERGE combines the result with another pass's normalized output and logsumexp (criss-cross's
  row pass merges its column pass).
- backward, no atomics, from the full ``lse`` and ``delta = <dout, out>``: a dq kernel per query
  block (:func:`_line_bwd_dq_kernel`) and a dk/dv kernel per key block
  (:func:`_line_bwd_dkdv_kernel`: dk and dv in one launch when Cqk and Cv each fit one block,
  else a dk launch over Cqk chunks and a dv launch over Cv chunks); ACCUM adds another pass's
  partial gradients.
- or the scratch backward (a "mm" config; interlaced attention's default): the dq kernel also
  stores each line's weights p and dE = p * (<dout, v> - delta) as [L, L] matrices, and dv, dk
  (and dq when Cqk spans several blocks) are products with them
  (:func:`_line_scratch_mm_kernel`): the scores and <dout, v> are computed once, not once per
  kernel and channel chunk, at the cost of 2 * B * G * L * L stored elements (small for short
  lines with wide channels, ISANet's groups).
- the forward has a scratch form too (:func:`fwd_scratch`, interlaced attention's "fwd_mm"
  config; not a default yet, no GPU has timed it): the energies stored once (the forward
  kernel with SCORES), then softmax @ v as a product, instead of the scores once per
  Cv chunk.

Scores and ``<dout, v>`` loop over channel chunks when the channels do not fit one block
(ONE_CQK / ONE_CV False). 16-bit inputs feed ``tl.dot`` directly (p and dE are rounded to the
input dtype for the second dot, as in FlashAttention); accumulation in ACC (float32; float64 for
float64 inputs, the verification path, with "ieee" dots). The scale travels as two float32
halves (Triton passes a Python float as float32).
"""

from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl

from fastctx._validate import acc_dtype
from fastctx.triton._common import F32_DOT, _mm, _tile_if, cdiv, dot_f32, next_pow2



# ----------------------------------------------------------------------------------------------
# addressing and tiles
# ----------------------------------------------------------------------------------------------
@triton.jit
def _rc(o, MW, M_SH, M_SW, GROUPED: tl.constexpr):
    """(row, column) of members ``o`` (or of line ``o`` with the line geometry)."""
    if GROUPED:
        r = (o // MW) * M_SH
        c = (o % MW) * M_SW
    else:
        r = o * M_SH
        c = o * M_SW
    return r, c


@triton.jit
def _tile(p, o_r, o_c, m_r, m_c):
    """The tile [R, C] at ``p + o_r[r] + o_c[c]``, 0 outside ``m_r x m_c``."""
    return tl.load(p + (o_r[:, None] + o_c[None, :]), mask=m_r[:, None] & m_c[None, :], other=0.0)


@triton.jit
def _scores(b_a, p_a, o_a, m_a, s_ac, p_b, o_b, m_b, s_bc, C,
            BLOCK_C: tl.constexpr, ONE_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
            DOT_F32: tl.constexpr, ACC: tl.constexpr):
    """sum_c a[r, c] * b[c, n] -> [R, N] in ACC, a's rows at ``p_a + o_a``, b's columns at
    ``p_b + o_b`` (o_a, o_b: position offsets). ONE_C: b_a is a's preloaded [R, BLOCK_C] tile and
    b's tile is loaded once; else both go by chunks of BLOCK_C channels."""
    o_c = tl.arange(0, BLOCK_C)
    if ONE_C:
        m_c = o_c < C
        b_b = _tile(p_b, o_c * s_bc, o_b, m_c, m_b)  # [BLOCK_C, N]
        b_s = _mm(b_a, b_b, DOT_PRECISION, DOT_F32).to(ACC)
    else:
        b_s = tl.zeros([o_a.shape[0], o_b.shape[0]], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            m_c = o_c < C - c0
            # the chunk start goes into the 1-D offsets: no [R, BLOCK_C] offset tile is hoisted
            # out of the loop to stay live in registers
            b_at = _tile(p_a, o_a, (o_c + c0) * s_ac, m_a, m_c)  # [R, BLOCK_C]
            b_bt = _tile(p_b, (o_c + c0) * s_bc, o_b, m_c, m_b)  # [BLOCK_C, N]
            b_s += _mm(b_at, b_bt, DOT_PRECISION, DOT_F32)
    return b_s


@triton.jit
def _valid(o_qpos, o_kpos, m_q, m_k, EXCLUDE_DIAG: tl.constexpr):
    """[queries, keys] mask of the pairs that are energies of the pass."""
    m = m_q[:, None] & m_k[None, :]
    if EXCLUDE_DIAG:
        m = m & (o_qpos[:, None] != o_kpos[None, :])
    return m


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _line_fwd_kernel(
    q, k, v, out, lse, o_part, lse_part, s_s, sc_hi, sc_lo,
    s_qb, s_qc, s_qh, s_qw,
    s_kb, s_kc, s_kh, s_kw,
    s_vb, s_vc, s_vh, s_vw,
    s_ob, s_oc, s_oh, s_ow,
    s_pb, s_pc, s_ph, s_pw,
    s_tb, s_th, s_tw,
    G, L, GW, G_SH, G_SW, MW, M_SH, M_SW, Cqk, Cv,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CQK: tl.constexpr,
    BLOCK_CV: tl.constexpr, ONE_CQK: tl.constexpr, EXCLUDE_DIAG: tl.constexpr,
    MERGE: tl.constexpr, SCORES: tl.constexpr, GROUPED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr, ACC: tl.constexpr,
):
    """Attention of the queries (b, line g, member block) over their line, a chunk of Cv: out
    (and lse from the first chunk). MERGE: combine with the other pass's normalized o_part
    (strides s_p*) and lse_part (lse's strides s_t*). SCORES (the scratch forward's first half):
    no values, no out: the energies in base 2 (scale * log2(e) * <q, k>, -inf where not an
    energy) go to s_s ([B * G, L, L], queries x keys, its dtype) and lse is written;
    :func:`_line_scratch_mm_kernel` with SOFTMAX then forms out = softmax @ v.

    Grid: (B * G, cdiv(L, BLOCK_M), cdiv(Cv, BLOCK_CV)); 1 for the last axis with SCORES
    """
    i_bg = tl.program_id(0).to(tl.int64)
    i_qb = tl.program_id(1)
    i_cv = tl.program_id(2)
    i_b = i_bg // G
    r0, c0 = _rc(i_bg % G, GW, G_SH, G_SW, GROUPED)  # the line's origin
    o_q = i_qb * BLOCK_M + tl.arange(0, BLOCK_M)  # query members
    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, BLOCK_CQK)
    o_cv = i_cv * BLOCK_CV + tl.arange(0, BLOCK_CV)
    m_q = o_q < L
    m_cv = o_cv < Cv
    r_q, c_q = _rc(o_q, MW, M_SH, M_SW, GROUPED)
    b_qk = (tl.cast(sc_hi, ACC) + tl.cast(sc_lo, ACC)) * 1.4426950408889634
    p_q = q + i_b * s_qb + r0 * s_qh + c0 * s_qw
    p_k = k + i_b * s_kb + r0 * s_kh + c0 * s_kw
    p_v = v + i_b * s_vb + r0 * s_vh + c0 * s_vw
    o_qq = r_q * s_qh + c_q * s_qw
    b_q = _tile_if(ONE_CQK, p_q, o_qq, o_c * s_qc, m_q, o_c < Cqk)  # [BLOCK_M, BLOCK_CQK]
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    b_l = tl.zeros([BLOCK_M], dtype=ACC)
    b_acc = tl.zeros([BLOCK_M, BLOCK_CV], dtype=ACC)
    for n0 in range(0, L, BLOCK_N):
        o_k = n0 + o_n
        m_k = o_k < L
        r_k, c_k = _rc(o_k, MW, M_SH, M_SW, GROUPED)
        b_s = _scores(b_q, p_q, o_qq, m_q, s_qc, p_k, r_k * s_kh + c_k * s_kw, m_k, s_kc, Cqk,
                      BLOCK_CQK, ONE_CQK, DOT_PRECISION, DOT_F32, ACC)  # [BLOCK_M, BLOCK_N]
        b_s = tl.where(_valid(o_q, o_k, m_q, m_k, EXCLUDE_DIAG), b_s * b_qk, float("-inf"))
        if SCORES:
            tl.store(s_s + i_bg * L * L + o_q[:, None] * L + o_k[None, :],
                     b_s.to(s_s.dtype.element_ty), mask=m_q[:, None] & m_k[None, :])
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_m_use = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # rows with no key yet
        b_alpha = tl.exp2(b_m - b_m_use)
        b_p = tl.exp2(b_s - b_m_use[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        if not SCORES:
            b_v = _tile(p_v, r_k * s_vh + c_k * s_vw, o_cv * s_vc, m_k, m_cv)  # [N, BLOCK_CV]
            b_acc = b_acc * b_alpha[:, None] + _mm(b_p.to(b_v.dtype), b_v, DOT_PRECISION,
                                                   DOT_F32)
        b_m = b_m_new
    b_l = tl.where(b_l > 0, b_l, 1.0)  # a query without keys (padding): out 0, lse -inf
    b_lse = b_m + tl.log2(b_l)  # base 2
    b_o = b_acc / b_l[:, None]
    o_st = i_b * s_tb + (r0 + r_q) * s_th + (c0 + c_q) * s_tw
    if MERGE:
        b_lp = tl.load(lse_part + o_st, mask=m_q, other=0.0).to(ACC) * 1.4426950408889634
        b_op = _tile(o_part + i_b * s_pb + r0 * s_ph + c0 * s_pw, r_q * s_ph + c_q * s_pw,
                     o_cv * s_pc, m_q, m_cv)
        b_mx = tl.maximum(b_lse, b_lp)  # finite: the row part has the query's own pixel
        b_w = tl.exp2(b_lse - b_mx)
        b_wp = tl.exp2(b_lp - b_mx)
        b_o = (b_o * b_w[:, None] + b_op * b_wp[:, None]) / (b_w + b_wp)[:, None]
        b_lse = b_mx + tl.log2(b_w + b_wp)
    if not SCORES:
        p_out = out + i_b * s_ob + r0 * s_oh + c0 * s_ow
        tl.store(p_out + (r_q * s_oh + c_q * s_ow)[:, None] + (o_cv * s_oc)[None, :],
                 b_o.to(out.dtype.element_ty), mask=m_q[:, None] & m_cv[None, :])
    tl.store(lse + o_st, (b_lse * 0.6931471805599453).to(lse.dtype.element_ty),
             mask=m_q & (i_cv == 0))


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _line_bwd_dq_kernel(
    q, k, v, do, lse, delta, dq, dq_part, p_s, de_s, sc_hi, sc_lo,
    s_qb, s_qc, s_qh, s_qw,
    s_kb, s_kc, s_kh, s_kw,
    s_vb, s_vc, s_vh, s_vw,
    s_db, s_dc, s_dh, s_dw,
    s_gb, s_gc, s_gh, s_gw,
    s_pb, s_pc, s_ph, s_pw,
    s_tb, s_th, s_tw,
    G, L, GW, G_SH, G_SW, MW, M_SH, M_SW, Cqk, Cv,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CQK: tl.constexpr,
    BLOCK_CV: tl.constexpr, ONE_CQK: tl.constexpr, ONE_CV: tl.constexpr,
    EXCLUDE_DIAG: tl.constexpr, ACCUM: tl.constexpr, GROUPED: tl.constexpr,
    DQ: tl.constexpr, SCRATCH: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr, ACC: tl.constexpr,
):
    """dq (strides s_g*) of the queries (b, line g, member block), a chunk of Cqk, from this
    line's keys: scale * sum_k dE * k. ACCUM: plus the other pass's dq_part (strides s_p*).
    SCRATCH: also store the weights p and dE = p * (<dout, v> - delta) of the line into p_s and
    de_s ([B * G, L, L], queries x keys, their dtype; one Cqk chunk then); DQ False: only that.

    Grid: (B * G, cdiv(L, BLOCK_M), cdiv(Cqk, BLOCK_CQK)); 1 for the last axis without DQ
    """
    i_bg = tl.program_id(0).to(tl.int64)
    i_qb = tl.program_id(1)
    i_cq = tl.program_id(2)
    i_b = i_bg // G
    r0, c0 = _rc(i_bg % G, GW, G_SH, G_SW, GROUPED)
    o_q = i_qb * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, BLOCK_CQK)
    o_cv = tl.arange(0, BLOCK_CV)
    o_cq = i_cq * BLOCK_CQK + o_c  # this program's dq channels
    m_q = o_q < L
    m_cq = o_cq < Cqk
    r_q, c_q = _rc(o_q, MW, M_SH, M_SW, GROUPED)
    b_sc = tl.cast(sc_hi, ACC) + tl.cast(sc_lo, ACC)
    b_qk = b_sc * 1.4426950408889634
    p_q = q + i_b * s_qb + r0 * s_qh + c0 * s_qw
    p_k = k + i_b * s_kb + r0 * s_kh + c0 * s_kw
    p_v = v + i_b * s_vb + r0 * s_vh + c0 * s_vw
    p_do = do + i_b * s_db + r0 * s_dh + c0 * s_dw
    o_qq = r_q * s_qh + c_q * s_qw
    o_dq = r_q * s_dh + c_q * s_dw
    b_q = _tile_if(ONE_CQK, p_q, o_qq, o_c * s_qc, m_q, o_c < Cqk)  # [BLOCK_M, BLOCK_CQK]
    b_do = _tile_if(ONE_CV, p_do, o_dq, o_cv * s_dc, m_q, o_cv < Cv)  # [BLOCK_M, BLOCK_CV]
    o_st = i_b * s_tb + (r0 + r_q) * s_th + (c0 + c_q) * s_tw
    b_lse = tl.load(lse + o_st, mask=m_q, other=0.0).to(ACC) * 1.4426950408889634
    b_delta = tl.load(delta + o_st, mask=m_q, other=0.0).to(ACC)
    b_dq = tl.zeros([BLOCK_M, BLOCK_CQK], dtype=ACC)
    for n0 in range(0, L, BLOCK_N):
        o_k = n0 + o_n
        m_k = o_k < L
        r_k, c_k = _rc(o_k, MW, M_SH, M_SW, GROUPED)
        o_kk = r_k * s_kh + c_k * s_kw
        b_s = _scores(b_q, p_q, o_qq, m_q, s_qc, p_k, o_kk, m_k, s_kc, Cqk,
                      BLOCK_CQK, ONE_CQK, DOT_PRECISION, DOT_F32, ACC)
        b_p = tl.where(_valid(o_q, o_k, m_q, m_k, EXCLUDE_DIAG),
                       tl.exp2(b_s * b_qk - b_lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
        b_da = _scores(b_do, p_do, o_dq, m_q, s_dc, p_v, r_k * s_vh + c_k * s_vw, m_k, s_vc, Cv,
                       BLOCK_CV, ONE_CV, DOT_PRECISION, DOT_F32, ACC)
        b_de = b_p * (b_da - b_delta[:, None])
        if SCRATCH:
            o_s = i_bg * L * L + o_q[:, None] * L + o_k[None, :]
            m_s = m_q[:, None] & m_k[None, :]
            tl.store(p_s + o_s, b_p.to(p_s.dtype.element_ty), mask=m_s)
            tl.store(de_s + o_s, b_de.to(de_s.dtype.element_ty), mask=m_s)
        if DQ:
            b_k = _tile(p_k, o_kk, o_cq * s_kc, m_k, m_cq)  # [BLOCK_N, BLOCK_CQK]
            b_dq += _mm(b_de.to(b_k.dtype), b_k, DOT_PRECISION, DOT_F32)
    if DQ:
        b_dq = b_dq * b_sc
        if ACCUM:
            b_dq += _tile(dq_part + i_b * s_pb + r0 * s_ph + c0 * s_pw, r_q * s_ph + c_q * s_pw,
                          o_cq * s_pc, m_q, m_cq)
        p_dq = dq + i_b * s_gb + r0 * s_gh + c0 * s_gw
        tl.store(p_dq + (r_q * s_gh + c_q * s_gw)[:, None] + (o_cq * s_gc)[None, :],
                 b_dq.to(dq.dtype.element_ty), mask=m_q[:, None] & m_cq[None, :])


@triton.jit
def _line_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv, dk_part, dv_part, sc_hi, sc_lo,
    s_qb, s_qc, s_qh, s_qw,
    s_kb, s_kc, s_kh, s_kw,
    s_vb, s_vc, s_vh, s_vw,
    s_db, s_dc, s_dh, s_dw,
    s_gb, s_gc, s_gh, s_gw,
    s_hb, s_hc, s_hh, s_hw,
    s_pb, s_pc, s_ph, s_pw,
    s_rb, s_rc, s_rh, s_rw,
    s_tb, s_th, s_tw,
    G, L, GW, G_SH, G_SW, MW, M_SH, M_SW, Cqk, Cv,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CQK: tl.constexpr,
    BLOCK_CV: tl.constexpr, ONE_CQK: tl.constexpr, ONE_CV: tl.constexpr,
    EXCLUDE_DIAG: tl.constexpr, ACCUM: tl.constexpr, COMPUTE_DK: tl.constexpr,
    COMPUTE_DV: tl.constexpr, GROUPED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr, ACC: tl.constexpr,
):
    """dk (strides s_g*) and/or dv (s_h*) of the keys (b, line g, member block) from this line's
    queries; ACCUM: plus the other pass's dk_part (s_p*) / dv_part (s_r*). Tiles are
    [keys, queries].

    Grid: (B * G, cdiv(L, BLOCK_N), n): n = 1 with COMPUTE_DK and COMPUTE_DV (then ONE_CQK and
    ONE_CV), cdiv(Cqk, BLOCK_CQK) dk chunks with COMPUTE_DK alone, cdiv(Cv, BLOCK_CV) dv chunks
    with COMPUTE_DV alone.
    """
    i_bg = tl.program_id(0).to(tl.int64)
    i_kb = tl.program_id(1)
    i_x = tl.program_id(2)
    i_b = i_bg // G
    r0, c0 = _rc(i_bg % G, GW, G_SH, G_SW, GROUPED)
    o_k = i_kb * BLOCK_N + tl.arange(0, BLOCK_N)  # key members
    o_mq = tl.arange(0, BLOCK_M)
    o_c = tl.arange(0, BLOCK_CQK)
    o_cv = tl.arange(0, BLOCK_CV)
    o_ck = i_x * BLOCK_CQK + o_c  # this program's dk channels (COMPUTE_DK)
    o_cd = i_x * BLOCK_CV + o_cv  # this program's dv channels (COMPUTE_DV)
    m_k = o_k < L
    m_ck = o_ck < Cqk
    m_cd = o_cd < Cv
    r_k, c_k = _rc(o_k, MW, M_SH, M_SW, GROUPED)
    b_sc = tl.cast(sc_hi, ACC) + tl.cast(sc_lo, ACC)
    b_qk = b_sc * 1.4426950408889634
    p_q = q + i_b * s_qb + r0 * s_qh + c0 * s_qw
    p_k = k + i_b * s_kb + r0 * s_kh + c0 * s_kw
    p_v = v + i_b * s_vb + r0 * s_vh + c0 * s_vw
    p_do = do + i_b * s_db + r0 * s_dh + c0 * s_dw
    o_kk = r_k * s_kh + c_k * s_kw
    o_vk = r_k * s_vh + c_k * s_vw
    b_k = _tile_if(ONE_CQK, p_k, o_kk, o_c * s_kc, m_k, o_c < Cqk)  # [BLOCK_N, BLOCK_CQK]
    b_v = _tile_if(ONE_CV, p_v, o_vk, o_cv * s_vc, m_k, o_cv < Cv)  # [BLOCK_N, BLOCK_CV]
    b_dk = tl.zeros([BLOCK_N, BLOCK_CQK], dtype=ACC)
    b_dv = tl.zeros([BLOCK_N, BLOCK_CV], dtype=ACC)
    o_st0 = i_b * s_tb + r0 * s_th + c0 * s_tw
    for m0 in range(0, L, BLOCK_M):
        o_q = m0 + o_mq
        m_q = o_q < L
        r_q, c_q = _rc(o_q, MW, M_SH, M_SW, GROUPED)
        o_qq = r_q * s_qh + c_q * s_qw
        o_dq = r_q * s_dh + c_q * s_dw
        o_st = o_st0 + r_q * s_th + c_q * s_tw
        b_lse = tl.load(lse + o_st, mask=m_q, other=0.0).to(ACC) * 1.4426950408889634
        b_s = _scores(b_k, p_k, o_kk, m_k, s_kc, p_q, o_qq, m_q, s_qc, Cqk,
                      BLOCK_CQK, ONE_CQK, DOT_PRECISION, DOT_F32, ACC)  # [BLOCK_N, BLOCK_M]
        b_p = tl.where(_valid(o_k, o_q, m_k, m_q, EXCLUDE_DIAG),
                       tl.exp2(b_s * b_qk - b_lse[None, :]), 0.0)
        if COMPUTE_DK:
            b_delta = tl.load(delta + o_st, mask=m_q, other=0.0).to(ACC)
            b_da = _scores(b_v, p_v, o_vk, m_k, s_vc, p_do, o_dq, m_q, s_dc, Cv,
                           BLOCK_CV, ONE_CV, DOT_PRECISION, DOT_F32, ACC)  # [BLOCK_N, BLOCK_M]
            b_de = b_p * (b_da - b_delta[None, :])
            b_q = _tile(p_q, o_qq, o_ck * s_qc, m_q, m_ck)  # [BLOCK_M, BLOCK_CQK]
            b_dk += _mm(b_de.to(b_q.dtype), b_q, DOT_PRECISION, DOT_F32)
        if COMPUTE_DV:
            b_do = _tile(p_do, o_dq, o_cd * s_dc, m_q, m_cd)  # [BLOCK_M, BLOCK_CV]
            b_dv += _mm(b_p.to(b_do.dtype), b_do, DOT_PRECISION, DOT_F32)
    if COMPUTE_DK:
        b_dk = b_dk * b_sc
        if ACCUM:
            b_dk += _tile(dk_part + i_b * s_pb + r0 * s_ph + c0 * s_pw, r_k * s_ph + c_k * s_pw,
                          o_ck * s_pc, m_k, m_ck)
        p_dk = dk + i_b * s_gb + r0 * s_gh + c0 * s_gw
        tl.store(p_dk + (r_k * s_gh + c_k * s_gw)[:, None] + (o_ck * s_gc)[None, :],
                 b_dk.to(dk.dtype.element_ty), mask=m_k[:, None] & m_ck[None, :])
    if COMPUTE_DV:
        if ACCUM:
            b_dv += _tile(dv_part + i_b * s_rb + r0 * s_rh + c0 * s_rw, r_k * s_rh + c_k * s_rw,
                          o_cd * s_rc, m_k, m_cd)
        p_dv = dv + i_b * s_hb + r0 * s_hh + c0 * s_hw
        tl.store(p_dv + (r_k * s_hh + c_k * s_hw)[:, None] + (o_cd * s_hc)[None, :],
                 b_dv.to(dv.dtype.element_ty), mask=m_k[:, None] & m_cd[None, :])


@triton.jit
def _line_scratch_mm_kernel(
    a, x, out, part, lse, sc_hi, sc_lo,
    s_xb, s_xc, s_xh, s_xw,
    s_ob, s_oc, s_oh, s_ow,
    s_pb, s_pc, s_ph, s_pw,
    s_tb, s_th, s_tw,
    G, L, GW, G_SH, G_SW, MW, M_SH, M_SW, C,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, TRANS: tl.constexpr,
    ACCUM: tl.constexpr, SOFTMAX: tl.constexpr, GROUPED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr, ACC: tl.constexpr,
):
    """out[r, c] = scale * sum_s A[r, s] * x[s, c] over the members of line (b, g), A the line's
    [L, L] matrix in the scratch ``a`` ([B * G, L, L]; TRANS: its transpose), x and out read and
    written through their strides; ACCUM: plus part. With the scratch of
    :func:`_line_bwd_dq_kernel`: dv = p^T dout, dk = scale * dE^T q, dq = scale * dE k. SOFTMAX:
    A holds base-2 energies (:func:`_line_fwd_kernel` with SCORES) and the product takes
    exp2(A[r, s] - lse[r] * log2(e)) instead: the forward's out = softmax @ v.

    Grid: (B * G, cdiv(L, BLOCK_R), cdiv(C, BLOCK_C))
    """
    i_bg = tl.program_id(0).to(tl.int64)
    i_r = tl.program_id(1)
    i_c = tl.program_id(2)
    i_b = i_bg // G
    r0, c0 = _rc(i_bg % G, GW, G_SH, G_SW, GROUPED)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_s = tl.arange(0, BLOCK_S)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_r = o_r < L
    m_c = o_c < C
    p_a = a + i_bg * L * L
    p_x = x + i_b * s_xb + r0 * s_xh + c0 * s_xw
    r_r, c_r = _rc(o_r, MW, M_SH, M_SW, GROUPED)
    if SOFTMAX:  # a row without keys (lse -inf) gets zero weights
        b_lse2 = tl.load(lse + i_b * s_tb + (r0 + r_r) * s_th + (c0 + c_r) * s_tw, mask=m_r,
                         other=0.0).to(ACC) * 1.4426950408889634
        b_lse2 = tl.where(b_lse2 == float("-inf"), float("inf"), b_lse2)
    b_acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    for s0 in range(0, L, BLOCK_S):
        o_m = s0 + o_s
        m_m = o_m < L
        if TRANS:
            b_a = _tile(p_a, o_r, o_m * L, m_r, m_m)  # [BLOCK_R, BLOCK_S]
        else:
            b_a = _tile(p_a, o_r * L, o_m, m_r, m_m)
        if SOFTMAX:  # masked entries load as 0: zero weights there
            b_a = tl.where(m_r[:, None] & m_m[None, :], tl.exp2(b_a.to(ACC) - b_lse2[:, None]), 0.0)
        r_m, c_m = _rc(o_m, MW, M_SH, M_SW, GROUPED)
        b_x = _tile(p_x, r_m * s_xh + c_m * s_xw, o_c * s_xc, m_m, m_c)  # [BLOCK_S, BLOCK_C]
        b_acc += _mm(b_a.to(b_x.dtype), b_x, DOT_PRECISION, DOT_F32)
    b_acc = b_acc * (tl.cast(sc_hi, ACC) + tl.cast(sc_lo, ACC))
    if ACCUM:
        b_acc += _tile(part + i_b * s_pb + r0 * s_ph + c0 * s_pw, r_r * s_ph + c_r * s_pw,
                       o_c * s_pc, m_r, m_c)
    p_out = out + i_b * s_ob + r0 * s_oh + c0 * s_ow
    tl.store(p_out + (r_r * s_oh + c_r * s_ow)[:, None] + (o_c * s_oc)[None, :],
             b_acc.to(out.dtype.element_ty), mask=m_r[:, None] & m_c[None, :])


# ----------------------------------------------------------------------------------------------
# host functions
# ----------------------------------------------------------------------------------------------
def column_geometry(H: int, W: int) -> tuple[int, ...]:
    """(G, L, GW, G_SH, G_SW, MW, M_SH, M_SW) of a map's columns: line j, member i (GROUPED
    False)."""
    return (W, H, W, 0, 1, 1, 1, 0)


def row_geometry(H: int, W: int) -> tuple[int, ...]:
    """The geometry of a map's rows: line i, member j (GROUPED False)."""
    return (H, W, 1, 1, 0, W, 0, 1)


def blocks(L: int, Cqk: int, Cv: int, m: int, n: int, c: int, warps: int, *, cqk_max: int = 128,
           cqk_chunk: int = 64, stages: int = 2) -> dict:
    """One kernel's config for lines of L members (tl.dot needs every dim >= 16, so small lines
    pad to 16): m queries and n keys per step (at most the padded line), Cv chunks of c, the Cqk
    channels in one block up to cqk_max (else chunks of cqk_chunk), "tf32x3" float32 dots."""
    np2 = next_pow2
    span = max(16, np2(L))
    return {"BLOCK_M": min(m, span), "BLOCK_N": min(n, span),
            "BLOCK_CQK": max(16, np2(Cqk)) if Cqk <= cqk_max else cqk_chunk,
            "BLOCK_CV": min(c, max(16, np2(Cv))), "num_warps": warps, "num_stages": stages,
            "F32_DOT": F32_DOT}


#: _consts' results by (id(cfg), dtype, Cqk), with cfg itself kept (so its id is not reused)
_CONSTS: dict = {}


def _consts(cfg: dict, dtype: torch.dtype, Cqk: int | None = None) -> tuple[dict, dict]:
    """(the kernels' block constexprs, the launch options) of a kernel's config: its BLOCK_*
    sizes (ONE_CQK when given Cqk), num_warps, num_stages and F32_DOT (the float32 dots'
    input_precision). Cached per config object (2.8 vs 0.3 us; several per op call): configs
    are never modified once made (the ops' _config caches them), and callers must not modify
    the returned dicts."""
    key = (id(cfg), dtype, Cqk)
    hit = _CONSTS.get(key)
    if hit is not None and hit[0] is cfg:
        return hit[1], hit[2]
    blocks = {n: x for n, x in cfg.items() if n.startswith("BLOCK_")}
    if Cqk is not None:
        blocks["ONE_CQK"] = Cqk <= cfg["BLOCK_CQK"]
    blocks.update(
        DOT_PRECISION={torch.float32: cfg["F32_DOT"], torch.float64: "ieee"}.get(dtype, "tf32"),
        DOT_F32=dot_f32(dtype),
        ACC=tl.float64 if dtype == torch.float64 else tl.float32,
    )
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if len(_CONSTS) >= 1024:
        _CONSTS.clear()
    _CONSTS[key] = (cfg, blocks, opts)
    return blocks, opts


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


@functools.lru_cache(maxsize=64)
def _halves(scale: float) -> tuple[float, float]:
    """scale = hi + lo with hi, lo float32: Triton passes Python floats as float32. (struct, not
    torch.tensor: 0.4 vs 5.4 us; cached: it runs for every launch.)"""
    hi = _f32(scale)
    return hi, _f32(scale - hi)


def fwd(q, k, v, out, lse, o_part, lse_part, scale: float, geometry: tuple[int, ...],
        grouped: bool, exclude_diag: bool, merge: bool, cfg: dict, scores=None) -> None:
    """One forward pass over the lines of ``geometry``, writing ``out`` and ``lse`` (contiguous
    [B, H, W]); merge: combined with ``o_part`` / ``lse_part`` (else unused). With ``scores``
    ([B * G, L, L]): the energies go there and only lse is written (SCORES)."""
    B, Cqk, H, W = q.shape
    Cv = v.shape[1]
    G, L = geometry[:2]
    blocks, opts = _consts(cfg, q.dtype, Cqk)
    grid = (B * G, cdiv(L, cfg["BLOCK_M"]), 1 if scores is not None else cdiv(Cv, cfg["BLOCK_CV"]))
    _line_fwd_kernel[grid](
        q, k, v, out, lse, o_part, lse_part, out if scores is None else scores, *_halves(scale),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *o_part.stride(), H * W, W, 1,
        *geometry, Cqk, Cv, **blocks, EXCLUDE_DIAG=exclude_diag, MERGE=merge,
        SCORES=scores is not None, GROUPED=grouped, **opts)


def fwd_scratch(q, k, v, out, lse, scale: float, geometry: tuple[int, ...], grouped: bool,
                exclude_diag: bool, cfg: dict, cfg_mm: dict) -> None:
    """The forward with the scores computed once: :func:`_line_fwd_kernel` with SCORES (blocks of
    ``cfg``) stores each line's base-2 energies ([B * G, L, L], float32; float64 for float64
    inputs) and writes ``lse``, then :func:`_line_scratch_mm_kernel` with SOFTMAX (blocks of ``cfg_mm``)
    writes ``out``. For short lines with wide values (the FlashAttention-style :func:`fwd`
    recomputes the scores once per Cv chunk); no MERGE."""
    B, Cqk, H, W = q.shape
    Cv = v.shape[1]
    G, L = geometry[:2]
    acc = acc_dtype(q.dtype)
    s_s = torch.empty((B * G, L, L), dtype=acc, device=q.device)
    fwd(q, k, v, out, lse, out, lse, scale, geometry, grouped, exclude_diag, False, cfg, s_s)
    mm, opts = _consts(cfg_mm, q.dtype)
    _line_scratch_mm_kernel[(B * G, cdiv(L, cfg_mm["BLOCK_R"]), cdiv(Cv, cfg_mm["BLOCK_C"]))](
        s_s, v, out, out, lse, *_halves(1.0), *v.stride(), *out.stride(), *out.stride(), H * W, W,
        1, *geometry, Cv, **mm, TRANS=False, ACCUM=False, SOFTMAX=True, GROUPED=grouped, **opts)


def channels_last(*ts: torch.Tensor) -> list[torch.Tensor]:
    """The tensors with channels-last memory (copies unless they already are): each position's
    channel vector contiguous for the kernels' [members, channels] tiles. Measured faster than
    reading NCHW in place: criss-cross 1.5-2.3x (H200, session 10), interlaced attention 1.3-2.0x
    in 7 of ISANet's 8 cases (H200, session 11, bench/line_sweep.py)."""
    return [t.contiguous(memory_format=torch.channels_last) for t in ts]


def scratch_fits(L: int, Cv: int) -> bool:
    """Whether the scratch backward's stored matrices (2 * L elements per position: p and dE
    over the position's line) stay within the size of a tensor of max(512, Cv) channels: lines
    of up to 256 members at usual widths (criss-cross at 97x97: 97 and 97; ISANet's groups:
    64-169). Longer lines take the recomputing kernels."""
    return 2 * L <= max(512, Cv)


def mm_blocks(L: int, r: int, s: int, c: int, warps: int, *, stages: int = 2) -> dict:
    """The config of :func:`_line_scratch_mm_kernel` for lines of L members: r output members and
    s summed members per step (at most the padded line), channel chunks of c."""
    span = max(16, next_pow2(L))
    return {"BLOCK_R": min(r, span), "BLOCK_S": min(s, span), "BLOCK_C": c, "num_warps": warps,
            "num_stages": stages, "F32_DOT": F32_DOT}


def bwd(q, k, v, do, lse, delta, grads, parts, scale: float, geometry: tuple[int, ...],
        grouped: bool, exclude_diag: bool, cfg: dict) -> None:
    """One backward pass over the lines of ``geometry``: this pass's gradients, plus ``parts``
    (float32 partials of another pass, or None), written into ``grads`` (dq, dk, dv). ``cfg``
    has a config per kernel: "dq" and "dkdv"; or, with a "mm" config (:func:`mm_blocks`), the
    scratch backward: the dq kernel stores the lines' p and dE ([B * G, L, L] each, the input
    dtype) once, and dk, dv (and dq when Cqk is over one block) are products with them
    (:func:`_line_scratch_mm_kernel`): scores and <dout, v> computed once instead of once per
    kernel and channel chunk."""
    B, Cqk, H, W = q.shape
    Cv = v.shape[1]
    G, L = geometry[:2]
    dq, dk, dv = grads
    accum = parts is not None
    dq_p, dk_p, dv_p = parts if accum else grads  # unused without ACCUM
    s = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    tail = (H * W, W, 1, *geometry, Cqk, Cv)
    c = cfg["dq"]
    blocks, opts = _consts(c, q.dtype, Cqk)
    scratch = "mm" in cfg
    with_dq = blocks["ONE_CQK"] or not scratch
    p_s = de_s = dq  # unused without SCRATCH
    if scratch:
        p_s, de_s = (torch.empty((B * G, L, L), dtype=q.dtype, device=q.device) for _ in range(2))
    _line_bwd_dq_kernel[(B * G, cdiv(L, c["BLOCK_M"]),
                         cdiv(Cqk, c["BLOCK_CQK"]) if with_dq else 1)](
        q, k, v, do, lse, delta, dq, dq_p, p_s, de_s, *_halves(scale), *s, *dq.stride(),
        *dq_p.stride(), *tail, **blocks, ONE_CV=Cv <= c["BLOCK_CV"], EXCLUDE_DIAG=exclude_diag,
        ACCUM=accum, GROUPED=grouped, DQ=with_dq, SCRATCH=scratch, **opts)
    if scratch:
        c = cfg["mm"]
        mm, opts = _consts(c, q.dtype)
        todo = [(p_s, do, dv, dv_p, 1.0), (de_s, q, dk, dk_p, scale)]
        if not with_dq:
            todo.append((de_s, k, dq, dq_p, scale))
        for i, (a, x, out, part, sc) in enumerate(todo):
            C = x.shape[1]
            _line_scratch_mm_kernel[(B * G, cdiv(L, c["BLOCK_R"]), cdiv(C, c["BLOCK_C"]))](
                a, x, out, part, lse, *_halves(sc), *x.stride(), *out.stride(), *part.stride(),
                H * W, W, 1, *geometry, C, **mm, TRANS=i < 2, ACCUM=accum, SOFTMAX=False,
                GROUPED=grouped, **opts)
        return
    c = cfg["dkdv"]
    blocks, opts = _consts(c, q.dtype, Cqk)
    blocks = dict(blocks, ONE_CV=Cv <= c["BLOCK_CV"], EXCLUDE_DIAG=exclude_diag, ACCUM=accum,
                  GROUPED=grouped)
    kv = (q, k, v, do, lse, delta, dk, dv, dk_p, dv_p, *_halves(scale), *s, *dk.stride(),
          *dv.stride(), *dk_p.stride(), *dv_p.stride(), *tail)
    nk = cdiv(L, c["BLOCK_N"])
    if blocks["ONE_CQK"] and blocks["ONE_CV"]:  # one launch for dk and dv
        _line_bwd_dkdv_kernel[(B * G, nk, 1)](
            *kv, **blocks, COMPUTE_DK=True, COMPUTE_DV=True, **opts)
    else:
        _line_bwd_dkdv_kernel[(B * G, nk, cdiv(Cqk, c["BLOCK_CQK"]))](
            *kv, **blocks, COMPUTE_DK=True, COMPUTE_DV=False, **opts)
        _line_bwd_dkdv_kernel[(B * G, nk, cdiv(Cv, c["BLOCK_CV"]))](
            *kv, **blocks, COMPUTE_DK=False, COMPUTE_DV=True, **opts)
