// Device code of criss-cross attention (CCNet), CUDA. Launchers and op registration:
// csrc/cuda/criss_cross.cu. Contract and backward math: shared/docs/OPERATORS.md section 1.
//
// Layout NCHW-contiguous (the launcher makes it so). One thread per pixel: a thread owns the
// query (forward, dq) or the key (dk, dv) at (i, j), and consecutive threads of a warp hold
// consecutive j, the stride-1 axis, so every per-pixel load and store is coalesced. A block is
// blockDim.x threads over a tile of j times blockDim.y consecutive rows r = b * H + i.
//
// The criss-cross of pixel (i, j) is its row {(i, j') : all j'} (itself included, once) and its
// column {(i', j) : i' != i}. Attention is symmetric in the pattern: the queries that attend to
// key (i, j) are exactly the pixels of the criss-cross of (i, j). So the four kernels share one
// loop, over "partners" of the thread's pixel, in tiles of KT partners:
//   row tiles    (i, j0 .. j0+KT-1)         spatial offset i * W + j0, stride 1
//   column tiles (i0 .. i0+KT-1, j)         spatial offset i0 * W + j, stride W; i0 + t == i masked
// The same (tiled) dot products give the same energies in every kernel and every pass.
//
// Row partners are the same for all threads of a row: their loads are warp-wide broadcasts (one
// L1 wavefront), column partners are coalesced. Accumulators over channels live in registers in
// chunks of a compile-time width (VC for Cv, QC for Cqk) indexed only with compile-time constants;
// each chunk re-walks the partners and recomputes what it needs (energies, dA).
//
// What would make it faster (to measure on the H100; correctness first here):
// - Forward and dv recompute the energies once per VC-chunk of Cv (CCNet: Cv = 512, VC = 32 ->
//   16 times 64 FMAs per (query, key) vs 512 FMAs of useful value work), and the forward also
//   recomputes lse once per y-block. Keeping the softmax weights of a block in shared memory
//   ((H + W - 1) x threads floats), or a separate lse kernel, would remove that.
// - dq and dk run one thread per pixel with all of Cqk <= 64 in one chunk: B * H * W threads only
//   (CCNet: 18818, about 1/15 of an H100's resident threads). Splitting the partners of a pixel
//   over several threads (then a fixed-order reduction in shared memory, still deterministic)
//   would fill the machine.
// - Stage the row's k / v / q / dout (shared by all threads of a row) in shared memory (bulk copy
//   + mbarrier on sm_90) instead of relying on L1 broadcasts; 16-byte vector loads over j.
// - The (H + W - 1) x C x C products are small GEMMs per row / column: tensor cores (mma.sync,
//   or wgmma on sm_90a) on row tiles would lift the FMA ceiling.
// - dk and dv could share one walk over the partners (p is needed by both).
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <math.h>
#include <tuple>
#include <type_traits>

#include "common.cuh"

