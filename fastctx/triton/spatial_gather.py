"""Spatial gather (OCR's soft region pooling) in Triton: forward and backward kernels.

For each class k the softmax runs over the N = H * W pixels of ``scale * logits[k]``:
``regions[:, k] = sum_n w[k, n] feats[:, n]``, ``lse[k] = logsumexp_n scale * logits[k, n]``
(float32). feats and logits are NCHW with any strides, read through them (pixel n = h * W + w; one
stride per pixel when the map is flat, FLAT_F / FLAT_L); outputs are allocated contiguous. A class
whose logits are all ``-inf`` gets a zero region, lse ``-inf`` and zero gradients (the running max
is guarded, so no ``exp(-inf - -inf)``; the backward uses lse2 = +inf there).

Kernels:

- forward: a program owns a block of channels x a block of classes of one image and a split of the
  pixels; it streams its pixels BLOCK_N at a time with an online softmax per class (running max
  and sum, base 2) and ``acc [C, K] += feats [C, n] @ p^T [n, K]`` (``tl.dot``). The channel and
  class blocks of one pixel split are adjacent program ids, so they read the split's feats and
  logits at about the same time (L2). With one split the program normalises and writes regions
  and lse; with several it writes float32 partials (acc, max, sum) and a combine kernel merges the
  splits in split order: deterministic, no atomics. Nothing of size K x N is stored.
- backward: a program owns a block of pixels of one image, for every class block: it recomputes
  ``w = exp2(scale * l * log2(e) - lse2)``, accumulates ``G = dR^T @ feats`` over channel blocks
  while writing ``dfeats = dR @ w`` for each channel block (added to what the earlier class
  blocks wrote, by the same program: no atomics), then ``dlogits = scale * w * (G - D)`` with
  ``D[k] = sum_c dR[c, k] * regions[c, k]``. feats is read once per class block (once when K fits
  one block, as at OCR's sizes).

16-bit inputs feed ``tl.dot`` directly (p and w rounded to the input dtype); float32 uses
``input_precision="tf32x3"``; accumulation is float32. Block sizes are not yet tuned on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastctx.triton._common import (
    F32_DOT, _LOG2E, _mm, _split_pid, cdiv, check_extent, dot_f32, heuristics, next_pow2,
)

_OP = "fastctx.spatial_gather"

_SG_HEURISTICS = {
    # float32 dots in float32's accuracy on tensor cores (tf32x3, _common.F32_DOT); the 16-bit
    # dtypes ignore it.
    "DOT_PRECISION": lambda a: F32_DOT if a["feats"].dtype == torch.float32 else "tf32",
    "DOT_F32": lambda a: dot_f32(a["feats"].dtype),
    # pixels at a constant stride (NCHW-contiguous or channels_last maps): n * stride_w
    "FLAT_F": lambda a: a["N"] == a["W"] or a["stride_fh"] == a["W"] * a["stride_fw"],
    "FLAT_L": lambda a: a["N"] == a["W"] or a["stride_lh"] == a["W"] * a["stride_lw"],
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
@heuristics(_SG_HEURISTICS)
@triton.jit
def _sg_fwd_kernel(
    feats, logits, out, lse, acc_part, m_part, l_part,
    stride_fb, stride_fc, stride_fh, stride_fw,
    stride_lb, stride_lk, stride_lh, stride_lw,
    N, W, C, K, qk_scale, n_split, pix_per_split,
    N_C: tl.constexpr, N_K: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr, FLAT_F: tl.constexpr, FLAT_L: tl.constexpr,
):
    """regions[b, c-block, k-block] over the pixels of split s (qk_scale = scale * log2(e)).

    SPLIT: write float32 partials acc_part [B, n_split, C, K], m_part / l_part [B, n_split, K]
    (base-2 running max and sum); else regions out [B, C, K] and lse [B, K].

    Grid: (n_split * N_C * N_K, B), N_C = cdiv(C, BLOCK_C), N_K = cdiv(K, BLOCK_K)
    """
    i_x = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    # class and channel blocks fastest: a split's programs run side by side
    i_k, i_c, i_s = _split_pid(i_x, N_K, N_C)
    c_start = i_c * BLOCK_C
    k_start = i_k * BLOCK_K
    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, BLOCK_C)
    o_k = tl.arange(0, BLOCK_K)
    m_c = o_c < C - c_start
    m_k = o_k < K - k_start
    p_f = feats + i_b * stride_fb + c_start * stride_fc
    p_l = logits + i_b * stride_lb + k_start * stride_lk
    o_fc = o_c * stride_fc
    o_lk = o_k * stride_lk

    b_m = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_K], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_C, BLOCK_K], dtype=tl.float32)
    n_lo = i_s * pix_per_split
    n_hi = tl.minimum(n_lo + pix_per_split, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        m_n = o_n < n_hi - n0
        o_fn = _pixel_offsets(n0 + o_n, W, stride_fh, stride_fw, FLAT_F)
        o_ln = _pixel_offsets(n0 + o_n, W, stride_lh, stride_lw, FLAT_L)
        # padded classes and pixels read -inf: weight 0
        b_s = tl.load(p_l + (o_lk[:, None] + o_ln[None, :]), mask=m_k[:, None] & m_n[None, :],
                      other=float("-inf")).to(tl.float32) * qk_scale  # [BLOCK_K, BLOCK_N]
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))  # [BLOCK_K]
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # all -inf so far: p = 0
        b_alpha = tl.exp2(b_m - b_m_safe)
        b_p = tl.exp2(b_s - b_m_safe[:, None])  # [BLOCK_K, BLOCK_N]
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_f = tl.load(p_f + (o_fc[:, None] + o_fn[None, :]), mask=m_c[:, None] & m_n[None, :],
                      other=0.0)  # [BLOCK_C, BLOCK_N]
        b_acc = b_acc * b_alpha[None, :] + _mm(b_f, tl.trans(b_p.to(b_f.dtype)), DOT_PRECISION,
                                               DOT_F32)  # [BLOCK_C, BLOCK_K]
        b_m = b_m_new

    m_ck = m_c[:, None] & m_k[None, :]
    if SPLIT:
        i_bs = i_b * n_split + i_s
        p_acc = acc_part + (i_bs * C + c_start) * K + k_start
        tl.store(p_acc + (o_c[:, None] * K + o_k[None, :]), b_acc, mask=m_ck)
        m_stat = m_k & (i_c == 0)
        tl.store(m_part + i_bs * K + k_start + o_k, b_m, mask=m_stat)
        tl.store(l_part + i_bs * K + k_start + o_k, b_l, mask=m_stat)
    else:
        b_empty = b_l == 0.0  # every logit of the class is -inf: region 0 (acc is 0), lse -inf
        b_out = b_acc / tl.where(b_empty, 1.0, b_l)[None, :]  # [BLOCK_C, BLOCK_K]
        p_out = out + (i_b * C + c_start) * K + k_start
        tl.store(p_out + (o_c[:, None] * K + o_k[None, :]), b_out.to(out.dtype.element_ty),
                 mask=m_ck)
        b_lse = (b_m + tl.log2(tl.where(b_empty, 1.0, b_l))) * 0.6931471805599453
        b_lse = tl.where(b_empty, float("-inf"), b_lse)
        tl.store(lse + i_b * K + k_start + o_k, b_lse, mask=m_k & (i_c == 0))


@triton.jit
def _sg_combine_kernel(
    acc_part, m_part, l_part, out, lse, C, K, n_split,
    N_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Merge the pixel splits of the forward, in split order: regions out [B, C, K], lse [B, K].

    Grid: (cdiv(C, BLOCK_C) * N_K, B), N_K = cdiv(K, BLOCK_K)
    """
    i_x = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    i_k = i_x % N_K
    i_c = i_x // N_K
    c_start = i_c * BLOCK_C
    k_start = i_k * BLOCK_K
    o_c = tl.arange(0, BLOCK_C)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < K - k_start
    m_ck = (o_c < C - c_start)[:, None] & m_k[None, :]
    p_stat = i_b * n_split * K + k_start + o_k  # split s: + s * K

    b_max = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
    for s in range(0, n_split):
        b_max = tl.maximum(b_max, tl.load(m_part + p_stat + s * K, mask=m_k, other=float("-inf")))
    b_max_safe = tl.where(b_max == float("-inf"), 0.0, b_max)
    b_l = tl.zeros([BLOCK_K], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_C, BLOCK_K], dtype=tl.float32)
    for s in range(0, n_split):
        b_coef = tl.exp2(tl.load(m_part + p_stat + s * K, mask=m_k, other=float("-inf"))
                         - b_max_safe)  # [BLOCK_K]
        b_l += tl.load(l_part + p_stat + s * K, mask=m_k, other=0.0) * b_coef
        p_acc = acc_part + ((i_b * n_split + s) * C + c_start) * K + k_start
        b_acc += tl.load(p_acc + (o_c[:, None] * K + o_k[None, :]), mask=m_ck,
                         other=0.0) * b_coef[None, :]
    b_empty = b_l == 0.0
    b_out = b_acc / tl.where(b_empty, 1.0, b_l)[None, :]
    p_out = out + (i_b * C + c_start) * K + k_start
    tl.store(p_out + (o_c[:, None] * K + o_k[None, :]), b_out.to(out.dtype.element_ty), mask=m_ck)
    b_lse = (b_max + tl.log2(tl.where(b_empty, 1.0, b_l))) * 0.6931471805599453
    b_lse = tl.where(b_empty, float("-inf"), b_lse)
    tl.store(lse + i_b * K + k_start + o_k, b_lse, mask=m_k & (i_c == 0))


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@heuristics(_SG_HEURISTICS)
@triton.jit
def _sg_bwd_kernel(
    feats, logits, dout, lse, dsum, dfeats, dlogits,
    stride_fb, stride_fc, stride_fh, stride_fw,
    stride_lb, stride_lk, stride_lh, stride_lw,
    stride_db, stride_dc, stride_dk,
    N, W, C, K, qk_scale, scale,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr, FLAT_F: tl.constexpr,
    FLAT_L: tl.constexpr,
):
    """dfeats [B, C, N] and dlogits [B, K, N] (contiguous) of pixel block n of image b.

    dsum [B, K] = sum_c dout * regions (float32); lse [B, K] float32.

    Grid: (cdiv(N, BLOCK_N), B)
    """
    i_n = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    n_start = i_n * BLOCK_N
    o_n = tl.arange(0, BLOCK_N)
    o_c = tl.arange(0, BLOCK_C)
    o_k = tl.arange(0, BLOCK_K)
    m_n = o_n < N - n_start
    o_fn = _pixel_offsets(n_start + o_n, W, stride_fh, stride_fw, FLAT_F)
    o_ln = _pixel_offsets(n_start + o_n, W, stride_lh, stride_lw, FLAT_L)
    p_f = feats + i_b * stride_fb
    p_l = logits + i_b * stride_lb
    p_do = dout + i_b * stride_db
    p_df = dfeats + i_b * C * N + n_start
    p_dl = dlogits + i_b * K * N + n_start

    for k0 in range(0, K, BLOCK_K):
        m_k = o_k < K - k0
        b_lse = tl.load(lse + i_b * K + k0 + o_k, mask=m_k, other=float("-inf"))  # [BLOCK_K]
        # base 2; +inf for empty (and padded) classes, so that w = 0 there
        b_lse2 = tl.where(b_lse == float("-inf"), float("inf"), b_lse * 1.4426950408889634)
        b_s = tl.load(p_l + ((k0 + o_k) * stride_lk)[:, None] + o_ln[None, :],
                      mask=m_k[:, None] & m_n[None, :],
                      other=float("-inf")).to(tl.float32) * qk_scale  # [BLOCK_K, BLOCK_N]
        b_w = tl.exp2(b_s - b_lse2[:, None])  # [BLOCK_K, BLOCK_N]
        b_g = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            m_c = o_c < C - c0
            b_f = tl.load(p_f + ((c0 + o_c) * stride_fc)[:, None] + o_fn[None, :],
                          mask=m_c[:, None] & m_n[None, :], other=0.0)  # [BLOCK_C, BLOCK_N]
            b_drt = tl.load(p_do + ((k0 + o_k) * stride_dk)[:, None] + ((c0 + o_c) * stride_dc)[None, :],
                            mask=m_k[:, None] & m_c[None, :], other=0.0)  # [BLOCK_K, BLOCK_C]
            b_g += _mm(b_drt, b_f.to(b_drt.dtype), DOT_PRECISION, DOT_F32)
            b_df = _mm(tl.trans(b_drt), b_w.to(b_drt.dtype), DOT_PRECISION,
                       DOT_F32)  # [BLOCK_C, BLOCK_N]
            o_df = (c0 + o_c)[:, None] * N + o_n[None, :]
            m_df = m_c[:, None] & m_n[None, :]
            if k0 > 0:  # earlier class blocks of this program wrote these columns
                b_df += tl.load(p_df + o_df, mask=m_df, other=0.0).to(tl.float32)
            tl.store(p_df + o_df, b_df.to(dfeats.dtype.element_ty), mask=m_df)
        b_d = tl.load(dsum + i_b * K + k0 + o_k, mask=m_k, other=0.0)  # [BLOCK_K]
        b_dl = scale * b_w * (b_g - b_d[:, None])  # [BLOCK_K, BLOCK_N]
        tl.store(p_dl + (k0 + o_k)[:, None] * N + o_n[None, :], b_dl.to(dlogits.dtype.element_ty),
                 mask=m_k[:, None] & m_n[None, :])


