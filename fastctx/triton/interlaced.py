"""Interlaced sparse self-attention (ISANet) in Triton: forward and backward kernels.

Contract (OPERATORS.md section 2): write ``i = I * bh + a``, ``j = J * bw + b``; "long" mode groups
the positions of equal ``(a, b)`` (``L = (H / bh) * (W / bw)`` members, ``G = bh * bw`` groups),
"short" mode the contiguous ``bh x bw`` blocks (``L = bh * bw``, ``G = (H / bh) * (W / bw)``).
Dense softmax attention inside each group, ``lse`` its logsumexp.

No permuted copies: member ``m`` of group ``g`` is read straight from the strided NCHW tensors.
Both groupings are one affine pattern (host function :func:`_geometry`): group g has its origin
at row ``(g // GW) * G_SH``, column ``(g % GW) * G_SW``, and member m sits ``(m // MW) * M_SH``
rows and ``(m % MW) * M_SW`` columns from it (long: GW = bw, G_S* = 1, MW = W / bw,
M_S* = (bh, bw); short: GW = W / bw, G_S* = (bh, bw), MW = bw, M_S* = 1). The kernels compute
these offsets inline (a jit helper call costs the interpreter more than the arithmetic). Inputs
keep their strides; outputs are allocated NCHW-contiguous.

Kernels, in "keys x queries" tiles so that per-query vectors come from axis-0 reductions (the
dk/dv kernel is the mirror, "queries x keys"), as in region_attention:

- forward: a program owns a block of BLOCK_M members of one group and a chunk of Cv; it loops
  over the group's keys BLOCK_N at a time (``tl.dot``; Cqk in chunks when it does not fit one
  block), online softmax in base 2; padded keys get energy -inf.
- backward, FA2 style, no atomics: ``delta = <dout, out>`` (_common's delta kernel); a dq kernel
  per query block recomputing ``p = exp(e - lse)`` and ``dE = p * (<dout, v> - delta)``; a dk/dv
  kernel per key block that loops over the queries of its group (a key is only ever attended by
  its own group, so it owns its gradient: no partial sums). One dk/dv launch when Cqk and Cv each
  fit one block, else a dk launch over Cqk chunks and a dv launch over Cv chunks.

16-bit inputs feed ``tl.dot`` directly (p and dE rounded to the input dtype for the second dot),
accumulation in float32; float32 uses ``input_precision="tf32x3"`` (_common.F32_DOT). float64
inputs (a verification path) accumulate in float64 (ACC) with all channels in one tile (the
shared channel-chunked dot helper accumulates in float32) and the delta computed by torch; the
scale travels as two float32 halves because Triton passes a Python float as float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastctx.triton._common import F32_DOT, _HEURISTICS, _bwd_delta_kernel, _mm, _row_dot, _split_pid, _tile_if

_OP = "fastctx.interlaced_attention"

_ISA_HEURISTICS = {
    **_HEURISTICS,
    # full-precision dots for float32 and float64; the 16-bit dtypes ignore it
    "DOT_PRECISION": lambda a: {torch.float32: F32_DOT, torch.float64: "ieee"}.get(a["q"].dtype, "tf32"),
    "ACC": lambda a: tl.float64 if a["q"].dtype == torch.float64 else tl.float32,
}


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.heuristics(_ISA_HEURISTICS)
@triton.jit
def _isa_fwd_kernel(
    q, k, v, out, lse, sc_hi, sc_lo,
    stride_qb, stride_qc, stride_qh, stride_qw,
    stride_kb, stride_kc, stride_kh, stride_kw,
    stride_vb, stride_vc, stride_vh, stride_vw,
    H, W, Cqk, Cv, L, GW, G_SH, G_SW, MW, M_SH, M_SW,
    N_MB: tl.constexpr, N_CV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_CQK: tl.constexpr, BLOCK_CV: tl.constexpr, ONE_CQK: tl.constexpr,
    ONE_CV: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    ACC: tl.constexpr,
):
    """out[b, cv-chunk, members m-block of group g] and lse[b, same members].

    Grid: (G * N_MB * N_CV, B), N_MB = cdiv(L, BLOCK_M), N_CV = cdiv(Cv, BLOCK_CV); the Cv chunk
    varies fastest, so the programs that share a query block run side by side (L2).
    """
    i_x = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    i_cv, i_mb, i_g = _split_pid(i_x, N_CV, N_MB)
    m_start = i_mb * BLOCK_M
    cv_start = i_cv * BLOCK_CV
    o_m = tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, BLOCK_CQK)
    o_cv = tl.arange(0, BLOCK_CV)
    m_m = o_m < L - m_start
    m_cv = o_cv < Cv - cv_start
    b_sc = tl.cast(sc_hi, ACC) + tl.cast(sc_lo, ACC)
    b_qk = b_sc * 1.4426950408889634
    g_r, g_c = (i_g // GW) * G_SH, (i_g % GW) * G_SW  # the group's origin
    r_m, c_m = ((m_start + o_m) // MW) * M_SH, ((m_start + o_m) % MW) * M_SW  # [BLOCK_M]
    o_qc, o_qm = o_c * stride_qc, r_m * stride_qh + c_m * stride_qw
    o_kc, o_vc = o_c * stride_kc, o_cv * stride_vc

    p_q = q + i_b * stride_qb + g_r * stride_qh + g_c * stride_qw
    p_k = k + i_b * stride_kb + g_r * stride_kh + g_c * stride_kw
    p_v = v + i_b * stride_vb + cv_start * stride_vc + g_r * stride_vh + g_c * stride_vw
    b_q = _tile_if(ONE_CQK, p_q, o_qc, o_qm, o_c < Cqk, m_m)  # [BLOCK_CQK, BLOCK_M] when ONE_CQK
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    b_l = tl.zeros([BLOCK_M], dtype=ACC)
    b_acc = tl.zeros([BLOCK_CV, BLOCK_M], dtype=ACC)

    # the first key block holds member 0, so every query's running max is finite after it
    for n0 in range(0, L, BLOCK_N):
        m_n = o_n < L - n0
        r_n, c_n = ((n0 + o_n) // MW) * M_SH, ((n0 + o_n) % MW) * M_SW  # [BLOCK_N]
        o_kn, o_vn = r_n * stride_kh + c_n * stride_kw, r_n * stride_vh + c_n * stride_vw
        b_s, _ = _row_dot(b_q, p_q, o_qc, o_qm, p_k, o_kn, o_kc, stride_qc, stride_kc, m_m, m_n,
                          Cqk, BLOCK_CQK, BLOCK_N, BLOCK_M, ONE_CQK, DOT_PRECISION,
                          DOT_F32)  # [BLOCK_N, BLOCK_M]
        b_s = tl.where(m_n[:, None], b_s * b_qk, float("-inf"))  # base 2 from here on
        b_m_new = tl.maximum(b_m, tl.max(b_s, 0))  # [BLOCK_M]
        b_alpha = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s - b_m_new[None, :])  # [BLOCK_N, BLOCK_M]
        b_l = b_l * b_alpha + tl.sum(b_p, 0)
        b_v = tl.load(p_v + (o_vc[:, None] + o_vn[None, :]),
                      mask=m_cv[:, None] & m_n[None, :], other=0.0)  # [BLOCK_CV, BLOCK_N]
        b_acc = b_acc * b_alpha[None, :] + _mm(b_v, b_p.to(b_v.dtype), DOT_PRECISION, DOT_F32)
        b_m = b_m_new

    b_out = b_acc / b_l[None, :]  # [BLOCK_CV, BLOCK_M]
    o_om = (g_r + r_m) * W + g_c + c_m  # [BLOCK_M] in a contiguous [.., H, W]
    p_out = out + (i_b * Cv + cv_start) * H * W
    tl.store(p_out + (o_cv[:, None] * (H * W) + o_om[None, :]), b_out.to(out.dtype.element_ty),
             mask=m_cv[:, None] & m_m[None, :])
    b_lse = (b_m + tl.log2(b_l)) * 0.6931471805599453  # [BLOCK_M]
    tl.store(lse + i_b * H * W + o_om, b_lse.to(lse.dtype.element_ty), mask=m_m & (i_cv == 0))


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.heuristics(_ISA_HEURISTICS)
@triton.jit
def _isa_bwd_dq_kernel(
    q, k, v, do, lse, delta, dq, sc_hi, sc_lo,
    stride_qb, stride_qc, stride_qh, stride_qw,
    stride_kb, stride_kc, stride_kh, stride_kw,
    stride_vb, stride_vc, stride_vh, stride_vw,
    stride_db, stride_dc, stride_dh, stride_dw,
    H, W, Cqk, Cv, L, GW, G_SH, G_SW, MW, M_SH, M_SW,
    N_MB: tl.constexpr, N_CQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_CQK: tl.constexpr, BLOCK_CV: tl.constexpr, ONE_CQK: tl.constexpr,
    ONE_CV: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    ACC: tl.constexpr,
):
    """dq[b, cqk-chunk, members m-block of group g] = scale * sum_n dE[n, m] * k[:, n].

    Grid: (G * N_MB * N_CQ, B), N_MB = cdiv(L, BLOCK_M), N_CQ = cdiv(Cqk, BLOCK_CQK)
    """
    i_x = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    i_cq, i_mb, i_g = _split_pid(i_x, N_CQ, N_MB)
    m_start = i_mb * BLOCK_M
    cq_start = i_cq * BLOCK_CQK  # this program's dq channels
    o_m = tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, BLOCK_CQK)
    o_cv = tl.arange(0, BLOCK_CV)
    m_m = o_m < L - m_start
    m_cq = o_c < Cqk - cq_start
    b_sc = tl.cast(sc_hi, ACC) + tl.cast(sc_lo, ACC)
    b_qk = b_sc * 1.4426950408889634
    g_r, g_c = (i_g // GW) * G_SH, (i_g % GW) * G_SW  # the group's origin
    r_m, c_m = ((m_start + o_m) // MW) * M_SH, ((m_start + o_m) % MW) * M_SW  # [BLOCK_M]
    o_qc, o_qm = o_c * stride_qc, r_m * stride_qh + c_m * stride_qw
    o_dc, o_dm = o_cv * stride_dc, r_m * stride_dh + c_m * stride_dw
    o_kc, o_vc = o_c * stride_kc, o_cv * stride_vc

    p_q = q + i_b * stride_qb + g_r * stride_qh + g_c * stride_qw
    p_do = do + i_b * stride_db + g_r * stride_dh + g_c * stride_dw
    p_k = k + i_b * stride_kb + g_r * stride_kh + g_c * stride_kw
    p_v = v + i_b * stride_vb + g_r * stride_vh + g_c * stride_vw
    b_q = _tile_if(ONE_CQK, p_q, o_qc, o_qm, o_c < Cqk, m_m)  # [BLOCK_CQK, BLOCK_M] when ONE_CQK
    b_do = _tile_if(ONE_CV, p_do, o_dc, o_dm, o_cv < Cv, m_m)  # [BLOCK_CV, BLOCK_M] when ONE_CV
    o_sm = (g_r + r_m) * W + g_c + c_m  # [BLOCK_M] in a contiguous [.., H, W]
    b_lse = tl.load(lse + i_b * H * W + o_sm, mask=m_m, other=0.0) * 1.4426950408889634  # [BLOCK_M]
    b_delta = tl.load(delta + i_b * H * W + o_sm, mask=m_m, other=0.0)  # [BLOCK_M]
    b_dq = tl.zeros([BLOCK_CQK, BLOCK_M], dtype=ACC)

    for n0 in range(0, L, BLOCK_N):
        m_n = o_n < L - n0
        r_n, c_n = ((n0 + o_n) // MW) * M_SH, ((n0 + o_n) % MW) * M_SW  # [BLOCK_N]
        o_kn, o_vn = r_n * stride_kh + c_n * stride_kw, r_n * stride_vh + c_n * stride_vw
        b_s, b_kt = _row_dot(b_q, p_q, o_qc, o_qm, p_k, o_kn, o_kc, stride_qc, stride_kc, m_m,
                             m_n, Cqk, BLOCK_CQK, BLOCK_N, BLOCK_M, ONE_CQK, DOT_PRECISION,
                             DOT_F32)  # [BLOCK_N, BLOCK_M]
        b_p = tl.exp2(b_s * b_qk - b_lse[None, :])
        b_p = tl.where(m_n[:, None], b_p, 0.0)  # [BLOCK_N, BLOCK_M]: padded keys 0
        b_da, _ = _row_dot(b_do, p_do, o_dc, o_dm, p_v, o_vn, o_vc, stride_dc, stride_vc, m_m,
                           m_n, Cv, BLOCK_CV, BLOCK_N, BLOCK_M, ONE_CV, DOT_PRECISION,
                           DOT_F32)  # [BLOCK_N, BLOCK_M]
        b_de = b_p * (b_da - b_delta[None, :])  # [BLOCK_N, BLOCK_M]
        if ONE_CQK:
            b_k = tl.trans(b_kt)  # [BLOCK_CQK, BLOCK_N]
        else:
            b_k = tl.load(p_k + cq_start * stride_kc + (o_kc[:, None] + o_kn[None, :]),
                          mask=m_cq[:, None] & m_n[None, :], other=0.0)  # [BLOCK_CQK, BLOCK_N]
        b_dq += _mm(b_k, b_de.to(b_k.dtype), DOT_PRECISION, DOT_F32)

    p_dq = dq + (i_b * Cqk + cq_start) * H * W
    tl.store(p_dq + (o_c[:, None] * (H * W) + o_sm[None, :]), (b_dq * b_sc).to(dq.dtype.element_ty),
             mask=m_cq[:, None] & m_m[None, :])


@triton.heuristics(_ISA_HEURISTICS)
@triton.jit
def _isa_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv, sc_hi, sc_lo,
    stride_qb, stride_qc, stride_qh, stride_qw,
    stride_kb, stride_kc, stride_kh, stride_kw,
    stride_vb, stride_vc, stride_vh, stride_vw,
    stride_db, stride_dc, stride_dh, stride_dw,
    H, W, Cqk, Cv, L, GW, G_SH, G_SW, MW, M_SH, M_SW,
    N_NB: tl.constexpr, N_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_CQK: tl.constexpr, BLOCK_CV: tl.constexpr, ONE_CQK: tl.constexpr,
    ONE_CV: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    ACC: tl.constexpr, COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr,
):
    """dk and/or dv of the keys (b, members n-block of group g), from the queries of the group.

    Grid: (G * N_NB * N_C, B), N_NB = cdiv(L, BLOCK_N); N_C = 1 with COMPUTE_DK and COMPUTE_DV
    (then ONE_CQK and ONE_CV), cdiv(Cqk, BLOCK_CQK) dk chunks with COMPUTE_DK alone,
    cdiv(Cv, BLOCK_CV) dv chunks with COMPUTE_DV alone.
    """
    i_x = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    # chunk fastest: the programs of one key block run side by side (L2)
    i_c, i_nb, i_g = _split_pid(i_x, N_C, N_NB)
    n_start = i_nb * BLOCK_N
    ck_start = i_c * BLOCK_CQK  # this program's dk channels (COMPUTE_DK)
    cd_start = i_c * BLOCK_CV  # this program's dv channels (COMPUTE_DV)
    o_m = tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, BLOCK_CQK)
    o_cv = tl.arange(0, BLOCK_CV)
    m_n = o_n < L - n_start
    m_ck = o_c < Cqk - ck_start
    m_cd = o_cv < Cv - cd_start
    b_sc = tl.cast(sc_hi, ACC) + tl.cast(sc_lo, ACC)
    b_qk = b_sc * 1.4426950408889634
    g_r, g_c = (i_g // GW) * G_SH, (i_g % GW) * G_SW  # the group's origin
    r_n, c_n = ((n_start + o_n) // MW) * M_SH, ((n_start + o_n) % MW) * M_SW  # [BLOCK_N]
    o_kc, o_kn = o_c * stride_kc, r_n * stride_kh + c_n * stride_kw
    o_vc, o_vn = o_cv * stride_vc, r_n * stride_vh + c_n * stride_vw
    o_qc, o_dc = o_c * stride_qc, o_cv * stride_dc

    p_k = k + i_b * stride_kb + g_r * stride_kh + g_c * stride_kw
    p_v = v + i_b * stride_vb + g_r * stride_vh + g_c * stride_vw
    p_q = q + i_b * stride_qb + g_r * stride_qh + g_c * stride_qw
    p_do = do + i_b * stride_db + g_r * stride_dh + g_c * stride_dw
    p_lse = lse + i_b * H * W + g_r * W + g_c  # the group's origin in lse and delta
    p_delta = delta + i_b * H * W + g_r * W + g_c
    b_k = _tile_if(ONE_CQK, p_k, o_kc, o_kn, o_c < Cqk, m_n)  # [BLOCK_CQK, BLOCK_N] when ONE_CQK
    b_v = _tile_if(ONE_CV, p_v, o_vc, o_vn, o_cv < Cv, m_n)  # [BLOCK_CV, BLOCK_N] when ONE_CV
    b_dk = tl.zeros([BLOCK_CQK, BLOCK_N], dtype=ACC)
    b_dv = tl.zeros([BLOCK_CV, BLOCK_N], dtype=ACC)

    # the group's queries, BLOCK_M at a time; tiles are [queries, keys]
    for m0 in range(0, L, BLOCK_M):
        m_m = o_m < L - m0
        r_m, c_m = ((m0 + o_m) // MW) * M_SH, ((m0 + o_m) % MW) * M_SW  # [BLOCK_M]
        o_qm, o_dm = r_m * stride_qh + c_m * stride_qw, r_m * stride_dh + c_m * stride_dw
        o_sm = r_m * W + c_m
        # padded queries: lse +inf, so p = 0
        b_lse = tl.load(p_lse + o_sm, mask=m_m, other=float("inf"))
        b_lse = b_lse * 1.4426950408889634  # [BLOCK_M]
        b_s, b_qt = _row_dot(b_k, p_k, o_kc, o_kn, p_q, o_qm, o_qc, stride_kc, stride_qc, m_n,
                             m_m, Cqk, BLOCK_CQK, BLOCK_M, BLOCK_N, ONE_CQK, DOT_PRECISION,
                             DOT_F32)  # [BLOCK_M, BLOCK_N]
        b_p = tl.exp2(b_s * b_qk - b_lse[:, None])  # [BLOCK_M, BLOCK_N]
        if COMPUTE_DK:
            b_delta = tl.load(p_delta + o_sm, mask=m_m, other=0.0)  # [BLOCK_M]
            b_da, b_dot = _row_dot(b_v, p_v, o_vc, o_vn, p_do, o_dm, o_dc, stride_vc, stride_dc,
                                   m_n, m_m, Cv, BLOCK_CV, BLOCK_M, BLOCK_N, ONE_CV,
                                   DOT_PRECISION, DOT_F32)  # [BLOCK_M, BLOCK_N]
            b_de = b_p * (b_da - b_delta[:, None])  # [BLOCK_M, BLOCK_N]
            if ONE_CQK:
                b_q = tl.trans(b_qt)  # [BLOCK_CQK, BLOCK_M]
            else:
                b_q = tl.load(p_q + ck_start * stride_qc + (o_qc[:, None] + o_qm[None, :]),
                              mask=m_ck[:, None] & m_m[None, :], other=0.0)  # [BLOCK_CQK, BLOCK_M]
            b_dk += _mm(b_q, b_de.to(b_q.dtype), DOT_PRECISION, DOT_F32)
        if COMPUTE_DV:
            if COMPUTE_DK:
                b_do = tl.trans(b_dot)  # [BLOCK_CV, BLOCK_M]
            else:
                b_do = tl.load(p_do + cd_start * stride_dc + (o_dc[:, None] + o_dm[None, :]),
                               mask=m_cd[:, None] & m_m[None, :], other=0.0)  # [BLOCK_CV, BLOCK_M]
            b_dv += _mm(b_do, b_p.to(b_do.dtype), DOT_PRECISION, DOT_F32)

    o_on = (g_r + r_n) * W + g_c + c_n  # [BLOCK_N] in a contiguous [.., H, W]
    if COMPUTE_DK:
        p_dk = dk + (i_b * Cqk + ck_start) * H * W
        tl.store(p_dk + (o_c[:, None] * (H * W) + o_on[None, :]),
                 (b_dk * b_sc).to(dk.dtype.element_ty), mask=m_ck[:, None] & m_n[None, :])
    if COMPUTE_DV:
        p_dv = dv + (i_b * Cv + cd_start) * H * W
        tl.store(p_dv + (o_cv[:, None] * (H * W) + o_on[None, :]), b_dv.to(dv.dtype.element_ty),
                 mask=m_cd[:, None] & m_n[None, :])


# ----------------------------------------------------------------------------------------------
# host functions
# ----------------------------------------------------------------------------------------------
def _strides(t: torch.Tensor) -> tuple[int, ...]:
    # the kernels address within one sample with 32-bit offsets (the batch offset is 64-bit)
    extent = max(t[0].numel(), sum((n - 1) * s for n, s in zip(t.shape[1:], t.stride()[1:])) + 1)
    if extent >= 2**31:
        raise ValueError(
            f"{_OP}: the Triton backend needs each sample to span fewer than 2**31 elements, got "
            f"shape {tuple(t.shape)}, strides {tuple(t.stride())}")
    return tuple(t.stride())


def _geometry(H: int, W: int, bh: int, bw: int, long_mode: bool) -> tuple[int, tuple[int, ...]]:
    """(G, (L, GW, G_SH, G_SW, MW, M_SH, M_SW)): the groups per sample and the affine pattern of
    the module docstring."""
    gh, gw = H // bh, W // bw
    if long_mode:  # group (a, b) at row a, column b; member (I, J) at I * bh, J * bw from it
        return bh * bw, (gh * gw, bw, 1, 1, gw, bh, bw)
    # short: group (I, J) at row I * bh, column J * bw; member (a, b) at a, b from it
    return gh * gw, (bh * bw, gw, bh, bw, bw, 1, 1)


def _scale_halves(scale: float) -> tuple[float, float]:
    """scale = hi + lo with hi, lo float32: Triton passes Python floats as float32."""
    hi = float(torch.tensor(scale, dtype=torch.float32))
    return hi, float(torch.tensor(scale - hi, dtype=torch.float32))


def _config(L: int, Cqk: int, Cv: int, dtype: torch.dtype) -> dict:
    """Block sizes (tl.dot needs every dim >= 16, so small groups pad to 16).

    16-bit: 64 queries x 64 keys per tile (a short 8x8 group is one tile; a long group of 128 or
    169 members two or three), Cqk in one block up to 128, else chunks of 64, Cv chunks of up to
    128. float32: 32 x 32 tiles, Cqk one block up to 64, else 32, Cv chunks of 32. float64:
    32 x 32 tiles and all channels in one block (the verification path; the shared chunked dot
    helper accumulates in float32). Timed, not tuned, on an H200 (bench/results/h200-session9).
    """
    np2 = triton.next_power_of_2
    f32 = dtype in (torch.float32, torch.float64)
    blk = min(32 if f32 else 64, max(16, np2(L)))
    if dtype == torch.float64:
        return {"BLOCK_M": blk, "BLOCK_N": blk, "BLOCK_CQK": max(16, np2(Cqk)),
                "BLOCK_CV": max(16, np2(Cv))}
    cqk_max = 64 if f32 else 128
    return {
        "BLOCK_M": blk,
        "BLOCK_N": blk,
        "BLOCK_CQK": max(16, np2(Cqk)) if Cqk <= cqk_max else cqk_max // 2,
        "BLOCK_CV": min(32 if f32 else 128, max(16, np2(Cv))),
    }


def _launch(cfg: dict, dtype: torch.dtype) -> dict:
    """num_warps from the largest [channels or keys, queries] tile; 2 pipeline stages for
    float32 and float64, else Triton's default 3."""
    wide = dtype in (torch.float32, torch.float64)
    tile = cfg["BLOCK_M"] * max(cfg["BLOCK_CQK"], cfg["BLOCK_CV"], cfg["BLOCK_N"])
    return {"num_warps": 8 if tile >= (2048 if wide else 4096) else 4,
            "num_stages": 2 if wide else 3}


