"""Criss-cross attention in Triton: forward and backward as two "line attentions".

Layout NCHW, any strides (channels_last, slices): the kernels read their inputs through strides;
outputs are allocated NCHW-contiguous. Contract (OPERATORS.md, section 1): pixel (i, j) attends to
its column (i', j), i' != i, and its whole row (i, j'); one softmax over the H + W - 1 energies
``scale * <q[:, i, j], k[:, pos]>``; ``lse`` is its logsumexp (float32).

The criss-cross of a pixel is the union of two lines, so the op is two passes of one kernel
family, FlashAttention-style, every product a ``tl.dot`` on tensor cores:

- a *line* is a column (b, j), its positions i (the query's own position left out), or a row
  (b, i), its positions j. The kernels address ``x[b, line, pos, c]`` through four strides, so
  one kernel serves both passes. Both read channels-last copies of the inputs
  (``_CHANNELS_LAST``: each pixel's channel vector contiguous for the dots; reading NCHW
  directly measured 1.5-2.3x slower on an H200) and the column pass writes its float32 partial
  results channels-last too.
- forward: the column pass gives each pixel its column-normalized output and column logsumexp;
  the row pass computes the row part and merges the two in its epilogue (weights
  ``exp(lse_part - lse)``), writing ``out`` and ``lse``.
- backward, no atomics: ``D = <dout, out>``; with the full ``lse`` and ``D`` each line's part of
  the gradients is an ordinary attention backward (``p = exp(s - lse)``,
  ``dE = p * (<dout, v> - D)``): a dq kernel per query block and a dk/dv kernel per key block
  (one launch when Cqk and Cv each fit one block, else a dk launch over Cqk chunks and a dv
  launch over Cv chunks). The column pass writes float32 partial gradients; the row pass adds
  them in its epilogue.

Scores and ``<dout, v>`` loop over channel chunks when the channels do not fit one block
(ONE_CQK / ONE_CV False). 16-bit inputs feed ``tl.dot`` directly (p and dE are rounded to the
input dtype for the second dot, as in FlashAttention); float32 dots use ``F32_DOT`` ("tf32x3":
three TF32 products, float32's accuracy). Accumulation is float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastctx.triton._common import _INTERPRET, _LOG2E, F32_DOT, _bwd_delta_kernel, _mm

_LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------------------
# tiles
# ----------------------------------------------------------------------------------------------
# A tensor of a pass is addressed as x[b, line, pos, c] = base + b*s_b + line*s_m + pos*s_l +
# c*s_c; kernels take the (line-start) pointer and build tiles from 1-D offset vectors.
@triton.jit
def _tile(p, o_r, o_c, m_r, m_c):
    """The tile [R, C] at ``p + o_r[r] + o_c[c]``, 0 outside ``m_r x m_c``."""
    return tl.load(p + (o_r[:, None] + o_c[None, :]), mask=m_r[:, None] & m_c[None, :], other=0.0)


@triton.jit
def _scores(b_a, p_a, o_a, m_a, s_ac, p_b, o_b, m_b, s_bc, C,
            BLOCK_C: tl.constexpr, ONE_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
            DOT_F32: tl.constexpr):
    """sum_c a[r, c] * b[c, n] -> [R, N] float32, a's rows at ``p_a + o_a``, b's columns at
    ``p_b + o_b`` (o_a, o_b: position offsets). ONE_C: b_a is a's preloaded [R, BLOCK_C] tile and
    b's tile is loaded once; else both go by chunks of BLOCK_C channels."""
    o_c = tl.arange(0, BLOCK_C)
    if ONE_C:
        m_c = o_c < C
        b_b = _tile(p_b, o_c * s_bc, o_b, m_c, m_b)  # [BLOCK_C, N]
        b_s = _mm(b_a, b_b, DOT_PRECISION, DOT_F32)
    else:
        b_s = tl.zeros([o_a.shape[0], o_b.shape[0]], dtype=tl.float32)
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
    q, k, v, out, lse, o_part, lse_part,
    s_qb, s_qm, s_ql, s_qc,
    s_kb, s_km, s_kl, s_kc,
    s_vb, s_vm, s_vl, s_vc,
    s_ob, s_om, s_ol, s_oc,
    s_pb, s_pm, s_pl, s_pc,
    s_lb, s_lm, s_ll,
    M, L, Cqk, Cv, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CQK: tl.constexpr,
    BLOCK_CV: tl.constexpr, ONE_CQK: tl.constexpr, EXCLUDE_DIAG: tl.constexpr,
    MERGE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Attention of the queries (b, line, pos-block) over their line, a chunk of Cv: out (and lse
    from the first chunk). MERGE: combine with the other pass's normalized o_part / lse_part.
    lse and lse_part share strides (s_l*); qk_scale = scale * log2(e).

    Grid: (B * M, cdiv(L, BLOCK_M), cdiv(Cv, BLOCK_CV))
    """
    i_bm = tl.program_id(0).to(tl.int64)
    i_qb = tl.program_id(1)
    i_cv = tl.program_id(2)
    i_b = i_bm // M
    i_m = i_bm % M
    o_q = i_qb * BLOCK_M + tl.arange(0, BLOCK_M)  # query positions
    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, BLOCK_CQK)
    o_cv = i_cv * BLOCK_CV + tl.arange(0, BLOCK_CV)
    m_q = o_q < L
    m_cv = o_cv < Cv
    p_q = q + i_b * s_qb + i_m * s_qm
    p_k = k + i_b * s_kb + i_m * s_km
    p_v = v + i_b * s_vb + i_m * s_vm
    if ONE_CQK:
        b_q = _tile(p_q, o_q * s_ql, o_c * s_qc, m_q, o_c < Cqk)  # [BLOCK_M, BLOCK_CQK]
    else:
        b_q = 0.0
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_CV], dtype=tl.float32)
    for n0 in range(0, L, BLOCK_N):
        o_k = n0 + o_n
        m_k = o_k < L
        b_s = _scores(b_q, p_q, o_q * s_ql, m_q, s_qc, p_k, o_k * s_kl, m_k, s_kc, Cqk,
                      BLOCK_CQK, ONE_CQK, DOT_PRECISION, DOT_F32)  # [BLOCK_M, BLOCK_N]
        b_s = tl.where(_valid(o_q, o_k, m_q, m_k, EXCLUDE_DIAG), b_s * qk_scale, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_m_use = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # rows with no key yet
        b_alpha = tl.exp2(b_m - b_m_use)
        b_p = tl.exp2(b_s - b_m_use[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_v = _tile(p_v, o_k * s_vl, o_cv * s_vc, m_k, m_cv)  # [BLOCK_N, BLOCK_CV]
        b_acc = b_acc * b_alpha[:, None] + _mm(b_p.to(b_v.dtype), b_v, DOT_PRECISION, DOT_F32)
        b_m = b_m_new
    b_l = tl.where(b_l > 0, b_l, 1.0)  # a query without keys (padding): out 0, lse -inf
    b_lse = b_m + tl.log2(b_l)  # base 2
    b_o = b_acc / b_l[:, None]
    o_lse = i_b * s_lb + i_m * s_lm + o_q * s_ll
    if MERGE:
        b_lp = tl.load(lse_part + o_lse, mask=m_q, other=0.0) * 1.4426950408889634
        b_op = _tile(o_part + i_b * s_pb + i_m * s_pm, o_q * s_pl, o_cv * s_pc, m_q, m_cv)
        b_mx = tl.maximum(b_lse, b_lp)  # finite: the row part has the query's own pixel
        b_w = tl.exp2(b_lse - b_mx)
        b_wp = tl.exp2(b_lp - b_mx)
        b_o = (b_o * b_w[:, None] + b_op * b_wp[:, None]) / (b_w + b_wp)[:, None]
        b_lse = b_mx + tl.log2(b_w + b_wp)
    p_out = out + i_b * s_ob + i_m * s_om
    tl.store(p_out + (o_q * s_ol)[:, None] + (o_cv * s_oc)[None, :], b_o.to(out.dtype.element_ty),
             mask=m_q[:, None] & m_cv[None, :])
    tl.store(lse + o_lse, b_lse * 0.6931471805599453, mask=m_q & (i_cv == 0))


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _line_bwd_dq_kernel(
    q, k, v, do, lse, delta, dq, dq_part,
    s_qb, s_qm, s_ql, s_qc,
    s_kb, s_km, s_kl, s_kc,
    s_vb, s_vm, s_vl, s_vc,
    s_db, s_dm, s_dl, s_dc,
    s_gb, s_gm, s_gl, s_gc,
    s_pb, s_pm, s_pl, s_pc,
    s_lb, s_lm, s_ll,
    M, L, Cqk, Cv, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CQK: tl.constexpr,
    BLOCK_CV: tl.constexpr, ONE_CQK: tl.constexpr, ONE_CV: tl.constexpr,
    EXCLUDE_DIAG: tl.constexpr, ACCUM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """dq (strides s_g*) of the queries (b, line, pos-block), a chunk of Cqk, from this line's
    keys: scale * sum_k dE * k. ACCUM: plus the other pass's dq_part (strides s_p*).

    Grid: (B * M, cdiv(L, BLOCK_M), cdiv(Cqk, BLOCK_CQK))
    """
    i_bm = tl.program_id(0).to(tl.int64)
    i_qb = tl.program_id(1)
    i_cq = tl.program_id(2)
    i_b = i_bm // M
    i_m = i_bm % M
    o_q = i_qb * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, BLOCK_CQK)
    o_cv = tl.arange(0, BLOCK_CV)
    o_cq = i_cq * BLOCK_CQK + o_c  # this program's dq channels
    m_q = o_q < L
    m_cq = o_cq < Cqk
    p_q = q + i_b * s_qb + i_m * s_qm
    p_k = k + i_b * s_kb + i_m * s_km
    p_v = v + i_b * s_vb + i_m * s_vm
    p_do = do + i_b * s_db + i_m * s_dm
    if ONE_CQK:
        b_q = _tile(p_q, o_q * s_ql, o_c * s_qc, m_q, o_c < Cqk)  # [BLOCK_M, BLOCK_CQK]
    else:
        b_q = 0.0
    if ONE_CV:
        b_do = _tile(p_do, o_q * s_dl, o_cv * s_dc, m_q, o_cv < Cv)  # [BLOCK_M, BLOCK_CV]
    else:
        b_do = 0.0
    o_lse = i_b * s_lb + i_m * s_lm + o_q * s_ll
    b_lse = tl.load(lse + o_lse, mask=m_q, other=0.0) * 1.4426950408889634
    b_delta = tl.load(delta + o_lse, mask=m_q, other=0.0)
    b_dq = tl.zeros([BLOCK_M, BLOCK_CQK], dtype=tl.float32)
    for n0 in range(0, L, BLOCK_N):
        o_k = n0 + o_n
        m_k = o_k < L
        b_s = _scores(b_q, p_q, o_q * s_ql, m_q, s_qc, p_k, o_k * s_kl, m_k, s_kc, Cqk,
                      BLOCK_CQK, ONE_CQK, DOT_PRECISION, DOT_F32)
        b_p = tl.where(_valid(o_q, o_k, m_q, m_k, EXCLUDE_DIAG),
                       tl.exp2(b_s * qk_scale - b_lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
        b_da = _scores(b_do, p_do, o_q * s_dl, m_q, s_dc, p_v, o_k * s_vl, m_k, s_vc, Cv,
                       BLOCK_CV, ONE_CV, DOT_PRECISION, DOT_F32)
        b_de = b_p * (b_da - b_delta[:, None])
        b_k = _tile(p_k, o_k * s_kl, o_cq * s_kc, m_k, m_cq)  # [BLOCK_N, BLOCK_CQK]
        b_dq += _mm(b_de.to(b_k.dtype), b_k, DOT_PRECISION, DOT_F32)
    b_dq = b_dq * scale
    if ACCUM:
        b_dq += _tile(dq_part + i_b * s_pb + i_m * s_pm, o_q * s_pl, o_cq * s_pc, m_q, m_cq)
    p_dq = dq + i_b * s_gb + i_m * s_gm
    tl.store(p_dq + (o_q * s_gl)[:, None] + (o_cq * s_gc)[None, :], b_dq.to(dq.dtype.element_ty),
             mask=m_q[:, None] & m_cq[None, :])


@triton.jit
def _line_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv, dk_part, dv_part,
    s_qb, s_qm, s_ql, s_qc,
    s_kb, s_km, s_kl, s_kc,
    s_vb, s_vm, s_vl, s_vc,
    s_db, s_dm, s_dl, s_dc,
    s_gb, s_gm, s_gl, s_gc,
    s_hb, s_hm, s_hl, s_hc,
    s_pb, s_pm, s_pl, s_pc,
    s_rb, s_rm, s_rl, s_rc,
    s_lb, s_lm, s_ll,
    M, L, Cqk, Cv, qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_CQK: tl.constexpr,
    BLOCK_CV: tl.constexpr, ONE_CQK: tl.constexpr, ONE_CV: tl.constexpr,
    EXCLUDE_DIAG: tl.constexpr, ACCUM: tl.constexpr, COMPUTE_DK: tl.constexpr,
    COMPUTE_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """dk (strides s_g*) and/or dv (s_h*) of the keys (b, line, pos-block) from this line's
    queries; ACCUM: plus the other pass's dk_part (s_p*) / dv_part (s_r*). Tiles are
    [keys, queries].

    Grid: (B * M, cdiv(L, BLOCK_N), n): n = 1 with COMPUTE_DK and COMPUTE_DV (then ONE_CQK and
    ONE_CV), cdiv(Cqk, BLOCK_CQK) dk chunks with COMPUTE_DK alone, cdiv(Cv, BLOCK_CV) dv chunks
    with COMPUTE_DV alone.
    """
    i_bm = tl.program_id(0).to(tl.int64)
    i_kb = tl.program_id(1)
    i_x = tl.program_id(2)
    i_b = i_bm // M
    i_m = i_bm % M
    o_k = i_kb * BLOCK_N + tl.arange(0, BLOCK_N)  # key positions
    o_mq = tl.arange(0, BLOCK_M)
    o_c = tl.arange(0, BLOCK_CQK)
    o_cv = tl.arange(0, BLOCK_CV)
    o_ck = i_x * BLOCK_CQK + o_c  # this program's dk channels (COMPUTE_DK)
    o_cd = i_x * BLOCK_CV + o_cv  # this program's dv channels (COMPUTE_DV)
    m_k = o_k < L
    m_ck = o_ck < Cqk
    m_cd = o_cd < Cv
    p_q = q + i_b * s_qb + i_m * s_qm
    p_k = k + i_b * s_kb + i_m * s_km
    p_v = v + i_b * s_vb + i_m * s_vm
    p_do = do + i_b * s_db + i_m * s_dm
    if ONE_CQK:
        b_k = _tile(p_k, o_k * s_kl, o_c * s_kc, m_k, o_c < Cqk)  # [BLOCK_N, BLOCK_CQK]
    else:
        b_k = 0.0
    if ONE_CV:
        b_v = _tile(p_v, o_k * s_vl, o_cv * s_vc, m_k, o_cv < Cv)  # [BLOCK_N, BLOCK_CV]
    else:
        b_v = 0.0
    b_dk = tl.zeros([BLOCK_N, BLOCK_CQK], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_CV], dtype=tl.float32)
    o_stat = i_b * s_lb + i_m * s_lm
    for m0 in range(0, L, BLOCK_M):
        o_q = m0 + o_mq
        m_q = o_q < L
        b_lse = tl.load(lse + o_stat + o_q * s_ll, mask=m_q, other=0.0) * 1.4426950408889634
        b_s = _scores(b_k, p_k, o_k * s_kl, m_k, s_kc, p_q, o_q * s_ql, m_q, s_qc, Cqk,
                      BLOCK_CQK, ONE_CQK, DOT_PRECISION, DOT_F32)  # [BLOCK_N, BLOCK_M]
        b_p = tl.where(_valid(o_k, o_q, m_k, m_q, EXCLUDE_DIAG),
                       tl.exp2(b_s * qk_scale - b_lse[None, :]), 0.0)
        if COMPUTE_DK:
            b_delta = tl.load(delta + o_stat + o_q * s_ll, mask=m_q, other=0.0)
            b_da = _scores(b_v, p_v, o_k * s_vl, m_k, s_vc, p_do, o_q * s_dl, m_q, s_dc, Cv,
                           BLOCK_CV, ONE_CV, DOT_PRECISION, DOT_F32)  # [BLOCK_N, BLOCK_M]
            b_de = b_p * (b_da - b_delta[None, :])
            b_q = _tile(p_q, o_q * s_ql, o_ck * s_qc, m_q, m_ck)  # [BLOCK_M, BLOCK_CQK]
            b_dk += _mm(b_de.to(b_q.dtype), b_q, DOT_PRECISION, DOT_F32)
        if COMPUTE_DV:
            b_do = _tile(p_do, o_q * s_dl, o_cd * s_dc, m_q, m_cd)  # [BLOCK_M, BLOCK_CV]
            b_dv += _mm(b_p.to(b_do.dtype), b_do, DOT_PRECISION, DOT_F32)
    if COMPUTE_DK:
        b_dk = b_dk * scale
        if ACCUM:
            b_dk += _tile(dk_part + i_b * s_pb + i_m * s_pm, o_k * s_pl, o_ck * s_pc, m_k, m_ck)
        p_dk = dk + i_b * s_gb + i_m * s_gm
        tl.store(p_dk + (o_k * s_gl)[:, None] + (o_ck * s_gc)[None, :],
                 b_dk.to(dk.dtype.element_ty), mask=m_k[:, None] & m_ck[None, :])
    if COMPUTE_DV:
        if ACCUM:
            b_dv += _tile(dv_part + i_b * s_rb + i_m * s_rm, o_k * s_rl, o_cd * s_rc, m_k, m_cd)
        p_dv = dv + i_b * s_hb + i_m * s_hm
        tl.store(p_dv + (o_k * s_hl)[:, None] + (o_cd * s_hc)[None, :],
                 b_dv.to(dv.dtype.element_ty), mask=m_k[:, None] & m_cd[None, :])


# ----------------------------------------------------------------------------------------------
# host functions
# ----------------------------------------------------------------------------------------------
#: the kernels read channels-last copies of their inputs (one read and write of q, k, v, and of
#: dout in the backward, unless they are channels-last already): contiguous channel vectors
_CHANNELS_LAST = True


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            "fastctx.criss_cross_attention: the Triton backend supports float32, float16 and "
            f"bfloat16 inputs, got {t.dtype} (use the CPU/CUDA backend for float64)")


def _config(L: int, Cqk: int, Cv: int, dtype: torch.dtype) -> dict:
    """Block sizes per kernel ("fwd", "dq", "dkdv") of a pass over lines of L positions (tl.dot
    needs every dim >= 16): BLOCK_M queries and BLOCK_N keys per step, the Cqk channels in one
    block up to 128 (else chunks of 64), Cv chunks of BLOCK_CV.

    Timed on an H200 (bench/results/h200-session10, bench/cc_sweep.py: configs side by side,
    each change measured alone at 97x97 and 65x129): float16 forward 4 warps (0.157 vs 0.204 ms
    with 8), dk and dv in one launch with Cv 512 in one block (<dout, v> once per key and query
    block instead of once per Cv chunk: forward+backward 0.644 vs 0.836 ms), 64 queries per
    dk/dv step (0.604 vs 0.644); float32 dots "tf32x3" (float32's accuracy; forward+backward
    3.7 vs 7.1 ms with "ieee" in the backward), forward 32 queries x 128 Cv (0.68 vs 0.90 ms).
    float32 dq with 64 queries and dk/dv with 64 keys measured faster too (forward+backward
    2.7 ms with both) but one of them faulted (illegal memory access) on a 17x33 map with
    Cqk 8 (run 3; which one is not established): the backward keeps 32 x 32. Compiled for
    sm_90 without a GPU (bench/compile_check.py, ptxas -v): the float32 dq and dk kernels spill
    up to ~90 bytes per thread, the float16 dk/dv kernel 16; faster than the spill-free configs
    all the same.
    """
    f32 = dtype == torch.float32
    np2 = triton.next_power_of_2
    span = max(16, np2(L))
    cqk = max(16, np2(Cqk)) if Cqk <= 128 else 64
    cv = max(16, np2(Cv))

    def blocks(m, n, c, warps, stages=2, f32_dot=F32_DOT):
        return {"BLOCK_M": min(m, span), "BLOCK_N": min(n, span), "BLOCK_CQK": cqk,
                "BLOCK_CV": min(c, cv), "num_warps": warps, "num_stages": stages,
                "F32_DOT": f32_dot}

    if f32:  # dk and dv in one launch would need 300 KB of shared memory: Cv in chunks
        return {"fwd": blocks(32, 32, 128, 8), "dq": blocks(32, 32, 64, 8),
                "dkdv": blocks(32, 32, 64, 8)}
    return {"fwd": blocks(64, 64, 128, 4), "dq": blocks(64, 32, 128, 8),
            "dkdv": blocks(64, 32, 512, 8)}


def _consts(cfg: dict, dtype: torch.dtype, Cqk: int, Cv: int) -> tuple[dict, dict]:
    """(the kernels' block constexprs, the launch options) of a config."""
    blocks = {n: cfg[n] for n in ("BLOCK_M", "BLOCK_N", "BLOCK_CQK", "BLOCK_CV")}
    blocks.update(
        ONE_CQK=Cqk <= cfg["BLOCK_CQK"],
        DOT_PRECISION=cfg["F32_DOT"] if dtype == torch.float32 else "tf32",
        # the Triton interpreter multiplies the bit patterns of bfloat16 dot operands
        # (triton-lang/triton#11584): upcast them there
        DOT_F32=_INTERPRET and dtype == torch.bfloat16,
    )
    return blocks, {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _check_extent(C: int, H: int, W: int, strides: tuple[int, ...] = ()) -> None:
    # the kernels address within one sample with 32-bit offsets (the batch offset is 64-bit)
    extent = max(C * H * W, sum((n - 1) * s for n, s in zip((C, H, W), strides)) + 1)
    if extent >= 2**31:
        raise ValueError(
            "fastctx.criss_cross_attention: the Triton backend needs each sample to span fewer "
            f"than 2**31 elements, got {C} x {H} x {W} channels x positions, strides {strides}")


def _check_inputs(*tensors: torch.Tensor) -> None:
    """The extent check of the caller's tensors (those fastctx allocates are NCHW or
    channels-last, within C * H * W), once per host function call."""
    for t in tensors:
        _check_extent(*t.shape[1:], strides=t.stride()[1:])


def _lines(t: torch.Tensor, column: bool) -> tuple[int, int, int, int]:
    """Strides (batch, line, position, channel) of a [B, C, H, W] tensor seen as lines: its
    columns (line j, position i) or its rows (line i, position j)."""
    sb, sc, sh, sw = t.stride()
    return (sb, sw, sh, sc) if column else (sb, sh, sw, sc)


def _stat_lines(H: int, W: int, column: bool) -> tuple[int, int, int]:
    """Strides (batch, line, position) of a contiguous [B, H, W] statistic (lse, delta)."""
    return (H * W, 1, W) if column else (H * W, W, 1)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """t with channels-last memory ([B, H, W, C]): each pixel's channel vector is contiguous
    for the dots of both passes (a copy unless t already is)."""
    return t.contiguous(memory_format=torch.channels_last)


def _partial(B: int, C: int, H: int, W: int, device) -> torch.Tensor:
    """A float32 [B, C, H, W] partial result of the column pass, channels-last."""
    return torch.empty((B, H, W, C), dtype=torch.float32, device=device).permute(0, 3, 1, 2)


def _pass_fwd(q, k, v, out, lse, o_part, lse_part, column: bool, merge: bool, scale: float,
              cfg: dict | None) -> None:
    B, Cqk, H, W = q.shape
    Cv = v.shape[1]
    M, L = (W, H) if column else (H, W)
    cfg = (cfg or _config(L, Cqk, Cv, q.dtype))["fwd"]
    blocks, opts = _consts(cfg, q.dtype, Cqk, Cv)
    grid = (B * M, triton.cdiv(L, cfg["BLOCK_M"]), triton.cdiv(Cv, cfg["BLOCK_CV"]))
    _line_fwd_kernel[grid](
        q, k, v, out, lse, o_part, lse_part,
        *_lines(q, column), *_lines(k, column), *_lines(v, column), *_lines(out, column),
        *_lines(o_part, column), *_stat_lines(H, W, column),
        M, L, Cqk, Cv, float(scale) * _LOG2E, **blocks,
        EXCLUDE_DIAG=column, MERGE=merge, **opts)


def _pass_bwd(q, k, v, do, lse, delta, grads, parts, column: bool, scale: float,
              cfg: dict | None) -> None:
    """Adds this pass's gradients to ``parts`` (float32 partials of the other pass, or None)
    and writes them into ``grads`` (dq, dk, dv)."""
    B, Cqk, H, W = q.shape
    Cv = v.shape[1]
    M, L = (W, H) if column else (H, W)
    cfg = cfg or _config(L, Cqk, Cv, q.dtype)
    dq, dk, dv = grads
    accum = parts is not None
    dq_p, dk_p, dv_p = parts if accum else grads  # unused without ACCUM
    s = [_lines(t, column) for t in (q, k, v, do)]
    args = (M, L, Cqk, Cv, float(scale) * _LOG2E, float(scale))
    stat = _stat_lines(H, W, column)
    c = cfg["dq"]
    blocks, opts = _consts(c, q.dtype, Cqk, Cv)
    _line_bwd_dq_kernel[(B * M, triton.cdiv(L, c["BLOCK_M"]), triton.cdiv(Cqk, c["BLOCK_CQK"]))](
        q, k, v, do, lse, delta, dq, dq_p, *s[0], *s[1], *s[2], *s[3],
        *_lines(dq, column), *_lines(dq_p, column), *stat, *args, **blocks,
        ONE_CV=Cv <= c["BLOCK_CV"], EXCLUDE_DIAG=column, ACCUM=accum, **opts)
    c = cfg["dkdv"]
    blocks, opts = _consts(c, q.dtype, Cqk, Cv)
    blocks.update(ONE_CV=Cv <= c["BLOCK_CV"], EXCLUDE_DIAG=column, ACCUM=accum)
    kv = (q, k, v, do, lse, delta, dk, dv, dk_p, dv_p, *s[0], *s[1], *s[2], *s[3],
          *_lines(dk, column), *_lines(dv, column), *_lines(dk_p, column), *_lines(dv_p, column),
          *stat, *args)
    nk = triton.cdiv(L, c["BLOCK_N"])
    if blocks["ONE_CQK"] and blocks["ONE_CV"]:  # one launch for dk and dv
        _line_bwd_dkdv_kernel[(B * M, nk, 1)](
            *kv, **blocks, COMPUTE_DK=True, COMPUTE_DV=True, **opts)
    else:
        _line_bwd_dkdv_kernel[(B * M, nk, triton.cdiv(Cqk, c["BLOCK_CQK"]))](
            *kv, **blocks, COMPUTE_DK=True, COMPUTE_DV=False, **opts)
        _line_bwd_dkdv_kernel[(B * M, nk, triton.cdiv(Cv, c["BLOCK_CV"]))](
            *kv, **blocks, COMPUTE_DK=False, COMPUTE_DV=True, **opts)


def _fwd(q, k, v, scale: float, cfg: dict | None = None, channels_last: bool | None = None):
    _check_dtype(q)
    B, Cqk, H, W = q.shape
    Cv = v.shape[1]
    _check_extent(max(Cqk, Cv), H, W)
    _check_inputs(q, k, v)
    if _CHANNELS_LAST if channels_last is None else channels_last:
        q, k, v = (_channels_last(t) for t in (q, k, v))
    out = torch.empty((B, Cv, H, W), dtype=v.dtype, device=v.device)
    lse = torch.empty((B, H, W), dtype=torch.float32, device=v.device)
    o_col, lse_col = out, lse  # unused when H == 1 (no column keys: the row pass alone)
    if H > 1:
        o_col = _partial(B, Cv, H, W, v.device)
        lse_col = torch.empty((B, H, W), dtype=torch.float32, device=v.device)
        _pass_fwd(q, k, v, o_col, lse_col, o_col, lse_col, True, False, scale, cfg)
    _pass_fwd(q, k, v, out, lse, o_col, lse_col, False, H > 1, scale, cfg)
    return out, lse


def _bwd(dout, q, k, v, out, lse, scale: float, cfg: dict | None = None,
         channels_last: bool | None = None):
    _check_dtype(q)
    B, Cqk, H, W = q.shape
    Cv = v.shape[1]
    if dout.dtype != v.dtype:
        dout = dout.to(v.dtype)
    _check_inputs(q, k, v, dout, out)
    lse = lse.contiguous()
    np2 = triton.next_power_of_2
    bj = min(32, max(16, np2(W)))
    delta = torch.empty((B, H, W), dtype=torch.float32, device=v.device)
    _bwd_delta_kernel[(B * H, triton.cdiv(W, bj))](
        dout, out, delta, *dout.stride(), *out.stride(), H, W, Cv,
        BLOCK_J=bj, BLOCK_CV=min(64, max(16, np2(Cv))))

    grads = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if _CHANNELS_LAST if channels_last is None else channels_last:
        q, k, v, dout = (_channels_last(t) for t in (q, k, v, dout))
    parts = None
    if H > 1:
        parts = tuple(_partial(B, t.shape[1], H, W, t.device) for t in (q, k, v))
        _pass_bwd(q, k, v, dout, lse, delta, parts, None, True, scale, cfg)
    _pass_bwd(q, k, v, dout, lse, delta, grads, parts, False, scale, cfg)
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
