"""Region attention in Triton: forward and backward kernels.

Every pixel attends to the same S keys of its sample (OCR's object attention; contract in
notes/ra_semantics.md): ``e[n, s] = scale * <q[:, n], k[:, s]> + bias[s]``, softmax over s,
``out[:, n] = sum_s a[n, s] v[:, s]``, ``lse[n] = logsumexp_s e[n, s]`` (float32). q and dout
are NCHW with any strides, read through them (pixel n = h * W + w; one stride per pixel when the
map is flat, FLAT_Q / FLAT_DO); outputs are allocated contiguous. ``-inf`` in bias marks an
absent key; a pixel whose energies are all ``-inf`` gets out 0, lse ``-inf`` and zero gradients
(the running max is guarded, so no ``exp(-inf - -inf)``; the backward uses lse2 = +inf there).

Kernels, in "keys x pixels" tiles so that per-pixel vectors come from axis-0 reductions (the
dk/dv kernel is the mirror: "pixels x keys"):

- forward: a program owns a block of pixels and a chunk of Cv; it loops over the keys BLOCK_S at
  a time (``tl.dot``, Cqk in chunks when it does not fit one block), online softmax in base 2.
- backward, flash style, no atomics: ``D = <dout, out>`` (criss_cross's delta kernel); a dq
  kernel per pixel block that recomputes ``p = exp(e - lse)`` and ``dE = p * (<dout, v> - D)``;
  a dk/dv kernel per (key block, pixel group) that reduces over the group's pixels in registers
  and writes float32 partials [B, G, C, S] (dbias [B, G, S]), summed over G by torch
  (deterministic). G is chosen for enough programs while keeping the partials small. One dk/dv
  launch when Cqk and Cv each fit one block, else a dk(+dbias) launch over Cqk chunks and a dv
  launch over Cv chunks.

16-bit inputs feed ``tl.dot`` directly (p and dE rounded to the input dtype for the second
dot); float32 uses ``input_precision="ieee"`` (tf32x3 measured slower, _common.F32_DOT);
accumulation is float32. The dot helpers, the heuristics (with the interpreter's bfloat16
workaround, triton-lang/triton#11584) and the delta kernel are criss_cross's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastctx.triton._common import (
    _HEURISTICS, _LOG2E, _mm, _row_dot, _split_pid, _tile_if, bwd_delta, cdiv, check_extent,
    heuristics, next_pow2,
)

_OP = "fastctx.region_attention"


_RA_HEURISTICS = {
    **_HEURISTICS,
    # pixels at a constant stride (NCHW-contiguous or channels_last maps): n * stride_w, so that
    # loads vectorize (stride_w == 1 is specialized by Triton); else (n // W, n % W) addressing
    "FLAT_Q": lambda a: a["N"] == a["W"] or a["stride_qh"] == a["W"] * a["stride_qw"],
    "FLAT_DO": lambda a: a["N"] == a["W"] or a.get("stride_dh") == a["W"] * a.get("stride_dw", 0),
}


@triton.jit
def _pixel_offsets(o_n, W, stride_h, stride_w, FLAT: tl.constexpr):
    """Offsets [BLOCK_N] of the pixels o_n = h * W + w of a [.., H, W] tensor with strides."""
    if FLAT:
        o = o_n * stride_w
    else:
        o = (o_n // W) * stride_h + (o_n % W) * stride_w
    return o


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@heuristics(_RA_HEURISTICS)
@triton.jit
def _ra_fwd_kernel(
    q, k, v, bias, out, lse,
    stride_qb, stride_qc, stride_qh, stride_qw,
    stride_kb, stride_kc, stride_ks,
    stride_vb, stride_vc, stride_vs,
    stride_bb, stride_bs,
    N, W, S, Cqk, Cv, qk_scale,
    N_CV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_CQK: tl.constexpr, BLOCK_CV: tl.constexpr, ONE_CQK: tl.constexpr,
    ONE_CV: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    FLAT_Q: tl.constexpr, FLAT_DO: tl.constexpr,
):
    """out[b, cv-chunk, n-block] and lse[b, n-block] (qk_scale = scale * log2(e)).

    Grid: (cdiv(N, BLOCK_N) * N_CV, B), N_CV = cdiv(Cv, BLOCK_CV)
    """
    i_x = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    i_nb = i_x // N_CV
    i_cv = i_x % N_CV
    n_start = i_nb * BLOCK_N
    cv_start = i_cv * BLOCK_CV
    o_n = tl.arange(0, BLOCK_N)
    o_s = tl.arange(0, BLOCK_S)
    o_c = tl.arange(0, BLOCK_CQK)
    o_cv = tl.arange(0, BLOCK_CV)
    m_n = o_n < N - n_start
    m_cv = o_cv < Cv - cv_start
    o_qc, o_qn = o_c * stride_qc, _pixel_offsets(n_start + o_n, W, stride_qh, stride_qw, FLAT_Q)
    o_kc, o_ks = o_c * stride_kc, o_s * stride_ks
    o_vc, o_vs = o_cv * stride_vc, o_s * stride_vs

    p_q = q + i_b * stride_qb
    p_k = k + i_b * stride_kb  # key block s0: + s0 * stride_ks
    p_v = v + i_b * stride_vb + cv_start * stride_vc
    p_bias = bias + i_b * stride_bb
    b_q = _tile_if(ONE_CQK, p_q, o_qc, o_qn, o_c < Cqk, m_n)  # [BLOCK_CQK, BLOCK_N] when ONE_CQK
    b_m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_N], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_CV, BLOCK_N], dtype=tl.float32)

    for s0 in range(0, S, BLOCK_S):
        m_s = o_s < S - s0
        b_s, _ = _row_dot(b_q, p_q, o_qc, o_qn, p_k + s0 * stride_ks, o_ks, o_kc, stride_qc,
                          stride_kc, m_n, m_s, Cqk, BLOCK_CQK, BLOCK_S, BLOCK_N, ONE_CQK,
                          DOT_PRECISION, DOT_F32)  # [BLOCK_S, BLOCK_N]
        # padded keys get bias -inf (base 2 from here on)
        b_bias = tl.load(p_bias + (s0 + o_s) * stride_bs, mask=m_s,
                         other=float("-inf"))  # [BLOCK_S]
        b_s = b_s * qk_scale + b_bias.to(tl.float32)[:, None] * 1.4426950408889634
        b_m_new = tl.maximum(b_m, tl.max(b_s, 0))  # [BLOCK_N]
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # all -inf so far: p = 0
        b_alpha = tl.exp2(b_m - b_m_safe)
        b_p = tl.exp2(b_s - b_m_safe[None, :])  # [BLOCK_S, BLOCK_N]
        b_l = b_l * b_alpha + tl.sum(b_p, 0)
        b_v = tl.load(p_v + s0 * stride_vs + (o_vc[:, None] + o_vs[None, :]),
                      mask=m_cv[:, None] & m_s[None, :], other=0.0)  # [BLOCK_CV, BLOCK_S]
        b_acc = b_acc * b_alpha[None, :] + _mm(b_v, b_p.to(b_v.dtype), DOT_PRECISION, DOT_F32)
        b_m = b_m_new

    b_empty = b_l == 0.0  # fully masked pixels: out 0 (acc is 0), lse -inf
    b_out = b_acc / tl.where(b_empty, 1.0, b_l)[None, :]  # [BLOCK_CV, BLOCK_N]
    p_out = out + (i_b * Cv + cv_start) * N + n_start
    tl.store(p_out + (o_cv[:, None] * N + o_n[None, :]), b_out.to(out.dtype.element_ty),
             mask=m_cv[:, None] & m_n[None, :])
    b_lse = (b_m + tl.log2(tl.where(b_empty, 1.0, b_l))) * 0.6931471805599453  # [BLOCK_N]
    b_lse = tl.where(b_empty, float("-inf"), b_lse)
    tl.store(lse + i_b * N + n_start + o_n, b_lse, mask=m_n & (i_cv == 0))


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_lse2(lse, o_stat, m):
    """log2-based lse of the pixels at ``lse + o_stat`` [BLOCK]: +inf where the pixel is fully
    masked or out of range, so that exp2(e - lse2) = 0 there (also for e = -inf)."""
    b_lse = tl.load(lse + o_stat, mask=m, other=float("-inf"))
    return tl.where(b_lse == float("-inf"), float("inf"), b_lse * 1.4426950408889634)


@heuristics(_RA_HEURISTICS)
@triton.jit
def _ra_bwd_dq_kernel(
    q, k, v, bias, do, lse, delta, dq,
    stride_qb, stride_qc, stride_qh, stride_qw,
    stride_kb, stride_kc, stride_ks,
    stride_vb, stride_vc, stride_vs,
    stride_bb, stride_bs,
    stride_db, stride_dc, stride_dh, stride_dw,
    N, W, S, Cqk, Cv, qk_scale, scale,
    N_CQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_CQK: tl.constexpr, BLOCK_CV: tl.constexpr, ONE_CQK: tl.constexpr,
    ONE_CV: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    FLAT_Q: tl.constexpr, FLAT_DO: tl.constexpr,
):
    """dq[b, cqk-chunk, n-block] = scale * sum_s dE[s, n] * k[:, s].

    Grid: (cdiv(N, BLOCK_N) * N_CQ, B), N_CQ = cdiv(Cqk, BLOCK_CQK)
    """
    i_x = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    i_nb = i_x // N_CQ
    i_cq = i_x % N_CQ
    n_start = i_nb * BLOCK_N
    cq_start = i_cq * BLOCK_CQK  # this program's dq channels
    o_n = tl.arange(0, BLOCK_N)
    o_s = tl.arange(0, BLOCK_S)
    o_c = tl.arange(0, BLOCK_CQK)
    o_cv = tl.arange(0, BLOCK_CV)
    m_n = o_n < N - n_start
    m_cq = o_c < Cqk - cq_start
    o_qc, o_qn = o_c * stride_qc, _pixel_offsets(n_start + o_n, W, stride_qh, stride_qw, FLAT_Q)
    o_dc, o_dn = o_cv * stride_dc, _pixel_offsets(n_start + o_n, W, stride_dh, stride_dw, FLAT_DO)
    o_kc, o_ks = o_c * stride_kc, o_s * stride_ks
    o_vc, o_vs = o_cv * stride_vc, o_s * stride_vs

    p_q = q + i_b * stride_qb
    p_do = do + i_b * stride_db
    p_k = k + i_b * stride_kb  # key block s0: + s0 * stride_ks
    p_v = v + i_b * stride_vb
    p_bias = bias + i_b * stride_bb
    b_q = _tile_if(ONE_CQK, p_q, o_qc, o_qn, o_c < Cqk, m_n)  # [BLOCK_CQK, BLOCK_N] when ONE_CQK
    b_do = _tile_if(ONE_CV, p_do, o_dc, o_dn, o_cv < Cv, m_n)  # [BLOCK_CV, BLOCK_N] when ONE_CV
    b_lse = _load_lse2(lse, i_b * N + n_start + o_n, m_n)  # [BLOCK_N]
    b_delta = tl.load(delta + i_b * N + n_start + o_n, mask=m_n, other=0.0)  # [BLOCK_N]
    b_dq = tl.zeros([BLOCK_CQK, BLOCK_N], dtype=tl.float32)

    for s0 in range(0, S, BLOCK_S):
        m_s = o_s < S - s0
        b_s, b_kt = _row_dot(b_q, p_q, o_qc, o_qn, p_k + s0 * stride_ks, o_ks, o_kc, stride_qc,
                             stride_kc, m_n, m_s, Cqk, BLOCK_CQK, BLOCK_S, BLOCK_N, ONE_CQK,
                             DOT_PRECISION, DOT_F32)  # [BLOCK_S, BLOCK_N]
        b_bias = tl.load(p_bias + (s0 + o_s) * stride_bs, mask=m_s,
                         other=float("-inf"))  # [BLOCK_S]
        b_s = b_s * qk_scale + b_bias.to(tl.float32)[:, None] * 1.4426950408889634
        b_p = tl.exp2(b_s - b_lse[None, :])  # [BLOCK_S, BLOCK_N]
        b_da, _ = _row_dot(b_do, p_do, o_dc, o_dn, p_v + s0 * stride_vs, o_vs, o_vc, stride_dc,
                           stride_vc, m_n, m_s, Cv, BLOCK_CV, BLOCK_S, BLOCK_N, ONE_CV,
                           DOT_PRECISION, DOT_F32)  # [BLOCK_S, BLOCK_N]
        b_de = b_p * (b_da - b_delta[None, :])  # [BLOCK_S, BLOCK_N]
        if ONE_CQK:
            b_k = tl.trans(b_kt)  # [BLOCK_CQK, BLOCK_S]
        else:
            b_k = tl.load(p_k + s0 * stride_ks + cq_start * stride_kc
                          + (o_kc[:, None] + o_ks[None, :]),
                          mask=m_cq[:, None] & m_s[None, :], other=0.0)  # [BLOCK_CQK, BLOCK_S]
        b_dq += _mm(b_k, b_de.to(b_k.dtype), DOT_PRECISION, DOT_F32)

    p_dq = dq + (i_b * Cqk + cq_start) * N + n_start
    tl.store(p_dq + (o_c[:, None] * N + o_n[None, :]), (b_dq * scale).to(dq.dtype.element_ty),
             mask=m_cq[:, None] & m_n[None, :])


@heuristics(_RA_HEURISTICS)
@triton.jit
def _ra_bwd_dkdv_kernel(
    q, k, v, bias, do, lse, delta, dk_part, dv_part, db_part,
    stride_qb, stride_qc, stride_qh, stride_qw,
    stride_kb, stride_kc, stride_ks,
    stride_vb, stride_vc, stride_vs,
    stride_bb, stride_bs,
    stride_db, stride_dc, stride_dh, stride_dw,
    N, W, S, Cqk, Cv, qk_scale, scale, G, pix_per_group,
    N_S: tl.constexpr, N_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_CQK: tl.constexpr, BLOCK_CV: tl.constexpr, ONE_CQK: tl.constexpr,
    ONE_CV: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    FLAT_Q: tl.constexpr, FLAT_DO: tl.constexpr, COMPUTE_DK: tl.constexpr,
    COMPUTE_DV: tl.constexpr,
):
    """Partial dk (and dbias) and/or dv of the key block (b, s-block) over the pixels of group g
    (pixels [g * pix_per_group, (g + 1) * pix_per_group)), written to
    dk_part [B, G, Cqk, S], db_part [B, G, S], dv_part [B, G, Cv, S] (float32, unscaled by
    nothing: final values once summed over G).

    Grid: (G * N_S * N_C, B), N_S = cdiv(S, BLOCK_S); N_C = 1 with COMPUTE_DK and COMPUTE_DV (then
    ONE_CQK and ONE_CV), cdiv(Cqk, BLOCK_CQK) dk chunks with COMPUTE_DK alone (dbias by chunk 0),
    cdiv(Cv, BLOCK_CV) dv chunks with COMPUTE_DV alone.
    """
    i_x = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    # chunk fastest: the programs of one pixel group run side by side (L2)
    i_c, i_s, i_g = _split_pid(i_x, N_C, N_S)
    s_start = i_s * BLOCK_S
    ck_start = i_c * BLOCK_CQK  # this program's dk channels (COMPUTE_DK)
    cd_start = i_c * BLOCK_CV  # this program's dv channels (COMPUTE_DV)
    o_n = tl.arange(0, BLOCK_N)
    o_s = tl.arange(0, BLOCK_S)
    o_c = tl.arange(0, BLOCK_CQK)
    o_cv = tl.arange(0, BLOCK_CV)
    m_s = o_s < S - s_start
    m_ck = o_c < Cqk - ck_start
    m_cd = o_cv < Cv - cd_start
    o_kc, o_ks = o_c * stride_kc, o_s * stride_ks
    o_vc, o_vs = o_cv * stride_vc, o_s * stride_vs
    o_qc, o_dc = o_c * stride_qc, o_cv * stride_dc

    p_k = k + i_b * stride_kb + s_start * stride_ks
    p_v = v + i_b * stride_vb + s_start * stride_vs
    p_q = q + i_b * stride_qb
    p_do = do + i_b * stride_db
    b_k = _tile_if(ONE_CQK, p_k, o_kc, o_ks, o_c < Cqk, m_s)  # [BLOCK_CQK, BLOCK_S] when ONE_CQK
    b_v = _tile_if(ONE_CV, p_v, o_vc, o_vs, o_cv < Cv, m_s)  # [BLOCK_CV, BLOCK_S] when ONE_CV
    b_bias = tl.load(bias + i_b * stride_bb + (s_start + o_s) * stride_bs, mask=m_s,
                     other=float("-inf")).to(tl.float32) * 1.4426950408889634  # [BLOCK_S]
    b_dk = tl.zeros([BLOCK_CQK, BLOCK_S], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_CV, BLOCK_S], dtype=tl.float32)
    b_db = tl.zeros([BLOCK_S], dtype=tl.float32)

    # the group's pixels, BLOCK_N at a time; tiles are [pixels, keys]
    g_start = i_g * pix_per_group
    g_end = tl.minimum(g_start + pix_per_group, N)
    for n0 in range(g_start, g_end, BLOCK_N):
        m_n = o_n < g_end - n0
        o_qn = _pixel_offsets(n0 + o_n, W, stride_qh, stride_qw, FLAT_Q)
        o_dn = _pixel_offsets(n0 + o_n, W, stride_dh, stride_dw, FLAT_DO)
        b_lse = _load_lse2(lse, i_b * N + n0 + o_n, m_n)  # [BLOCK_N]
        b_s, b_qt = _row_dot(b_k, p_k, o_kc, o_ks, p_q, o_qn, o_qc, stride_kc, stride_qc, m_s,
                             m_n, Cqk, BLOCK_CQK, BLOCK_N, BLOCK_S, ONE_CQK, DOT_PRECISION,
                             DOT_F32)  # [BLOCK_N, BLOCK_S]
        b_p = tl.exp2(b_s * qk_scale + b_bias[None, :] - b_lse[:, None])  # [BLOCK_N, BLOCK_S]
        if COMPUTE_DK:
            b_delta = tl.load(delta + i_b * N + n0 + o_n, mask=m_n, other=0.0)  # [BLOCK_N]
            b_da, b_dot = _row_dot(b_v, p_v, o_vc, o_vs, p_do, o_dn, o_dc, stride_vc, stride_dc,
                                   m_s, m_n, Cv, BLOCK_CV, BLOCK_N, BLOCK_S, ONE_CV,
                                   DOT_PRECISION, DOT_F32)  # [BLOCK_N, BLOCK_S]
            b_de = b_p * (b_da - b_delta[:, None])  # [BLOCK_N, BLOCK_S]
            b_db += tl.sum(b_de, 0)
            if ONE_CQK:
                b_q = tl.trans(b_qt)  # [BLOCK_CQK, BLOCK_N]
            else:
                b_q = tl.load(p_q + ck_start * stride_qc + (o_qc[:, None] + o_qn[None, :]),
                              mask=m_ck[:, None] & m_n[None, :], other=0.0)  # [BLOCK_CQK, BLOCK_N]
            b_dk += _mm(b_q, b_de.to(b_q.dtype), DOT_PRECISION, DOT_F32)
        if COMPUTE_DV:
            if COMPUTE_DK:
                b_do = tl.trans(b_dot)  # [BLOCK_CV, BLOCK_N]
            else:
                b_do = tl.load(p_do + cd_start * stride_dc + (o_dc[:, None] + o_dn[None, :]),
                               mask=m_cd[:, None] & m_n[None, :], other=0.0)  # [BLOCK_CV, BLOCK_N]
            b_dv += _mm(b_do, b_p.to(b_do.dtype), DOT_PRECISION, DOT_F32)

    i_bg = i_b * G + i_g
    if COMPUTE_DK:
        p_dk = dk_part + (i_bg * Cqk + ck_start) * S + s_start
        tl.store(p_dk + (o_c[:, None] * S + o_s[None, :]), b_dk * scale,
                 mask=m_ck[:, None] & m_s[None, :])
        tl.store(db_part + i_bg * S + s_start + o_s, b_db, mask=m_s & (i_c == 0))
    if COMPUTE_DV:
        p_dv = dv_part + (i_bg * Cv + cd_start) * S + s_start
        tl.store(p_dv + (o_cv[:, None] * S + o_s[None, :]), b_dv,
                 mask=m_cd[:, None] & m_s[None, :])


# ----------------------------------------------------------------------------------------------
# host functions
# ----------------------------------------------------------------------------------------------
def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"{_OP}: the Triton backend supports float32, float16 and bfloat16 inputs, got "
            f"{t.dtype} (use the CPU/CUDA backend for float64)")


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    check_extent(_OP, t)
    return tuple(t.stride())


def _config(N: int, S: int, Cqk: int, Cv: int, dtype: torch.dtype) -> dict:
    """Block sizes (tl.dot needs every dim >= 16): 64 pixels per program (32 in float32), 64 keys
    per step (32 in float32), the Cqk channels in one block up to 128 (64 in float32), else chunks
    of half that, and Cv chunks of up to 128 (32 in float32). Timed, not tuned, on an H200
    (bench/results/h200-session9).
    """
    f32 = dtype == torch.float32
    np2 = next_pow2
    cqk_max = 64 if f32 else 128
    return {
        "BLOCK_N": min(32 if f32 else 64, max(16, np2(N))),
        "BLOCK_S": min(32 if f32 else 64, max(16, np2(S))),
        "BLOCK_CQK": max(16, np2(Cqk)) if Cqk <= cqk_max else cqk_max // 2,
        "BLOCK_CV": min(32 if f32 else 128, max(16, np2(Cv))),
    }


def _launch(cfg: dict, dtype: torch.dtype) -> dict:
    """num_warps from the largest [channels or keys, pixels] tile; 2 pipeline stages for
    float32, else Triton's default 3."""
    f32 = dtype == torch.float32
    tile = cfg["BLOCK_N"] * max(cfg["BLOCK_CQK"], cfg["BLOCK_CV"], cfg["BLOCK_S"])
    return {"num_warps": 8 if tile >= (2048 if f32 else 4096) else 4,
            "num_stages": 2 if f32 else 3}