namespace fastctx {
namespace cc {

// Threads per block (blockDim.x * blockDim.y), also the launch bound of every kernel.
constexpr int kThreads = 128;
// Partners per tile: loads of one operand element are reused KT times from a register.
constexpr int kTile = 8;

using gpu::acc_exp;
using gpu::acc_log;
using gpu::acc_max;
using gpu::neg_inf;

// Which pixel this thread owns. Returns false for threads past the map (they simply exit: the
// kernels use no shared memory and no barriers).
struct Pixel {
  int64_t b, i, j;
};

__device__ __forceinline__ bool thread_pixel(int64_t B, int64_t H, int64_t W, int64_t n_jtiles,
                                             Pixel& px) {
  const int64_t bid = static_cast<int64_t>(blockIdx.x);
  const int64_t jtile = bid % n_jtiles;
  const int64_t r = (bid / n_jtiles) * blockDim.y + threadIdx.y;  // r = b * H + i
  const int64_t j = jtile * blockDim.x + threadIdx.x;
  if (r >= B * H || j >= W) return false;
  px.b = r / H;
  px.i = r - px.b * H;
  px.j = j;
  return true;
}

// One tile of partners of pixel (i, j): n partners at spatial offsets s0 + t * st, t < n; the
// partner t == diag (if diag < KT) is masked out (the thread's own pixel in a column tile).
struct Tile {
  int64_t s0, st;
  int n, diag;
};

// Walks the criss-cross partners of (i, j): all row tiles first, then the column tiles.
// The row comes first so that the running max of the online softmax is finite after the first
// tile (the row always holds (i, j) itself), whatever tile of the column is fully masked.
template <int KT, typename F>
__device__ __forceinline__ void for_each_tile(int64_t H, int64_t W, int64_t i, int64_t j, F&& f) {
  for (int64_t j0 = 0; j0 < W; j0 += KT) {
    const int n = static_cast<int>(W - j0 < KT ? W - j0 : KT);
    f(Tile{i * W + j0, 1, n, KT});
  }
  for (int64_t i0 = 0; i0 < H; i0 += KT) {
    const int n = static_cast<int>(H - i0 < KT ? H - i0 : KT);
    const int64_t d = i - i0;  // own pixel's place in this tile, if any
    f(Tile{i0 * W + j, W, n, (d >= 0 && d < KT) ? static_cast<int>(d) : KT});
  }
}

__device__ __forceinline__ bool live(const Tile& tl, int t) { return t < tl.n && t != tl.diag; }

// out[t] = sum_{c < C} a[c * HW] * b[c * HW + tl.s0 + t * tl.st] for t < tl.n (0 otherwise).
// `a` points at the thread's own pixel of channel 0, `b` at channel 0 of the partner tensor.
template <int KT, typename scalar_t, typename acc_t>
__device__ __forceinline__ void dot_tile(const scalar_t* __restrict__ a,
                                         const scalar_t* __restrict__ b, int64_t C, int64_t HW,
                                         const Tile& tl, acc_t (&out)[KT]) {
#pragma unroll
  for (int t = 0; t < KT; ++t) out[t] = acc_t(0);
  const scalar_t* bp = b + tl.s0;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t av = static_cast<acc_t>(a[c * HW]);
    const scalar_t* bc = bp + c * HW;
#pragma unroll
    for (int t = 0; t < KT; ++t) {
      if (t < tl.n) out[t] += av * static_cast<acc_t>(bc[t * tl.st]);
    }
  }
}

// acc[c] += sum_t w[t] * x[(c0 + c) * HW + tl.s0 + t * tl.st] for c0 + c < C, t < tl.n.
// Callers set w[t] = 0 for masked partners. Channel-outer with a pointer stepped by HW: only the
// KT partner offsets stay live, not CW * KT addresses.
template <int KT, int CW, typename scalar_t, typename acc_t>
__device__ __forceinline__ void axpy_tile(const scalar_t* __restrict__ x, int64_t c0, int64_t C,
                                          int64_t HW, const Tile& tl, const acc_t (&w)[KT],
                                          acc_t (&acc)[CW]) {
  const scalar_t* xc = x + c0 * HW + tl.s0;
#pragma unroll
  for (int c = 0; c < CW; ++c) {
    if (c0 + c < C) {
#pragma unroll
      for (int t = 0; t < KT; ++t) {
        if (t < tl.n) acc[c] += w[t] * static_cast<acc_t>(xc[t * tl.st]);
      }
    }
    xc += HW;
  }
}

// Per-pixel float load of a [B, H, W] tensor (lse, D) for the partners of a tile.
template <int KT, typename acc_t>
__device__ __forceinline__ void load_tile(const acc_t* __restrict__ x, const Tile& tl,
                                          acc_t (&out)[KT]) {
#pragma unroll
  for (int t = 0; t < KT; ++t) out[t] = (t < tl.n) ? x[tl.s0 + t * tl.st] : acc_t(0);
}

// ---------------------------------------------------------------------------------------------
// Forward. Thread = query (i, j). Pass 1: online log-sum-exp of the H + W - 1 energies -> lse.
// Pass 2, per VC-chunk of Cv: out[c] = sum_pos exp(e_pos - lse) * v[c, pos].
// Grid: x = ceil(B * H / blockDim.y) * n_jtiles, block (TJ, kThreads / TJ); y spreads the
// VC-chunks of Cv over blocks (chunk blockIdx.y, then every gridDim.y-th): one thread per pixel
// alone is too little parallelism (CCNet, 2 x 97 x 97: 194 blocks for 132 SMs). Every y-block
// recomputes lse (pass 1); the one with blockIdx.y == 0 stores it.
template <typename scalar_t, typename acc_t, int KT, int VC>
__global__ void __launch_bounds__(kThreads)
    cc_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                  const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                  acc_t* __restrict__ lse, int64_t B, int64_t Cqk, int64_t Cv, int64_t H,
                  int64_t W, int64_t n_jtiles, acc_t scale) {
  Pixel px;
  if (!thread_pixel(B, H, W, n_jtiles, px)) return;
  const int64_t HW = H * W;
  const int64_t s = px.i * W + px.j;
  const scalar_t* qo = q + px.b * Cqk * HW + s;  // own query, channel 0
  const scalar_t* kb = k + px.b * Cqk * HW;
  const scalar_t* vb = v + px.b * Cv * HW;

  acc_t m = neg_inf<acc_t>(), l = acc_t(0);
  for_each_tile<KT>(H, W, px.i, px.j, [&](const Tile& tl) {
    acc_t e[KT];
    dot_tile<KT>(qo, kb, Cqk, HW, tl, e);
    acc_t tm = neg_inf<acc_t>();
#pragma unroll
    for (int t = 0; t < KT; ++t) {
      e[t] *= scale;
      if (live(tl, t)) tm = acc_max(tm, e[t]);
    }
    if (tm == neg_inf<acc_t>()) return;  // every partner masked (or -inf energies)
    const acc_t mn = acc_max(m, tm);
    l *= acc_exp(m - mn);  // m == -inf on the first tile: exp(-inf) = 0
#pragma unroll
    for (int t = 0; t < KT; ++t) {
      if (live(tl, t)) l += acc_exp(e[t] - mn);
    }
    m = mn;
  });
  const acc_t lse_q = m + acc_log(l);
  if (blockIdx.y == 0) lse[px.b * HW + s] = lse_q;

  scalar_t* oo = out + px.b * Cv * HW + s;
  const int64_t c_step = static_cast<int64_t>(gridDim.y) * VC;
  for (int64_t c0 = static_cast<int64_t>(blockIdx.y) * VC; c0 < Cv; c0 += c_step) {
    acc_t acc[VC];
#pragma unroll
    for (int c = 0; c < VC; ++c) acc[c] = acc_t(0);
    for_each_tile<KT>(H, W, px.i, px.j, [&](const Tile& tl) {
      acc_t p[KT];
      dot_tile<KT>(qo, kb, Cqk, HW, tl, p);
#pragma unroll
      for (int t = 0; t < KT; ++t) p[t] = live(tl, t) ? acc_exp(p[t] * scale - lse_q) : acc_t(0);
      axpy_tile<KT, VC>(vb, c0, Cv, HW, tl, p, acc);
    });
#pragma unroll
    for (int c = 0; c < VC; ++c) {
      if (c0 + c < Cv) oo[(c0 + c) * HW] = static_cast<scalar_t>(acc[c]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, kernel 0: D = <dout, out> per pixel: gpu::pixel_dot_kernel (common.cuh).

// Backward, kernel 1: dq. Thread = query (i, j); its partners are its keys. Per QC-chunk of Cqk:
//   p = exp(scale * <q, k_pos> - lse), dA = <dout, v_pos>, dE = p * (dA - D),
//   dq[c] = scale * sum_pos dE_pos * k[c, pos].
template <typename scalar_t, typename acc_t, int KT, int QC>
__global__ void __launch_bounds__(kThreads)
    cc_bwd_dq_kernel(const scalar_t* __restrict__ dout, const scalar_t* __restrict__ q,
                     const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                     const acc_t* __restrict__ lse, const acc_t* __restrict__ delta,
                     scalar_t* __restrict__ dq, int64_t B, int64_t Cqk, int64_t Cv, int64_t H,
                     int64_t W, int64_t n_jtiles, acc_t scale) {
  Pixel px;
  if (!thread_pixel(B, H, W, n_jtiles, px)) return;
  const int64_t HW = H * W;
  const int64_t s = px.i * W + px.j;
  const scalar_t* qo = q + px.b * Cqk * HW + s;
  const scalar_t* doo = dout + px.b * Cv * HW + s;
  const scalar_t* kb = k + px.b * Cqk * HW;
  const scalar_t* vb = v + px.b * Cv * HW;
  const acc_t lse_q = lse[px.b * HW + s];
  const acc_t d_q = delta[px.b * HW + s];

  scalar_t* dqo = dq + px.b * Cqk * HW + s;
  for (int64_t c0 = 0; c0 < Cqk; c0 += QC) {
    acc_t acc[QC];
#pragma unroll
    for (int c = 0; c < QC; ++c) acc[c] = acc_t(0);
    for_each_tile<KT>(H, W, px.i, px.j, [&](const Tile& tl) {
      acc_t e[KT], da[KT];
      dot_tile<KT>(qo, kb, Cqk, HW, tl, e);
      dot_tile<KT>(doo, vb, Cv, HW, tl, da);
#pragma unroll
      for (int t = 0; t < KT; ++t)
        e[t] = live(tl, t) ? acc_exp(e[t] * scale - lse_q) * (da[t] - d_q) : acc_t(0);
      axpy_tile<KT, QC>(kb, c0, Cqk, HW, tl, e, acc);
    });
#pragma unroll
    for (int c = 0; c < QC; ++c) {
      if (c0 + c < Cqk) dqo[(c0 + c) * HW] = static_cast<scalar_t>(scale * acc[c]);
    }
  }
}

// Backward, kernel 2: dk. Thread = key (i, j); its partners are the queries that attend to it
// (its criss-cross, by symmetry), each with its own lse and D. Gathered, never scattered: no
// atomics, deterministic. Per QC-chunk of Cqk:
//   p = exp(scale * <q_Q, k> - lse_Q), dA = <dout_Q, v>, dE = p * (dA - D_Q),
//   dk[c] = scale * sum_Q dE_Q * q_Q[c].
template <typename scalar_t, typename acc_t, int KT, int QC>
__global__ void __launch_bounds__(kThreads)
    cc_bwd_dk_kernel(const scalar_t* __restrict__ dout, const scalar_t* __restrict__ q,
                     const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                     const acc_t* __restrict__ lse, const acc_t* __restrict__ delta,
                     scalar_t* __restrict__ dk, int64_t B, int64_t Cqk, int64_t Cv, int64_t H,
                     int64_t W, int64_t n_jtiles, acc_t scale) {
  Pixel px;
  if (!thread_pixel(B, H, W, n_jtiles, px)) return;
  const int64_t HW = H * W;
  const int64_t s = px.i * W + px.j;
  const scalar_t* ko = k + px.b * Cqk * HW + s;  // own key
  const scalar_t* vo = v + px.b * Cv * HW + s;   // own value
  const scalar_t* qb = q + px.b * Cqk * HW;
  const scalar_t* dob = dout + px.b * Cv * HW;
  const acc_t* lseb = lse + px.b * HW;
  const acc_t* db = delta + px.b * HW;

  scalar_t* dko = dk + px.b * Cqk * HW + s;
  for (int64_t c0 = 0; c0 < Cqk; c0 += QC) {
    acc_t acc[QC];
#pragma unroll
    for (int c = 0; c < QC; ++c) acc[c] = acc_t(0);
    for_each_tile<KT>(H, W, px.i, px.j, [&](const Tile& tl) {
      acc_t e[KT], da[KT], lq[KT], dd[KT];
      dot_tile<KT>(ko, qb, Cqk, HW, tl, e);
      dot_tile<KT>(vo, dob, Cv, HW, tl, da);
      load_tile<KT>(lseb, tl, lq);
      load_tile<KT>(db, tl, dd);
#pragma unroll
      for (int t = 0; t < KT; ++t)
        e[t] = live(tl, t) ? acc_exp(e[t] * scale - lq[t]) * (da[t] - dd[t]) : acc_t(0);
      axpy_tile<KT, QC>(qb, c0, Cqk, HW, tl, e, acc);
    });
#pragma unroll
    for (int c = 0; c < QC; ++c) {
      if (c0 + c < Cqk) dko[(c0 + c) * HW] = static_cast<scalar_t>(scale * acc[c]);
    }
  }
}

// Backward, kernel 3: dv. Thread = key (i, j), partners = its queries. Per VC-chunk of Cv:
//   p = exp(scale * <q_Q, k> - lse_Q), dv[c] = sum_Q p_Q * dout_Q[c].
// The VC-chunks are spread over blockIdx.y as in the forward (nothing is duplicated here).
template <typename scalar_t, typename acc_t, int KT, int VC>
__global__ void __launch_bounds__(kThreads)
    cc_bwd_dv_kernel(const scalar_t* __restrict__ dout, const scalar_t* __restrict__ q,
                     const scalar_t* __restrict__ k, const acc_t* __restrict__ lse,
                     scalar_t* __restrict__ dv, int64_t B, int64_t Cqk, int64_t Cv, int64_t H,
                     int64_t W, int64_t n_jtiles, acc_t scale) {
  Pixel px;
  if (!thread_pixel(B, H, W, n_jtiles, px)) return;
  const int64_t HW = H * W;
  const int64_t s = px.i * W + px.j;
  const scalar_t* ko = k + px.b * Cqk * HW + s;
  const scalar_t* qb = q + px.b * Cqk * HW;
  const scalar_t* dob = dout + px.b * Cv * HW;
  const acc_t* lseb = lse + px.b * HW;

  scalar_t* dvo = dv + px.b * Cv * HW + s;
  const int64_t c_step = static_cast<int64_t>(gridDim.y) * VC;
  for (int64_t c0 = static_cast<int64_t>(blockIdx.y) * VC; c0 < Cv; c0 += c_step) {
    acc_t acc[VC];
#pragma unroll
    for (int c = 0; c < VC; ++c) acc[c] = acc_t(0);
    for_each_tile<KT>(H, W, px.i, px.j, [&](const Tile& tl) {
      acc_t p[KT], lq[KT];
      dot_tile<KT>(ko, qb, Cqk, HW, tl, p);
      load_tile<KT>(lseb, tl, lq);
#pragma unroll
      for (int t = 0; t < KT; ++t) p[t] = live(tl, t) ? acc_exp(p[t] * scale - lq[t]) : acc_t(0);
      axpy_tile<KT, VC>(dob, c0, Cv, HW, tl, p, acc);
    });
#pragma unroll
    for (int c = 0; c < VC; ++c) {
      if (c0 + c < Cv) dvo[(c0 + c) * HW] = static_cast<scalar_t>(acc[c]);
    }
  }
}


// ---------------------------------------------------------------------------------------------
// Host side: launch shapes and sequences, shared by the CUDA launchers (criss_cross.cu) and the
// CPU emulation of tests/cuda_emu (a Launch: launch(kernel, grid, block, shared_bytes, args...)
// and `int sms`). Inputs of any strides (made NCHW-contiguous here: the only copy, a no-op for
// NCHW input); outputs NCHW-contiguous in the input dtype, lse (and D) in acc_t.

// Register-chunk widths: VC channels of v / out / dout, QC channels of q / k per pass over the
// partners. QC = 64 keeps CCNet's Cqk = 64 in one pass (dA over Cv is computed once); small
// Cqk (the odd test sizes) take the 16-wide variant so as not to predicate 48 dead lanes, and so
// does float64 always (64 doubles would not fit the register file: ptxas spills).
constexpr int kVC = 32;
constexpr int kQCSmall = 16;
constexpr int kQCLarge = 64;

// Thread-per-pixel launch shape shared by the forward, dq, dk and dv kernels: blockDim.x threads
// over a tile of j (a multiple of 32, at most kThreads), blockDim.y = kThreads / blockDim.x rows
// (b, i) per block so that narrow maps still fill the block; a 1-D grid of row groups x j tiles.
struct PixelLaunch {
  dim3 grid, block;
  int64_t n_jtiles;
};

// grid.y spreads `chunks` independent channel chunks (forward, dv) over blocks: just enough
// y-blocks to give about kBlocksPerSM blocks per multiprocessor, at most one per chunk.
constexpr int64_t kBlocksPerSM = 8;

inline PixelLaunch pixel_launch(int64_t B, int64_t H, int64_t W, int sms, int64_t chunks = 1) {
  const int64_t tj = W >= kThreads ? kThreads : (W + 31) / 32 * 32;
  const int64_t rows = kThreads / tj;
  const int64_t n_jtiles = (W + tj - 1) / tj;
  const int64_t blocks = (B * H + rows - 1) / rows * n_jtiles;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "fastctx.criss_cross_attention: map too large for one launch (B=", B, ", H=", H, ", W=", W, ")");
  int64_t gy = 1;
  if (chunks > 1) {
    const int64_t want = (kBlocksPerSM * sms + blocks - 1) / blocks;
    gy = std::max<int64_t>(1, std::min<int64_t>({want, chunks, 65535}));
  }
  return {dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(gy)),
          dim3(static_cast<unsigned>(tj), static_cast<unsigned>(rows)), n_jtiles};
}

template <class Launch>
std::tuple<at::Tensor, at::Tensor> fwd(const Launch& launch, const at::Tensor& q_in,
                                       const at::Tensor& k_in, const at::Tensor& v_in,
                                       double scale) {
  const int64_t B = q_in.size(0), Cqk = q_in.size(1), H = q_in.size(2), W = q_in.size(3);
  const int64_t Cv = v_in.size(1);
  auto out = at::empty({B, Cv, H, W}, v_in.options());
  auto lse = at::empty({B, H, W}, q_in.options().dtype(acc_dtype(q_in.scalar_type())));
  if (B * H * W == 0) return {out, lse};  // nothing to compute; no launch
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  // At least one y-block even when Cv == 0: the forward also writes lse.
  const PixelLaunch L = pixel_launch(B, H, W, launch.sms, (Cv + kVC - 1) / kVC);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  q.scalar_type(), "cc_fwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    launch(cc_fwd_kernel<scalar_t, acc_t, kTile, kVC>, L.grid, L.block, size_t(0),
           q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
           out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<acc_t>(), B, Cqk, Cv, H, W,
           L.n_jtiles, static_cast<acc_t>(scale));
  });
  return {out, lse};
}

