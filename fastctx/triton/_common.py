"""Helpers shared by the Triton kernels: heuristics, the float32-accumulating dot, the program-id
split and the optional tile preload of the kernels' prologues, channel-chunked dot products and
the backward's ``delta = <dout, out>`` kernel; and by their host functions: the 32-bit extent
check and the delta launch."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Heuristics

_LOG2E = 1.4426950408889634

#: ``input_precision`` of the float32 dots where it measured faster than "ieee" (FMA loops) on an
#: H200 (bench/results/h200-session9: run 1 "ieee", run 2 "tf32x3", two leases). "tf32x3" splits
#: each operand into a TF32 part and a TF32 remainder and adds three tensor-core products,
#: float32's accuracy (the dropped product of the remainders is ~2^-22 relative). Faster:
#: interlaced attention (1.6-1.9x forward and backward), the pyramid pool (with smaller blocks:
#: 6-8x forward), spatial gather (forward 1.6-6.6x, backward 0.6-1.0x, forward+backward
#: 0.8-2.1x), the segmented sum (~2x forward), criss-cross since its rewrite on tensor cores
#: (forward+backward ~1.9x: h200-session10). Slower, so it keeps "ieee": region attention
#: (forward 1.4-2.1x slower; why is not established). The interpreter computes in float32
#: either way.
F32_DOT = "tf32x3"

class _Heuristics(Heuristics):
    """``triton.heuristics`` with the arguments' dict built once per launch, not once per
    heuristic (triton 3.6 and 3.8 rebuild it for each): the spatial-gather forward kernel's
    launch path, four heuristics, 20.2 -> 15.8 us on the 2-core CPU (medians of 30 alternating
    rounds, bench/compile_check.py's mock driver; 12.1 us with the constexprs passed by hand)."""

    def run(self, *args, **kwargs):
        named = dict(zip(self.arg_names, args), **kwargs)
        for name, heur in self.values.items():
            kwargs[name] = named[name] = heur(named)
        return self.fn.run(*args, **kwargs)


def heuristics(values: dict):
    """Decorator: :class:`_Heuristics` over a jitted kernel (as ``triton.heuristics``)."""
    return lambda fn: _Heuristics(fn, fn.arg_names, values)


_HEURISTICS = {
    "ONE_CQK": lambda a: a["Cqk"] <= a["BLOCK_CQK"],
    "ONE_CV": lambda a: a["Cv"] <= a["BLOCK_CV"],
    # float32 dots in full precision, FMA loops (region attention: tf32x3 measured slower there,
    # F32_DOT); the 16-bit dtypes ignore it.
    "DOT_PRECISION": lambda a: "ieee" if a["q"].dtype == torch.float32 else "tf32",
    "DOT_F32": lambda a: dot_f32(a["q"].dtype),
}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """tl.dot(a, b) accumulated in float32 (operands upcast when DOT_F32)."""
    if DOT_F32:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")  # interpreter only
    else:
        c = tl.dot(a, b, input_precision=DOT_PRECISION)
    return c


# under TRITON_INTERPRET=1, triton.jit gives an InterpretedFunction, not a JITFunction
_INTERPRET = not isinstance(_mm, triton.runtime.JITFunction)


def dot_f32(dtype: torch.dtype) -> bool:
    """The DOT_F32 constexpr of a kernel's dots on ``dtype`` operands: the Triton interpreter
    multiplies the bit patterns of bfloat16 dot operands (triton-lang/triton#11584), so they are
    upcast there."""
    return _INTERPRET and dtype == torch.bfloat16


@triton.jit
def _split_pid(i_x, N_INNER: tl.constexpr, N_MID: tl.constexpr):
    """(inner, middle, outer) of a program id ``i_x = (outer * N_MID + middle) * N_INNER + inner``:
    the inner index varies fastest."""
    return i_x % N_INNER, (i_x // N_INNER) % N_MID, i_x // (N_INNER * N_MID)


@triton.jit
def _tile_if(LOAD: tl.constexpr, p, o_r, o_c, m_r, m_c):
    """The tile [R, C] at ``p + o_r[r] + o_c[c]`` (0 outside ``m_r x m_c``) when LOAD, else 0.0: an
    operand preloaded when its channels fit one block (ONE_CQK / ONE_CV), else loaded by chunks
    in the loops (_row_dot / _col_dot take it as their fix or var tile)."""
    if LOAD:
        b = tl.load(p + (o_r[:, None] + o_c[None, :]), mask=m_r[:, None] & m_c[None, :], other=0.0)
    else:
        b = 0.0
    return b


@triton.jit
def _col_dot(b_fix, p_fix, o_fix_c, o_fix_j, p_var, o_var_c, o_var_j, stride_fix_c, stride_var_c,
             m_j, C, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, ONE_C: tl.constexpr):
    """sum_c fix[c, j] * var[c, j] in float32 -> ([BLOCK_J], the var tile when ONE_C).

    Element (c, j) of a tile is at ``p + o_c[c] + o_j[j]``: p a scalar pointer, o_c the channel
    offsets [BLOCK_C] (arange * stride_c), o_j [BLOCK_J]; chunk c0 adds c0 * stride_c.
    m_j: [BLOCK_J]; b_fix: the preloaded fix tile when ONE_C (unused otherwise).
    """
    o_c = tl.arange(0, BLOCK_C)
    if ONE_C:
        b_var = tl.load(p_var + (o_var_c[:, None] + o_var_j[None, :]),
                        mask=(o_c < C)[:, None] & m_j[None, :], other=0.0)  # [BLOCK_C, BLOCK_J]
        b_s = tl.sum(b_fix.to(tl.float32) * b_var.to(tl.float32), 0)  # [BLOCK_J]
    else:
        b_var = 0.0
        b_s = tl.zeros([BLOCK_J], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            m_c = (o_c < C - c0)[:, None] & m_j[None, :]
            # the chunk start goes into the 1-D offsets: no hoisted [BLOCK_C, BLOCK_J] offset tile
            b_f = tl.load(p_fix + ((o_fix_c + c0 * stride_fix_c)[:, None] + o_fix_j[None, :]), mask=m_c, other=0.0)
            b_v = tl.load(p_var + ((o_var_c + c0 * stride_var_c)[:, None] + o_var_j[None, :]), mask=m_c, other=0.0)
            b_s += tl.sum(b_f.to(tl.float32) * b_v.to(tl.float32), 0)
    return b_s, b_var


@triton.jit
def _row_dot(b_fix, p_fix, o_fix_c, o_fix_j, p_var, o_var_w, o_var_c, stride_fix_c, stride_var_c,
             m_fix, m_var, C, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_J: tl.constexpr,
             ONE_C: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """sum_c var[w, c] * fix[c, j] with tl.dot -> ([BLOCK_W, BLOCK_J] float32, the var tile
    [BLOCK_W, BLOCK_C] when ONE_C).

    fix[c, j] is at ``p_fix + o_fix_c[c] + o_fix_j[j]``, var[w, c] at
    ``p_var + o_var_w[w] + o_var_c[c]`` (as in _col_dot); m_fix [BLOCK_J], m_var [BLOCK_W].
    """
    o_c = tl.arange(0, BLOCK_C)
    if ONE_C:
        b_var = tl.load(p_var + (o_var_w[:, None] + o_var_c[None, :]),
                        mask=m_var[:, None] & (o_c < C)[None, :], other=0.0)  # [BLOCK_W, BLOCK_C]
        b_s = _mm(b_var, b_fix, DOT_PRECISION, DOT_F32)  # [BLOCK_W, BLOCK_J]
    else:
        b_var = 0.0
        b_s = tl.zeros([BLOCK_W, BLOCK_J], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            m_c = o_c < C - c0
            b_v = tl.load(p_var + (o_var_w[:, None] + (o_var_c + c0 * stride_var_c)[None, :]),
                          mask=m_var[:, None] & m_c[None, :], other=0.0)  # [BLOCK_W, BLOCK_C]
            b_f = tl.load(p_fix + ((o_fix_c + c0 * stride_fix_c)[:, None] + o_fix_j[None, :]),
                          mask=m_c[:, None] & m_fix[None, :], other=0.0)  # [BLOCK_C, BLOCK_J]
            b_s += _mm(b_v, b_f, DOT_PRECISION, DOT_F32)
    return b_s, b_var


@triton.jit
def _bwd_delta_kernel(
    do, out, delta,
    stride_db, stride_dc, stride_dh, stride_dw,
    stride_ob, stride_oc, stride_oh, stride_ow,
    H, W, Cv,
    BLOCK_J: tl.constexpr, BLOCK_CV: tl.constexpr,
):
    """delta[b, i, j] = <dout[b, :, i, j], out[b, :, i, j]> in float32.

    Grid: (B * H, cdiv(W, BLOCK_J))
    """
    i_bh = tl.program_id(0).to(tl.int64)
    i_jb = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    j_start = i_jb * BLOCK_J
    o_j = tl.arange(0, BLOCK_J)
    o_cv = tl.arange(0, BLOCK_CV)
    m_j = o_j < W - j_start
    p_do = do + i_b * stride_db + i_h * stride_dh + j_start * stride_dw
    p_o = out + i_b * stride_ob + i_h * stride_oh + j_start * stride_ow
    b_d, _ = _col_dot(0.0, p_do, o_cv * stride_dc, o_j * stride_dw, p_o, o_cv * stride_oc,
                      o_j * stride_ow, stride_dc, stride_oc, m_j, Cv, BLOCK_CV, BLOCK_J, False)
    tl.store(delta + i_bh * W + j_start + o_j, b_d, mask=m_j)


# ----------------------------------------------------------------------------------------------
# host helpers
# ----------------------------------------------------------------------------------------------
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launch grids. Plain Python: ``triton.cdiv`` is a constexpr function in
    triton 3.6-3.8 (1.3-2 us a call, dozens per op call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1); plain Python, as :func:`cdiv`."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def check_extent(op: str, t: torch.Tensor, name: str = "") -> None:
    """Raise unless each sample of ``t`` spans fewer than 2**31 elements: the kernels address
    within one sample with 32-bit offsets (the batch offset is 64-bit). A dense tensor (NCHW or
    channels-last) of fewer than 2**31 elements in all passes without the arithmetic (0.4 vs 3 us
    a tensor: it runs for every input of every call)."""
    if t.numel() < 2**31 and (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        return
    extent = max(math.prod(t.shape[1:]), sum((n - 1) * s for n, s in zip(t.shape[1:], t.stride()[1:])) + 1)
    if extent >= 2**31:
        raise ValueError(
            f"{op}: the Triton backend needs each sample to span fewer than 2**31 elements, got "
            f"{name + ' ' if name else ''}of shape {tuple(t.shape)}, strides {tuple(t.stride())}")


def bwd_delta(dout: torch.Tensor, out: torch.Tensor, block_cv: int | None = None) -> torch.Tensor:
    """delta = <dout, out> over the channels, float32 [B, H, W] (:func:`_bwd_delta_kernel`, Cv
    in chunks of ``block_cv``: by default Cv's power of 2, 16 to 64)."""
    B, Cv, H, W = out.shape
    if block_cv is None:
        block_cv = min(64, max(16, next_pow2(Cv)))
    delta = torch.empty((B, H, W), dtype=torch.float32, device=out.device)
    bj = min(32, max(16, next_pow2(W)))
    _bwd_delta_kernel[(B * H, cdiv(W, bj))](
        dout, out, delta, *dout.stride(), *out.stride(), H, W, Cv, BLOCK_J=bj, BLOCK_CV=block_cv)
    return delta