def _n_groups(n_blocks: int, programs_per_group: int, device: torch.device) -> int:
    """Pixel groups of the dk/dv reduction: about 4 programs per SM (4 on the CPU interpreter),
    at most one group per pixel block. Fewer groups keep the float32 partials small."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    return max(1, min(n_blocks, cdiv(target, programs_per_group)))


def _fwd(q, k, v, bias, scale: float, cfg: dict):
    _check_dtype(q)
    B, Cqk, H, W = q.shape
    Cv, S = v.shape[1], v.shape[2]
    N = H * W
    out = torch.empty((B, Cv, H, W), dtype=v.dtype, device=v.device)
    lse = torch.empty((B, H, W), dtype=torch.float32, device=v.device)
    n_cv = cdiv(Cv, cfg["BLOCK_CV"])
    _strides(out)
    _ra_fwd_kernel[(cdiv(N, cfg["BLOCK_N"]) * n_cv, B)](
        q, k, v, bias, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(bias),
        N, W, S, Cqk, Cv, float(scale) * _LOG2E, N_CV=n_cv, **cfg, **_launch(cfg, q.dtype))
    return out, lse


def _bwd(dout, q, k, v, bias, out, lse, scale: float, cfg: dict, n_groups: int | None = None):
    """n_groups: pixel groups of the dk/dv reduction (default: _n_groups; tests force it)."""
    _check_dtype(q)
    B, Cqk, H, W = q.shape
    Cv, S = v.shape[1], v.shape[2]
    N = H * W
    if dout.dtype != v.dtype:
        dout = dout.to(v.dtype)
    bn, bs, bcq, bcv = cfg["BLOCK_N"], cfg["BLOCK_S"], cfg["BLOCK_CQK"], cfg["BLOCK_CV"]
    n_blocks, n_s = cdiv(N, bn), cdiv(S, bs)
    lse = lse.contiguous()

    s_do = _strides(dout)  # checked (with out) before the delta kernel reads them
    _strides(out)
    delta = bwd_delta(dout, out, min(bcv, 64))

    dq = torch.empty((B, Cqk, H, W), dtype=q.dtype, device=q.device)
    _strides(dq)
    args = (*_strides(q), *_strides(k), *_strides(v), *_strides(bias), *s_do,
            N, W, S, Cqk, Cv, float(scale) * _LOG2E, float(scale))
    opts = _launch(cfg, q.dtype)
    n_cq = cdiv(Cqk, bcq)
    _ra_bwd_dq_kernel[(n_blocks * n_cq, B)](
        q, k, v, bias, dout, lse, delta, dq, *args, N_CQ=n_cq, **cfg, **opts)

    def reduce(compute_dk: bool, compute_dv: bool, n_c: int):
        g = n_groups or _n_groups(n_blocks, B * n_s * n_c, q.device)
        pix = cdiv(n_blocks, g) * bn  # whole pixel blocks per group
        g = cdiv(N, pix)  # no empty group
        f32 = {"dtype": torch.float32, "device": q.device}
        dk_p = torch.empty((B, g, Cqk, S), **f32) if compute_dk else None
        db_p = torch.empty((B, g, S), **f32) if compute_dk else None
        dv_p = torch.empty((B, g, Cv, S), **f32) if compute_dv else None
        _ra_bwd_dkdv_kernel[(g * n_s * n_c, B)](
            q, k, v, bias, dout, lse, delta, dk_p, dv_p, db_p, *args, g, pix, N_S=n_s, N_C=n_c,
            **cfg, COMPUTE_DK=compute_dk, COMPUTE_DV=compute_dv, **opts)
        return dk_p, db_p, dv_p

    if Cqk <= bcq and Cv <= bcv:  # one launch for dk, dbias and dv
        dk_p, db_p, dv_p = reduce(True, True, 1)
    else:
        dk_p, db_p, _ = reduce(True, False, n_cq)
        _, _, dv_p = reduce(False, True, cdiv(Cv, bcv))
    # deterministic second-level sums over the pixel groups
    dk = dk_p.sum(1).to(k.dtype)
    dv = dv_p.sum(1).to(v.dtype)
    dbias = db_p.sum(1).to(bias.dtype)
    return dq, dk, dv, dbias


def ra_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
           scale: float, keep_p: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Region attention forward, with the signature of the compiled ``ra_fwd``.

    Args:
        q (Tensor): [B, Cqk, H, W] pixel queries, any strides.
        k (Tensor): [B, Cqk, S] keys.
        v (Tensor): [B, Cv, S] values.
        bias (Tensor): [B, S] additive logit bias (zeros when the user passed none; -inf allowed).
        scale (float): multiplies the energies ``<q, k>``.
        keep_p (bool): ignored: the backward recomputes the weights from ``lse`` (the compiled
            kernels keep them instead), so p is always empty.

    Returns:
        out [B, Cv, H, W] (dtype of v, NCHW-contiguous), lse [B, H, W] float32 (-inf for fully
        masked pixels, whose out is 0), and an empty p.
    """
    B, Cqk, H, W = q.shape
    out, lse = _fwd(q, k, v, bias, scale, _config(H * W, k.shape[2], Cqk, v.shape[1], q.dtype))
    return out, lse, lse.new_empty((0,))


def ra_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           bias: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, p: torch.Tensor,
           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Region attention backward from the saved ``out`` and ``lse`` (no atomics; deterministic),
    with the signature of the compiled ``ra_bwd``.

    Args:
        dout (Tensor): [B, Cv, H, W] gradient of ``out``, any strides.
        q, k, v, bias (Tensor): the forward inputs.
        out (Tensor): [B, Cv, H, W] and lse (Tensor): [B, H, W] from :func:`ra_fwd`.
        p (Tensor): :func:`ra_fwd`'s empty p, not read.
        scale (float): the forward's scale.

    Returns:
        dq [B, Cqk, H, W] (NCHW-contiguous), dk [B, Cqk, S], dv [B, Cv, S], dbias [B, S]:
        contiguous, in the dtypes of q, k, v, bias.
    """
    B, Cqk, H, W = q.shape
    cfg = _config(H * W, k.shape[2], Cqk, v.shape[1], q.dtype)
    return _bwd(dout, q, k, v, bias, out, lse, scale, cfg)