template <class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const Launch& launch, const at::Tensor& dout_in,
                                                   const at::Tensor& q_in, const at::Tensor& k_in,
                                                   const at::Tensor& v_in, const at::Tensor& out_in,
                                                   const at::Tensor& lse_in, double scale) {
  const int64_t B = q_in.size(0), Cqk = q_in.size(1), H = q_in.size(2), W = q_in.size(3);
  const int64_t Cv = v_in.size(1);
  auto dq = at::empty({B, Cqk, H, W}, q_in.options());
  auto dk = at::empty({B, Cqk, H, W}, k_in.options());
  auto dv = at::empty({B, Cv, H, W}, v_in.options());
  if (B * H * W == 0) return {dq, dk, dv};  // nothing to compute; no launch
  const at::Tensor dout = dout_in.contiguous(), q = q_in.contiguous(), k = k_in.contiguous(),
                   v = v_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  auto delta = at::empty({B, H, W}, lse.options());
  const PixelLaunch L = pixel_launch(B, H, W, launch.sms);                        // dq, dk
  const PixelLaunch Lv = pixel_launch(B, H, W, launch.sms, (Cv + kVC - 1) / kVC);  // dv
  const int64_t HW = H * W;
  const int64_t delta_blocks = std::min<int64_t>((B * HW + kThreads - 1) / kThreads, 1 << 20);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  q.scalar_type(), "cc_bwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const acc_t sc = static_cast<acc_t>(scale);
    const scalar_t* dout_p = dout.const_data_ptr<scalar_t>();
    const scalar_t* q_p = q.const_data_ptr<scalar_t>();
    const scalar_t* k_p = k.const_data_ptr<scalar_t>();
    const scalar_t* v_p = v.const_data_ptr<scalar_t>();
    const acc_t* lse_p = lse.const_data_ptr<acc_t>();
    acc_t* delta_p = delta.mutable_data_ptr<acc_t>();

    // Kernel 0: D = <dout, out> per pixel (0 when Cv == 0).
    launch(gpu::pixel_dot_kernel<scalar_t, acc_t>, dim3(static_cast<unsigned>(delta_blocks)),
           dim3(kThreads), size_t(0), dout_p, out.const_data_ptr<scalar_t>(), delta_p, B, Cv, HW);

    // Kernels 1 and 2: dq per query, dk per key (gathered from the queries that see it).
    auto launch_dq_dk = [&](auto qc) {
      constexpr int QC = decltype(qc)::value;
      launch(cc_bwd_dq_kernel<scalar_t, acc_t, kTile, QC>, L.grid, L.block, size_t(0), dout_p, q_p,
             k_p, v_p, lse_p, static_cast<const acc_t*>(delta_p), dq.mutable_data_ptr<scalar_t>(),
             B, Cqk, Cv, H, W, L.n_jtiles, sc);
      launch(cc_bwd_dk_kernel<scalar_t, acc_t, kTile, QC>, L.grid, L.block, size_t(0), dout_p, q_p,
             k_p, v_p, lse_p, static_cast<const acc_t*>(delta_p), dk.mutable_data_ptr<scalar_t>(),
             B, Cqk, Cv, H, W, L.n_jtiles, sc);
    };
    // float64 (gradcheck, not speed) takes the narrow chunk for any Cqk.
    constexpr int qc_wide = std::is_same_v<acc_t, double> ? kQCSmall : kQCLarge;
    if (Cqk > 0 && Cqk <= kQCSmall) {
      launch_dq_dk(std::integral_constant<int, kQCSmall>{});
    } else if (Cqk > kQCSmall) {
      launch_dq_dk(std::integral_constant<int, qc_wide>{});
    }
    if (Cv > 0) {
      // Kernel 3: dv per key.
      launch(cc_bwd_dv_kernel<scalar_t, acc_t, kTile, kVC>, Lv.grid, Lv.block, size_t(0), dout_p,
             q_p, k_p, lse_p, dv.mutable_data_ptr<scalar_t>(), B, Cqk, Cv, H, W, Lv.n_jtiles, sc);
    }
  });
  return {dq, dk, dv};
}

}  // namespace cc
}  // namespace fastctx