# ----------------------------------------------------------------------------------------------
# host functions
# ----------------------------------------------------------------------------------------------
def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"{_OP}: the Triton backend supports float32, float16 and bfloat16 inputs, got "
            f"{t.dtype} (use the CPU backend for float64)")


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    check_extent(_OP, t)
    return tuple(t.stride())


def _config(C: int, K: int, dtype: torch.dtype) -> dict:
    """Block sizes (tl.dot needs every dim >= 16): 64 pixels per step (32 in float32), classes in
    one block up to 128 (64 in float32), channels in blocks of up to 128 (64 in float32). Timed,
    not tuned, on an H200 (bench/results/h200-session9)."""
    f32 = dtype == torch.float32
    np2 = next_pow2
    return {
        "BLOCK_N": 32 if f32 else 64,
        "BLOCK_C": min(64 if f32 else 128, max(16, np2(C))),
        "BLOCK_K": min(64 if f32 else 128, max(16, np2(K))),
    }


def _bwd_config(C: int, K: int, dtype: torch.dtype) -> dict:
    """The backward holds w and G [BLOCK_K, BLOCK_N] for its whole channel loop: 32 pixels per
    program, channels in blocks of up to 64, classes as in the forward."""
    return {**_config(C, K, dtype), "BLOCK_N": 32, "BLOCK_C": min(64, max(16, next_pow2(C)))}