def _fwd(q, k, v, bh: int, bw: int, long_mode: bool, scale: float, cfg: dict):
    B, Cqk, H, W = q.shape
    Cv = v.shape[1]
    G, geo = _geometry(H, W, bh, bw, long_mode)
    out = torch.empty((B, Cv, H, W), dtype=q.dtype, device=q.device)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.empty((B, H, W), dtype=lse_dtype, device=q.device)
    _strides(out)
    n_mb, n_cv = triton.cdiv(geo[0], cfg["BLOCK_M"]), triton.cdiv(Cv, cfg["BLOCK_CV"])
    _isa_fwd_kernel[(G * n_mb * n_cv, B)](
        q, k, v, out, lse, *_scale_halves(scale), *_strides(q), *_strides(k), *_strides(v),
        H, W, Cqk, Cv, *geo, N_MB=n_mb, N_CV=n_cv, **cfg, **_launch(cfg, q.dtype))
    return out, lse


def _bwd(dout, q, k, v, out, lse, bh: int, bw: int, long_mode: bool, scale: float, cfg: dict):
    B, Cqk, H, W = q.shape
    Cv = v.shape[1]
    G, geo = _geometry(H, W, bh, bw, long_mode)
    L = geo[0]
    if dout.dtype != v.dtype:
        dout = dout.to(v.dtype)
    bm, bn, bcq, bcv = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_CQK"], cfg["BLOCK_CV"]
    lse = lse.contiguous()

    if q.dtype == torch.float64:  # the shared delta kernel accumulates in float32
        delta = torch.einsum("bchw,bchw->bhw", dout, out)
    else:
        delta = torch.empty((B, H, W), dtype=torch.float32, device=q.device)
        bj = min(32, max(16, triton.next_power_of_2(W)))
        _bwd_delta_kernel[(B * H, triton.cdiv(W, bj))](
            dout, out, delta, *_strides(dout), *_strides(out), H, W, Cv, BLOCK_J=bj,
            BLOCK_CV=min(bcv, 64))

    dq = torch.empty((B, Cqk, H, W), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Cqk, H, W), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Cv, H, W), dtype=v.dtype, device=v.device)
    _strides(dv)
    args = (*_scale_halves(scale), *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
            H, W, Cqk, Cv, *geo)
    opts = _launch(cfg, q.dtype)
    n_mb, n_nb, n_cq = triton.cdiv(L, bm), triton.cdiv(L, bn), triton.cdiv(Cqk, bcq)
    _isa_bwd_dq_kernel[(G * n_mb * n_cq, B)](
        q, k, v, dout, lse, delta, dq, *args, N_MB=n_mb, N_CQ=n_cq, **cfg, **opts)
    if Cqk <= bcq and Cv <= bcv:  # one launch for dk and dv
        _isa_bwd_dkdv_kernel[(G * n_nb, B)](
            q, k, v, dout, lse, delta, dk, dv, *args, N_NB=n_nb, N_C=1, **cfg,
            COMPUTE_DK=True, COMPUTE_DV=True, **opts)
    else:
        _isa_bwd_dkdv_kernel[(G * n_nb * n_cq, B)](
            q, k, v, dout, lse, delta, dk, dv, *args, N_NB=n_nb, N_C=n_cq, **cfg,
            COMPUTE_DK=True, COMPUTE_DV=False, **opts)
        n_cd = triton.cdiv(Cv, bcv)
        _isa_bwd_dkdv_kernel[(G * n_nb * n_cd, B)](
            q, k, v, dout, lse, delta, dk, dv, *args, N_NB=n_nb, N_C=n_cd, **cfg,
            COMPUTE_DK=False, COMPUTE_DV=True, **opts)
    return dq, dk, dv


