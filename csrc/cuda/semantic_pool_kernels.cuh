// Device code of the semantic pooling (ISNet's per-class pooling), CUDA. Launchers and op
// registration: csrc/cuda/semantic_pool.cu. Semantics: shared/docs/OPERATORS.md section 5; the
// host contract: csrc/ops/semantic_pool.cpp.
//
// Layout NCHW-contiguous (the launchers make it so), pixels n = i * W + j. No atomics anywhere:
// every reduction over pixels is two-level (per-block partials, then a pass over the blocks in
// block order), and within a block each sum has one owner that adds in pixel order, so results
// are bit-identical run to run on one device (the pixel groups of the segmented sum follow the
// device's multiprocessor count).
//
// Forward, per image, a fixed number of launches whatever K is:
//   argmax_kernel      per block of kPix pixels: labels (ties: lowest index), the winning logit
//                      `best`, and per class of the block: max of best, sum of exp(best - max),
//                      pixel count (thread k owns class k and walks the block's pixels in order);
//   class_stats_kernel per (image, class): m = max over the blocks, Z = sum over the blocks of
//                      sum * exp(max - m) (0 when no pixel is finite), counts;
//   weights_kernel     per pixel: w = exp(best - m[label]) / Z[label] (0 where Z = 0);
//   segsum_kernel      regions = the segmented sum of w * feats (below), per pixel group;
//   sum_groups_kernel  the groups' partials summed in group order (when there are several).
//
// The segmented sum: a block owns 32 channels (a warp's lanes), a tile of classes and a group of
// pixels. It stages [32 channels x kPT pixels] of x in shared memory (coalesced loads along the
// pixels), then warp w walks the tile's pixels whose class (within the class tile) is w modulo
// kWarps, found with a ballot over 32 labels at a time: lane c adds w_n x[c, n] to a running sum
// in a register and adds the run to its accumulator acc[class][c] in shared memory when the class
// changes. Each accumulator has one owner (lane c of warp class % kWarps), so no atomics, and the
// order of the additions depends only on the data. Labels are blobby in segmentation maps: runs
// are long and most pixels cost one shared load and one FMA.
//
// Backward, one thread per pixel (coalesced along the pixels, no reduction over pixels):
//   dfeats[c, n] = w_n dr[c, l_n];  dlogits[k, n] = [k == l_n] w_n (<dr[:, l_n], f_n> - drr[l_n]),
// drr[k] = <dr[:, k], regions[:, k]> (gpu::channel_dot_kernel, per (image, class)).
//
// Labels outside [0, K) (only a direct caller of the compiled ops can pass them: the forward
// writes the labels the other ops read) select nothing: the gather writes 0, the segmented sums
// and the backward skip the pixel. The CPU kernels raise instead; here that check would cost a
// host synchronisation per call.
//
// Not yet run on a GPU (written in a session without one). CI compiles it for sm_90 and runs
// this header, kernels and host sequences alike, on the CPU under an emulation of the CUDA
// execution model against the reference (tests/test_semantic_pool_cuda_emu.py); the "cuda" cases
// of tests/test_semantic_pool.py run it on the first GPU. Nothing here is tuned. What to measure
// first: the segmented sum's bandwidth against the copy ceiling at K = 19 and K = 150, and its
// pixel-group count (G, segsum_plan's choice).
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <math.h>
#include <tuple>

#include "common.cuh"