def _launch(cfg: dict, dtype: torch.dtype) -> dict:
    f32 = dtype == torch.float32
    tile = max(cfg["BLOCK_C"] * cfg["BLOCK_K"], cfg["BLOCK_N"] * max(cfg["BLOCK_C"], cfg["BLOCK_K"]))
    return {"num_warps": 8 if tile >= (2048 if f32 else 4096) else 4,
            "num_stages": 2 if f32 else 3}


def _n_split(n_blocks: int, programs_per_split: int, max_split: int, device: torch.device) -> int:
    """Pixel splits of the forward: about 4 programs per SM (1 split on the CPU interpreter), at
    most one split per pixel block and at most max_split."""
    if device.type != "cuda":
        return 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_blocks, max_split, cdiv(target, programs_per_split)))


def _fwd(feats, logits, scale: float, cfg: dict, n_split: int | None = None):
    """n_split: pixel splits (default: _n_split; tests force it)."""
    _check_dtype(feats)
    B, C, H, W = feats.shape
    K, N = logits.shape[1], H * W
    bn, bc, bk = cfg["BLOCK_N"], cfg["BLOCK_C"], cfg["BLOCK_K"]
    n_c, n_k = cdiv(C, bc), cdiv(K, bk)
    n_blocks = cdiv(N, bn)
    # each split writes float32 partials of C x K: keep them under ~10 % of the bytes of feats
    max_split = max(1, N * feats.element_size() // (40 * K))
    s = n_split or _n_split(n_blocks, B * n_c * n_k, max_split, feats.device)
    pix = cdiv(n_blocks, s) * bn  # whole pixel blocks per split
    s = cdiv(N, pix)  # no empty split
    out = torch.empty((B, C, K), dtype=feats.dtype, device=feats.device)
    lse = torch.empty((B, K), dtype=torch.float32, device=feats.device)
    f32 = {"dtype": torch.float32, "device": feats.device}
    if s > 1:
        acc_p, m_p, l_p = torch.empty((B, s, C, K), **f32), torch.empty((B, s, K), **f32), torch.empty((B, s, K), **f32)
    else:
        acc_p = m_p = l_p = lse  # unused
    _strides(acc_p)
    opts = _launch(cfg, feats.dtype)
    _sg_fwd_kernel[(s * n_c * n_k, B)](
        feats, logits, out, lse, acc_p, m_p, l_p, *_strides(feats), *_strides(logits),
        N, W, C, K, float(scale) * _LOG2E, s, pix, N_C=n_c, N_K=n_k, SPLIT=s > 1, **cfg, **opts)
    if s > 1:
        _sg_combine_kernel[(n_c * n_k, B)](
            acc_p, m_p, l_p, out, lse, C, K, s, N_K=n_k, BLOCK_C=bc, BLOCK_K=bk,
            num_warps=opts["num_warps"])
    return out, lse


def _bwd(dout, feats, logits, out, lse, scale: float, cfg: dict):
    _check_dtype(feats)
    B, C, H, W = feats.shape
    K, N = logits.shape[1], H * W
    if dout.dtype != feats.dtype:
        dout = dout.to(feats.dtype)
    dsum = (dout.float() * out.float()).sum(1)  # [B, K]
    bk = cfg["BLOCK_K"]
    # several class blocks add into dfeats: keep it in float32 until the end
    acc_dtype = feats.dtype if K <= bk else torch.float32
    dfeats = torch.empty((B, C, H, W), dtype=acc_dtype, device=feats.device)
    dlogits = torch.empty((B, K, H, W), dtype=logits.dtype, device=feats.device)
    _strides(dfeats)
    _strides(dlogits)
    _sg_bwd_kernel[(cdiv(N, cfg["BLOCK_N"]), B)](
        feats, logits, dout, lse.contiguous(), dsum, dfeats, dlogits, *_strides(feats),
        *_strides(logits), *_strides(dout), N, W, C, K, float(scale) * _LOG2E, float(scale),
        **cfg, **_launch(cfg, feats.dtype))
    return dfeats.to(feats.dtype), dlogits


def sg_fwd(feats: torch.Tensor, logits: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial gather forward.

    Args:
        feats (Tensor): [B, C, H, W] any strides.
        logits (Tensor): [B, K, H, W] any strides (-inf allowed).
        scale (float): multiplies the logits (> 0).

    Returns:
        regions [B, C, K] (dtype of feats, contiguous), lse [B, K] float32 (-inf for a class whose
        logits are all -inf; its region is 0).
    """
    return _fwd(feats, logits, scale, _config(feats.shape[1], logits.shape[1], feats.dtype))


def sg_bwd(dout: torch.Tensor, feats: torch.Tensor, logits: torch.Tensor, out: torch.Tensor,
           lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial gather backward from the saved ``regions`` and ``lse`` (no atomics; deterministic).

    Args:
        dout (Tensor): [B, C, K] gradient of the regions.
        feats, logits (Tensor): the forward inputs.
        out (Tensor): [B, C, K] regions and lse (Tensor): [B, K] from :func:`sg_fwd`.
        scale (float): the forward's scale.

    Returns:
        dfeats [B, C, H, W], dlogits [B, K, H, W]: NCHW-contiguous, in the dtypes of the inputs.
    """
    cfg = _bwd_config(feats.shape[1], logits.shape[1], feats.dtype)
    return _bwd(dout, feats, logits, out, lse, scale, cfg)