def isa_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bh: int, bw: int,
            long_mode: bool, scale: float, keep_p: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Interlaced sparse self-attention forward (the caller validates shapes and divisibility),
    with the signature of the compiled ``isa_fwd``.

    Args:
        q (Tensor): [B, Cqk, H, W] queries, any strides.
        k (Tensor): [B, Cqk, H, W] keys, any strides.
        v (Tensor): [B, Cv, H, W] values, any strides; q, k, v share one dtype.
        bh, bw (int): the block; ``H % bh == 0`` and ``W % bw == 0``.
        long_mode (bool): True: groups of equal ``(i % bh, j % bw)``; False: ``bh x bw`` blocks.
        scale (float): multiplies the energies ``<q, k>``.
        keep_p (bool): ignored: the backward recomputes the weights from ``lse`` (the compiled
            kernels keep them instead), so p is always empty.

    Returns:
        out [B, Cv, H, W] (dtype of q, NCHW-contiguous), lse [B, H, W] (float32; float64 for
        float64 inputs), and an empty p.
    """
    B, Cqk, H, W = q.shape
    L = (H // bh) * (W // bw) if long_mode else bh * bw
    out, lse = _fwd(q, k, v, bh, bw, long_mode, scale, _config(L, Cqk, v.shape[1], q.dtype))
    return out, lse, lse.new_empty((0,))


def isa_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, p: torch.Tensor, bh: int, bw: int,
            long_mode: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Interlaced sparse self-attention backward from the saved ``out`` and ``lse`` (no atomics),
    with the signature of the compiled ``isa_bwd``.

    Args:
        dout (Tensor): [B, Cv, H, W] gradient of ``out``, any strides.
        q, k, v (Tensor): the forward inputs.
        out (Tensor): [B, Cv, H, W] and lse (Tensor): [B, H, W] from :func:`isa_fwd`.
        p (Tensor): :func:`isa_fwd`'s empty p, not read.
        bh, bw, long_mode, scale: the forward's arguments.

    Returns:
        dq, dk, dv: NCHW-contiguous, shapes and dtypes of q, k, v.
    """
    B, Cqk, H, W = q.shape
    L = (H // bh) * (W // bw) if long_mode else bh * bw
    cfg = _config(L, Cqk, v.shape[1], q.dtype)
    return _bwd(dout, q, k, v, out, lse, bh, bw, long_mode, scale, cfg)