namespace fastctx {
namespace sp_gpu {

using gpu::acc_exp;
using gpu::acc_max;
using gpu::neg_inf;

constexpr int kPix = gpu::kThreads;  // threads (pixels) per block of the per-pixel kernels
constexpr int kCT = 32;    // channels per segmented-sum block: a warp's lanes
constexpr int kPT = 128;   // pixels per staged tile of the segmented sum
constexpr int kWarps = 8;  // warps per segmented-sum block

// Whether 0 <= l < K, for a label read from memory.
__device__ __forceinline__ bool in_range(int64_t l, int64_t K) {
  return static_cast<uint64_t>(l) < static_cast<uint64_t>(K);
}

// Grid (nb, B), nb = cdiv(N, kPix), kPix threads. labels [B, N], best [B, N]; pmax / psum / pcnt
// [B, nb, K]: per block and class, the max of best (-inf without a pixel), the sum of
// exp(best - pmax) (0 when pmax = -inf) and the pixel count.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPix)
    argmax_kernel(const scalar_t* __restrict__ logits, int64_t* __restrict__ labels,
                  acc_t* __restrict__ best, acc_t* __restrict__ pmax, acc_t* __restrict__ psum,
                  int* __restrict__ pcnt, int64_t N, int64_t K, int64_t nb) {
  __shared__ int ls[kPix];
  __shared__ acc_t bs[kPix];
  const int64_t blk = blockIdx.x, b = blockIdx.y;
  const int64_t n0 = blk * kPix;
  const int np = static_cast<int>(N - n0 < kPix ? N - n0 : kPix);
  const int t = threadIdx.x;
  if (t < np) {
    const scalar_t* p = logits + b * K * N + n0 + t;
    acc_t bv = static_cast<acc_t>(p[0]);
    int64_t bl = 0;
    for (int64_t k = 1; k < K; ++k) {
      const acc_t v = static_cast<acc_t>(p[k * N]);
      if (v > bv) {  // strict: ties keep the lowest index
        bv = v;
        bl = k;
      }
    }
    labels[b * N + n0 + t] = bl;
    best[b * N + n0 + t] = bv;
    ls[t] = static_cast<int>(bl);
    bs[t] = bv;
  }
  __syncthreads();
  const int64_t base = (b * nb + blk) * K;
  for (int64_t k = t; k < K; k += kPix) {
    acc_t m = neg_inf<acc_t>();
    int cnt = 0;
    for (int j = 0; j < np; ++j) {
      if (ls[j] == k) {
        m = acc_max(m, bs[j]);
        ++cnt;
      }
    }
    acc_t s = 0;
    if (m != neg_inf<acc_t>()) {
      for (int j = 0; j < np; ++j)
        if (ls[j] == k) s += acc_exp(bs[j] - m);
    }
    pmax[base + k] = m;
    psum[base + k] = s;
    pcnt[base + k] = cnt;
  }
}

// One thread per (image, class), B * K of them: m [B, K], Z [B, K] (0 for a class without a
// finite logit: its weights are then 0, and m, -inf, is never read), counts [B, K] (int64).
template <typename acc_t>
__global__ void __launch_bounds__(kPix)
    class_stats_kernel(const acc_t* __restrict__ pmax, const acc_t* __restrict__ psum,
                       const int* __restrict__ pcnt, acc_t* __restrict__ m_out,
                       acc_t* __restrict__ z_out, int64_t* __restrict__ counts, int64_t B,
                       int64_t K, int64_t nb) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kPix + threadIdx.x;
  if (i >= B * K) return;
  const int64_t b = i / K, k = i - b * K;
  const int64_t base = b * nb * K + k;
  acc_t m = neg_inf<acc_t>();
  for (int64_t blk = 0; blk < nb; ++blk) m = acc_max(m, pmax[base + blk * K]);
  acc_t z = 0;
  int64_t c = 0;
  for (int64_t blk = 0; blk < nb; ++blk) {  // block order: deterministic
    const acc_t pm = pmax[base + blk * K];
    if (pm != neg_inf<acc_t>()) z += psum[base + blk * K] * acc_exp(pm - m);
    c += pcnt[base + blk * K];
  }
  m_out[i] = m;
  z_out[i] = z;
  counts[i] = c;
}

// One thread per pixel, B * N of them: w [B, N].
template <typename acc_t>
__global__ void __launch_bounds__(kPix)
    weights_kernel(const int64_t* __restrict__ labels, const acc_t* __restrict__ best,
                   const acc_t* __restrict__ m, const acc_t* __restrict__ z, acc_t* __restrict__ w,
                   int64_t B, int64_t N, int64_t K) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kPix + threadIdx.x;
  if (i >= B * N) return;
  const int64_t b = i / N, l = labels[i];
  acc_t wv = 0;
  if (in_range(l, K)) {
    const acc_t zl = z[b * K + l];
    if (zl > acc_t(0)) wv = acc_exp(best[i] - m[b * K + l]) / zl;
  }
  w[i] = wv;
}

// The segmented sum (see the top). Grid (G * n_ct * n_kt, B), kWarps * 32 threads, dynamic
// shared memory segsum_smem<acc_t>(KT). out [B, G, C, K]: group g's sum over its pixels n of
// wt_n x[b, c, n] [l_n == k], wt = w (HAS_W) or 1. Groups are `pix` pixels long (a multiple of
// kPT); KT classes per class tile.
template <typename acc_t>
constexpr int64_t segsum_smem_fixed() {  // the staged tile, its weights and its labels
  return (kCT * (kPT + 1) + kPT) * static_cast<int64_t>(sizeof(acc_t)) +
         kPT * static_cast<int64_t>(sizeof(int));
}

template <typename acc_t>
constexpr int64_t segsum_smem(int64_t KT) {  // and the accumulators of KT classes
  return segsum_smem_fixed<acc_t>() + KT * (kCT + 1) * static_cast<int64_t>(sizeof(acc_t));
}

template <typename scalar_t, typename acc_t, bool HAS_W>
__global__ void __launch_bounds__(kWarps * 32)
    segsum_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ labels,
                  const acc_t* __restrict__ w, acc_t* __restrict__ out, int64_t C, int64_t N,
                  int64_t K, int64_t KT, int64_t n_ct, int64_t n_kt, int64_t G, int64_t pix) {
  FASTCTX_DYNAMIC_SMEM(sp_smem);
  acc_t* xs = reinterpret_cast<acc_t*>(sp_smem);  // [kCT][kPT + 1]
  acc_t* acc = xs + kCT * (kPT + 1);              // [KT][kCT + 1]
  acc_t* ws = acc + KT * (kCT + 1);               // [kPT]
  int* ls = reinterpret_cast<int*>(ws + kPT);     // [kPT]: class - k0, or -1

  const int64_t bx = blockIdx.x, b = blockIdx.y;
  const int64_t kt = bx % n_kt, ct = (bx / n_kt) % n_ct, g = bx / (n_kt * n_ct);
  const int64_t k0 = kt * KT, c0 = ct * kCT;
  const int kn = static_cast<int>(K - k0 < KT ? K - k0 : KT);
  const int cn = static_cast<int>(C - c0 < kCT ? C - c0 : kCT);
  const int64_t g0 = g * pix, g1 = (g0 + pix < N ? g0 + pix : N);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const scalar_t* xb = x + (b * C + c0) * N;
  const int64_t* lb = labels + b * N;

  for (int i = tid; i < kn * (kCT + 1); i += kWarps * 32) acc[i] = 0;
  for (int64_t n0 = g0; n0 < g1; n0 += kPT) {
    const int np = static_cast<int>(g1 - n0 < kPT ? g1 - n0 : kPT);
    __syncthreads();  // the previous tile's walk is done (and the zeroed acc is visible)
    for (int i = tid; i < kCT * kPT; i += kWarps * 32) {
      const int r = i / kPT, j = i - r * kPT;
      xs[r * (kPT + 1) + j] = (r < cn && j < np) ? static_cast<acc_t>(xb[r * N + n0 + j]) : acc_t(0);
    }
    if (tid < kPT) {
      int l = -1;
      acc_t wv = 0;
      if (tid < np) {
        const int64_t lv = lb[n0 + tid];
        if (lv >= k0 && lv < k0 + kn) {
          l = static_cast<int>(lv - k0);
          if constexpr (HAS_W) {
            wv = w[b * N + n0 + tid];
          } else {
            wv = acc_t(1);
          }
        }
      }
      ls[tid] = l;
      ws[tid] = wv;
    }
    __syncthreads();
    acc_t run = 0;
    int cur = -1;
    const acc_t* xrow = xs + lane * (kPT + 1);
    for (int j0 = 0; j0 < np; j0 += 32) {
      const int lj = j0 + lane < np ? ls[j0 + lane] : -1;
      unsigned mine = __ballot_sync(0xffffffffu, lj >= 0 && lj % kWarps == warp);
      while (mine != 0u) {  // uniform across the warp: every lane walks the same pixels
        const int j = j0 + __ffs(mine) - 1;
        mine &= mine - 1u;
        const int l = ls[j];
        if (l != cur) {
          if (cur >= 0) acc[cur * (kCT + 1) + lane] += run;
          run = 0;
          cur = l;
        }
        run += ws[j] * xrow[j];
      }
    }
    if (cur >= 0) acc[cur * (kCT + 1) + lane] += run;
  }
  __syncthreads();
  acc_t* ob = out + ((b * G + g) * C + c0) * K + k0;
  for (int i = tid; i < kn * cn; i += kWarps * 32) {
    const int c = i / kn, k = i - c * kn;
    ob[c * K + k] = acc[k * (kCT + 1) + c];
  }
}

// Grid (cdiv(N, kPix), B), one thread per pixel: dfeats [B, C, N], dlogits [B, K, N].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPix)
    bwd_kernel(const scalar_t* __restrict__ feats, const acc_t* __restrict__ dr,
               const acc_t* __restrict__ drr, const int64_t* __restrict__ labels,
               const acc_t* __restrict__ w, scalar_t* __restrict__ dfeats,
               scalar_t* __restrict__ dlogits, int64_t C, int64_t N, int64_t K) {
  const int64_t b = blockIdx.y, n = static_cast<int64_t>(blockIdx.x) * kPix + threadIdx.x;
  if (n >= N) return;
  const int64_t l = labels[b * N + n];
  const bool ok = in_range(l, K);
  const acc_t wv = ok ? w[b * N + n] : acc_t(0);
  const acc_t* g = dr + b * C * K + (ok ? l : 0);
  const scalar_t* f = feats + b * C * N + n;
  scalar_t* df = dfeats + b * C * N + n;
  acc_t dot = 0;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t gc = ok ? g[c * K] : acc_t(0);
    df[c * N] = static_cast<scalar_t>(wv * gc);
    dot += gc * static_cast<acc_t>(f[c * N]);
  }
  const acc_t dl = ok ? wv * (dot - drr[b * K + l]) : acc_t(0);
  scalar_t* out = dlogits + b * K * N + n;
  for (int64_t k = 0; k < K; ++k) out[k * N] = static_cast<scalar_t>(k == l ? dl : acc_t(0));
}

// Grid (cdiv(N, kPix), cdiv(C, kGC), B): a thread reads pixel n's label once and writes
// out[b, c, n] = r[b, c, label] (0 for a label outside [0, K)) for kGC channels c.
constexpr int kGC = 8;

template <typename scalar_t>
__global__ void __launch_bounds__(kPix)
    gather_kernel(const scalar_t* __restrict__ r, const int64_t* __restrict__ labels,
                  scalar_t* __restrict__ out, int64_t C, int64_t N, int64_t K) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kPix + threadIdx.x;
  if (n >= N) return;
  const int64_t b = blockIdx.z, c0 = static_cast<int64_t>(blockIdx.y) * kGC;
  const int64_t l = labels[b * N + n];
  const bool ok = in_range(l, K);
  const int64_t cn = C - c0 < kGC ? C - c0 : kGC;
  const scalar_t* rp = r + (b * C + c0) * K + (ok ? l : 0);
  scalar_t* op = out + (b * C + c0) * N + n;
  for (int64_t c = 0; c < cn; ++c) op[c * N] = ok ? rp[c * K] : static_cast<scalar_t>(0);
}


// ---------------------------------------------------------------------------------------------
// Host side: the launch plans and sequences, shared by the CUDA launchers (semantic_pool.cu, with
// a launcher that runs kernel<<<grid, block, smem, stream>>>) and by the CPU emulation of the
// CUDA execution model that runs them in CI without a GPU (tests/cuda_emu). A Launch is called
// as launch(kernel, grid, block, shared_bytes, args...) and has `int sms` (multiprocessors).
// Outputs and scratch are allocated on the inputs' device.

using gpu::blocks_for;
using gpu::cdiv;
using gpu::kSmemBudget;

struct SegsumPlan {
  int64_t KT, n_ct, n_kt, G, pix;  // classes per class tile, tiles, pixel groups, group length
};

template <typename acc_t>
SegsumPlan segsum_plan(int64_t B, int64_t C, int64_t N, int64_t K, int64_t sms) {
  // classes per block: as many accumulators as fit next to the staged tile (float 232, double 48)
  constexpr int64_t per_class = (kCT + 1) * int64_t(sizeof(acc_t));
  constexpr int64_t kt_cap = (kSmemBudget - segsum_smem_fixed<acc_t>()) / per_class / kWarps * kWarps;
  static_assert(kt_cap >= kWarps, "the segmented sum's tile leaves no room for accumulators");
  SegsumPlan p;
  p.KT = std::min(K, kt_cap);
  p.n_ct = cdiv(C, kCT);
  p.n_kt = cdiv(K, p.KT);
  const int64_t n_tiles = cdiv(N, kPT);
  p.G = gpu::pixel_groups(B * p.n_ct * p.n_kt, n_tiles, 2, B * C * K * int64_t(sizeof(acc_t)), sms);
  p.pix = cdiv(n_tiles, p.G) * kPT;
  p.G = cdiv(N, p.pix);  // no empty group
  TORCH_CHECK(p.G * p.n_ct * p.n_kt <= std::numeric_limits<int32_t>::max(),
              "fastctx.semantic_pool: too many blocks for one launch (C=", C, ", K=", K, ", N=", N, ")");
  return p;
}

// out [B, C, K] (acc_t) = the segmented sum of x [B, C, H, W] weighted by w [B, H, W] (or by 1
// when w is undefined).
template <typename scalar_t, typename acc_t, class Launch>
void run_segsum(const Launch& launch, const at::Tensor& x, const at::Tensor& labels,
                const at::Tensor& w, const at::Tensor& out) {
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2) * x.size(3), K = out.size(2);
  if (B == 0 || C == 0 || N == 0) return;  // out is zeros
  const SegsumPlan p = segsum_plan<acc_t>(B, C, N, K, launch.sms);
  const at::Tensor part = p.G == 1 ? out : at::empty({B, p.G, C, K}, out.options());
  const dim3 grid(static_cast<unsigned>(p.G * p.n_ct * p.n_kt), static_cast<unsigned>(B));
  const size_t smem = static_cast<size_t>(segsum_smem<acc_t>(p.KT));
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t* lp = labels.const_data_ptr<int64_t>();
  acc_t* pp = part.mutable_data_ptr<acc_t>();
  if (w.defined()) {
    launch(segsum_kernel<scalar_t, acc_t, true>, grid, dim3(kWarps * 32), smem, xp, lp,
           w.const_data_ptr<acc_t>(), pp, C, N, K, p.KT, p.n_ct, p.n_kt, p.G, p.pix);
  } else {
    launch(segsum_kernel<scalar_t, acc_t, false>, grid, dim3(kWarps * 32), smem, xp, lp,
           static_cast<const acc_t*>(nullptr), pp, C, N, K, p.KT, p.n_ct, p.n_kt, p.G, p.pix);
  }
  if (p.G > 1) {
    launch(gpu::sum_groups_kernel<acc_t, acc_t>, dim3(blocks_for(B * C * K)), dim3(gpu::kThreads),
           size_t(0), static_cast<const acc_t*>(pp), out.mutable_data_ptr<acc_t>(), B, p.G, C * K,
           acc_t(1));
  }
}

// The ops' bodies after their argument checks (semantic_pool.cu), contract as in
// csrc/ops/semantic_pool.cpp. Inputs of any strides (made contiguous here).
template <class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd(const Launch& launch,
                                                               const at::Tensor& feats,
                                                               const at::Tensor& logits) {
  const int64_t B = feats.size(0), C = feats.size(1), H = feats.size(2), W = feats.size(3),
                K = logits.size(1), N = H * W;
  const auto copts = feats.options().dtype(acc_dtype(feats.scalar_type())),
             lopts = feats.options().dtype(at::kLong);
  at::Tensor regions = at::zeros({B, C, K}, copts), counts = at::zeros({B, K}, lopts);
  at::Tensor labels = at::empty({B, H, W}, lopts), w = at::empty({B, H, W}, copts);
  if (B == 0 || N == 0) return {regions, counts, labels, w};
  const at::Tensor f = feats.contiguous(), l = logits.contiguous();
  const int64_t nb = cdiv(N, kPix);
  TORCH_CHECK(nb <= std::numeric_limits<int32_t>::max(), "fastctx.semantic_pool (sp_fwd): map too large (N=", N, ")");
  const at::Tensor best = at::empty({B, N}, copts), pmax = at::empty({B, nb, K}, copts),
                   psum = at::empty({B, nb, K}, copts),
                   pcnt = at::empty({B, nb, K}, copts.dtype(at::kInt)),
                   m = at::empty({B, K}, copts), z = at::empty({B, K}, copts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "sp_fwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    launch(argmax_kernel<scalar_t, acc_t>, dim3(static_cast<unsigned>(nb), static_cast<unsigned>(B)),
           dim3(kPix), size_t(0), l.const_data_ptr<scalar_t>(), labels.mutable_data_ptr<int64_t>(),
           best.mutable_data_ptr<acc_t>(), pmax.mutable_data_ptr<acc_t>(),
           psum.mutable_data_ptr<acc_t>(), pcnt.mutable_data_ptr<int>(), N, K, nb);
    launch(class_stats_kernel<acc_t>, dim3(blocks_for(B * K)), dim3(kPix), size_t(0),
           pmax.const_data_ptr<acc_t>(), psum.const_data_ptr<acc_t>(), pcnt.const_data_ptr<int>(),
           m.mutable_data_ptr<acc_t>(), z.mutable_data_ptr<acc_t>(),
           counts.mutable_data_ptr<int64_t>(), B, K, nb);
    launch(weights_kernel<acc_t>, dim3(blocks_for(B * N)), dim3(kPix), size_t(0),
           labels.const_data_ptr<int64_t>(), best.const_data_ptr<acc_t>(),
           m.const_data_ptr<acc_t>(), z.const_data_ptr<acc_t>(), w.mutable_data_ptr<acc_t>(), B, N,
           K);
    run_segsum<scalar_t, acc_t>(launch, f, labels, w, regions);
  });
  return {regions, counts, labels, w};
}

template <class Launch>
std::tuple<at::Tensor, at::Tensor> bwd(const Launch& launch, const at::Tensor& dregions,
                                       const at::Tensor& feats, const at::Tensor& labels,
                                       const at::Tensor& w, const at::Tensor& regions) {
  const int64_t B = feats.size(0), C = feats.size(1), H = feats.size(2), W = feats.size(3),
                K = regions.size(2), N = H * W;
  at::Tensor dfeats = at::empty({B, C, H, W}, feats.options());
  at::Tensor dlogits = at::empty({B, K, H, W}, feats.options());
  if (B == 0 || N == 0) return {dfeats, dlogits};
  const at::ScalarType ct = acc_dtype(feats.scalar_type());
  const at::Tensor f = feats.contiguous(), dr = dregions.to(ct).contiguous(),
                   rg = regions.to(ct).contiguous(), wc = w.to(ct).contiguous(),
                   lab = labels.contiguous(), drr = at::empty({B, K}, dr.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "sp_bwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    launch(gpu::channel_dot_kernel<acc_t>, dim3(blocks_for(B * K)), dim3(kPix), size_t(0),
           dr.const_data_ptr<acc_t>(), rg.const_data_ptr<acc_t>(), drr.mutable_data_ptr<acc_t>(),
           B, C, K);
    launch(bwd_kernel<scalar_t, acc_t>, dim3(blocks_for(N), static_cast<unsigned>(B)), dim3(kPix),
           size_t(0), f.const_data_ptr<scalar_t>(), dr.const_data_ptr<acc_t>(),
           drr.const_data_ptr<acc_t>(), lab.const_data_ptr<int64_t>(), wc.const_data_ptr<acc_t>(),
           dfeats.mutable_data_ptr<scalar_t>(), dlogits.mutable_data_ptr<scalar_t>(), C, N, K);
  });
  return {dfeats, dlogits};
}

template <class Launch>
at::Tensor gather(const Launch& launch, const at::Tensor& regions, const at::Tensor& labels,
                  at::ScalarType dtype) {
  const int64_t B = regions.size(0), C = regions.size(1), K = regions.size(2);
  const int64_t H = labels.size(1), W = labels.size(2), N = H * W;
  at::Tensor out = at::empty({B, C, H, W}, regions.options().dtype(dtype));
  if (out.numel() == 0) return out;
  TORCH_CHECK(cdiv(C, kGC) <= 65535, "fastctx.semantic_pool (sp_gather): at most ", 65535 * kGC,
              " channels on CUDA, got ", C);
  const at::Tensor r = regions.to(dtype).contiguous(), lab = labels.contiguous();
  const dim3 grid(blocks_for(N), static_cast<unsigned>(cdiv(C, kGC)), static_cast<unsigned>(B));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sp_gather_cuda", [&] {
    launch(gather_kernel<scalar_t>, grid, dim3(kPix), size_t(0), r.const_data_ptr<scalar_t>(),
           lab.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), C, N, K);
  });
  return out;
}

template <class Launch>
at::Tensor scatter(const Launch& launch, const at::Tensor& dpooled, const at::Tensor& labels,
                   int64_t K) {
  const int64_t B = dpooled.size(0), C = dpooled.size(1);
  at::Tensor out = at::zeros({B, C, K}, dpooled.options().dtype(acc_dtype(dpooled.scalar_type())));
  if (out.numel() == 0 || dpooled.numel() == 0) return out;
  const at::Tensor x = dpooled.contiguous(), lab = labels.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sp_scatter_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    run_segsum<scalar_t, acc_t>(launch, x, lab, at::Tensor(), out);
  });
  return out;
}

}  // namespace sp_gpu
}  // namespace fastctx
