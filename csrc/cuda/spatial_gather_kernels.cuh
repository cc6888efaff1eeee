// Device code and launch sequences of the spatial gather (OCR's soft region pooling), CUDA.
// Launchers, argument checks and op registration: csrc/cuda/spatial_gather.cu. Semantics:
// shared/docs/OPERATORS.md section 4; the host contract: csrc/ops/spatial_gather.cpp.
//
// Layout NCHW-contiguous (the sequences make it so), pixels n = i * W + j; accumulation in acc_t
// (float for float16 / bfloat16 / float32, double for float64). No atomics: every sum has one
// owner that adds in a fixed order, and sums over pixel groups are added in group order, so
// results are bit-identical run to run on one device (the groups follow its multiprocessor
// count). p[k, n] = exp(scale * logits[k, n] - lse[k]) (0 for a class whose logits are all -inf:
// lse = -inf) is recomputed where needed; nothing of size K x N is stored.
//
// Forward:
//   lse_kernel     one block per (class, image): an online max / sum of exponentials per thread
//                  over the pixels, then a fixed tree over the block's threads;
//   xyt_kernel     regions = feats [C x N] @ p^T [N x K], a block per (128 channels, 32 classes,
//                  pixel group): it stages 32 pixels of feats and of p in shared memory at a time;
//                  lane l of warp w owns channels l + 32 i and classes 4 w + j (i, j < 4), 16
//                  accumulators in registers;
//   gpu::sum_groups_kernel  the groups' partials summed in group order, in the feats' dtype.
// Backward (dR = dL/dregions, D[k] = <dR[:, k], regions[:, k]>):
//   gpu::channel_dot_kernel  D per (image, class);
//   dlogits_kernel  one thread per pixel and 32 classes: G[k] = <dR[:, k], feats[:, n]> over all
//                   channels (dR staged 32 channels at a time), dlogits = scale p (G - D);
//   dfeats_kernel   one thread per pixel and 64 channels: dfeats[c, n] = sum_k p[k, n] dR[c, k]
//                   (dR staged 32 classes at a time).
//
// Not yet run on a GPU (written in a session without one). CI compiles it for sm_90 and runs
// it, kernels and sequences alike, on the CPU under an emulation of the CUDA execution model
// against the reference (tests/test_spatial_gather_cuda_emu.py). Nothing here is tuned.
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

#include "common.cuh"

namespace fastctx {
namespace sg_gpu {

using gpu::acc_exp;
using gpu::acc_log;
using gpu::acc_max;
using gpu::blocks_for;
using gpu::cdiv;
using gpu::kThreads;
using gpu::lse_merge;
using gpu::neg_inf;
using gpu::prob;

constexpr int kCT = 128;  // forward: channels per block (4 per lane)
constexpr int kKT = 32;   // forward: classes per block (4 per warp)
constexpr int kNT = 32;   // forward: pixels per staged step
constexpr int kKR = 32;   // dlogits: classes per thread (registers)
constexpr int kCR = 64;   // dfeats: channels per thread (registers)
constexpr int kStage = 32;  // backward: channels (dlogits) / classes (dfeats) of dR per stage

// Grid (K, B), kThreads threads: lse [B, K] of scale * logits over the pixels.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    lse_kernel(const scalar_t* __restrict__ logits, acc_t* __restrict__ lse, int64_t N,
               int64_t K, acc_t scale) {
  __shared__ acc_t sm[kThreads];
  __shared__ acc_t ss[kThreads];
  const int64_t k = blockIdx.x, b = blockIdx.y;
  const int t = threadIdx.x;
  const scalar_t* l = logits + (b * K + k) * N;
  acc_t m = neg_inf<acc_t>(), s = 0;
  for (int64_t n = t; n < N; n += kThreads) lse_merge(m, s, scale * static_cast<acc_t>(l[n]), acc_t(1));
  sm[t] = m;
  ss[t] = s;
  __syncthreads();
  for (int h = kThreads / 2; h > 0; h >>= 1) {  // a fixed tree: deterministic
    if (t < h) {
      acc_t mm = sm[t], sv = ss[t];
      lse_merge(mm, sv, sm[t + h], ss[t + h]);
      sm[t] = mm;
      ss[t] = sv;
    }
    __syncthreads();
  }
  if (t == 0) lse[b * K + k] = sm[0] == neg_inf<acc_t>() ? sm[0] : sm[0] + acc_log(ss[0]);
}

// Grid (G * n_ct * n_kt, B), kThreads threads. part [B, G, C, K]: group g's sum over its pixels
// of feats[c, n] y[k, n], with y = p (FROM_LOGITS: from logits and lse) or read from y
// [B, K, N] (region attention's backward: dk and dv). Groups are `pix` pixels long (a multiple
// of kNT).
template <typename scalar_t, typename acc_t, bool FROM_LOGITS>
__global__ void __launch_bounds__(kThreads)
    xyt_kernel(const scalar_t* __restrict__ feats, const scalar_t* __restrict__ logits,
               const acc_t* __restrict__ lse, const acc_t* __restrict__ y,
               acc_t* __restrict__ part, int64_t C, int64_t K, int64_t N, int64_t n_ct,
               int64_t n_kt, int64_t G, int64_t pix, acc_t scale) {
  __shared__ acc_t fs[kCT][kNT + 1];  // [channel][pixel]
  __shared__ acc_t ps[kNT][kKT + 1];  // [pixel][class]
  __shared__ acc_t ls[kKT];
  const int64_t bx = blockIdx.x, b = blockIdx.y;
  const int64_t kt = bx % n_kt, ct = (bx / n_kt) % n_ct, g = bx / (n_kt * n_ct);
  const int64_t k0 = kt * kKT, c0 = ct * kCT;
  const int64_t g0 = g * pix, g1 = (g0 + pix < N ? g0 + pix : N);
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  if (FROM_LOGITS && t < kKT) ls[t] = k0 + t < K ? lse[b * K + k0 + t] : neg_inf<acc_t>();
  acc_t acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0;
  const scalar_t* fb = feats + (b * C + c0) * N;
  const scalar_t* lb = FROM_LOGITS ? logits + (b * K + k0) * N : nullptr;
  const acc_t* yb = FROM_LOGITS ? nullptr : y + (b * K + k0) * N;
  for (int64_t n0 = g0; n0 < g1; n0 += kNT) {
    const int np = static_cast<int>(g1 - n0 < kNT ? g1 - n0 : kNT);
    __syncthreads();  // the previous step's reads are done (and ls is visible)
    for (int i = t; i < kCT * kNT; i += kThreads) {
      const int r = i / kNT, j = i - r * kNT;
      fs[r][j] = (c0 + r < C && j < np) ? static_cast<acc_t>(fb[r * N + n0 + j]) : acc_t(0);
    }
    for (int i = t; i < kKT * kNT; i += kThreads) {
      const int r = i / kNT, j = i - r * kNT;
      acc_t yv = 0;
      if (k0 + r < K && j < np) {
        if constexpr (FROM_LOGITS) {
          yv = prob(scale * static_cast<acc_t>(lb[r * N + n0 + j]), ls[r]);
        } else {
          yv = yb[r * N + n0 + j];
        }
      }
      ps[j][r] = yv;
    }
    __syncthreads();
    for (int j = 0; j < np; ++j) {
      acc_t a[4], p[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = fs[lane + 32 * i][j];
#pragma unroll
      for (int i = 0; i < 4; ++i) p[i] = ps[j][4 * warp + i];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) acc[i][jj] += a[i] * p[jj];
    }
  }
  acc_t* out = part + (b * G + g) * C * K;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t c = c0 + lane + 32 * i;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int64_t k = k0 + 4 * warp + jj;
      if (c < C && k < K) out[c * K + k] = acc[i][jj];
    }
  }
}

// Grid (cdiv(N, kThreads), cdiv(K, kKR), B), one thread per pixel and kKR classes k0 + j:
// dlogits[k, n] = scale p[k, n] (<dR[:, k], feats[:, n]> - D[k]).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dlogits_kernel(const scalar_t* __restrict__ feats, const scalar_t* __restrict__ logits,
                   const acc_t* __restrict__ dr, const acc_t* __restrict__ lse,
                   const acc_t* __restrict__ d, scalar_t* __restrict__ dlogits, int64_t C,
                   int64_t K, int64_t N, acc_t scale) {
  __shared__ acc_t drs[kStage][kKR];  // dR[c0 + cc, k0 + j]
  const int64_t b = blockIdx.z, k0 = static_cast<int64_t>(blockIdx.y) * kKR;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool live = n < N;  // every thread takes part in the barriers
  const int kn = static_cast<int>(K - k0 < kKR ? K - k0 : kKR);
  acc_t gk[kKR];
#pragma unroll
  for (int j = 0; j < kKR; ++j) gk[j] = 0;
  gpu::stream_dots<kKR, kStage, acc_t>(feats + b * C * N + n, dr + b * C * K + k0, C, K, N, kn, live, drs, gk);
  if (!live) return;
#pragma unroll
  for (int j = 0; j < kKR; ++j) {
    if (j < kn) {
      const int64_t k = k0 + j;
      const acc_t p = prob(scale * static_cast<acc_t>(logits[(b * K + k) * N + n]), lse[b * K + k]);
      dlogits[(b * K + k) * N + n] = static_cast<scalar_t>(scale * p * (gk[j] - d[b * K + k]));
    }
  }
}

// Grid (cdiv(N, kThreads), cdiv(C, kCR), B), one thread per pixel and kCR channels c0 + i:
// dfeats[c, n] = sum over k (in order) of p[k, n] dR[c, k].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dfeats_kernel(const scalar_t* __restrict__ logits, const acc_t* __restrict__ dr,
                  const acc_t* __restrict__ lse, scalar_t* __restrict__ dfeats, int64_t C,
                  int64_t K, int64_t N, acc_t scale) {
  __shared__ acc_t drs[kStage][kCR];  // dR[c0 + i, k0 + kk]
  const int64_t b = blockIdx.z, c0 = static_cast<int64_t>(blockIdx.y) * kCR;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool live = n < N;
  const int cn = static_cast<int>(C - c0 < kCR ? C - c0 : kCR);
  acc_t acc[kCR];
#pragma unroll
  for (int i = 0; i < kCR; ++i) acc[i] = 0;
  const scalar_t* l = logits + b * K * N + n;
  const acc_t* lb = lse + b * K;
  gpu::stream_mix<kCR, kStage, acc_t>(
      dr + (b * C + c0) * K, K, cn, live,
      [l, lb, N, scale](int64_t k) { return prob(scale * static_cast<acc_t>(l[k * N]), lb[k]); }, drs,
      acc);
  if (!live) return;
  scalar_t* out = dfeats + (b * C + c0) * N + n;
#pragma unroll
  for (int i = 0; i < kCR; ++i)
    if (i < cn) out[i * N] = static_cast<scalar_t>(acc[i]);
}

// ---------------------------------------------------------------------------------------------
// Host side: the launch sequences, shared by the CUDA launchers (spatial_gather.cu) and the CPU
// emulation of tests/cuda_emu (a Launch: launch(kernel, grid, block, shared_bytes, args...) and
// `int sms`). Outputs and scratch are allocated on the inputs' device.

// Pixel groups of the forward, and their length (a multiple of kNT).
inline std::tuple<int64_t, int64_t> fwd_plan(int64_t B, int64_t C, int64_t K, int64_t N,
                                             int64_t acc_bytes, int64_t sms) {
  const int64_t steps = cdiv(N, kNT);
  const int64_t G = gpu::pixel_groups(B * cdiv(C, kCT) * cdiv(K, kKT), steps, 4, B * C * K * acc_bytes, sms);
  const int64_t pix = cdiv(steps, G) * kNT;
  return {cdiv(N, pix), pix};  // no empty group
}

// feats [B, C, H, W], logits [B, K, H, W] (any strides; not empty) -> regions [B, C, K] in the
// feats' dtype, lse [B, K] in acc_t.
template <class Launch>
std::tuple<at::Tensor, at::Tensor> fwd(const Launch& launch, const at::Tensor& feats,
                                       const at::Tensor& logits, double scale) {
  const int64_t B = feats.size(0), C = feats.size(1), K = logits.size(1);
  const int64_t N = feats.size(2) * feats.size(3);
  const auto copts = feats.options().dtype(acc_dtype(feats.scalar_type()));
  at::Tensor lse = at::empty({B, K}, copts), out = at::empty({B, C, K}, feats.options());
  const at::Tensor f = feats.contiguous(), l = logits.contiguous();
  int64_t G = 0, pix = 0;
  std::tie(G, pix) = fwd_plan(B, C, K, N, static_cast<int64_t>(copts.dtype().itemsize()), launch.sms);
  const int64_t n_ct = cdiv(C, kCT), n_kt = cdiv(K, kKT);
  TORCH_CHECK(G * n_ct * n_kt <= std::numeric_limits<int32_t>::max() && K <= std::numeric_limits<int32_t>::max(),
              "fastctx.spatial_gather (sg_fwd): too many blocks for one launch (C=", C, ", K=", K, ", N=", N, ")");
  const at::Tensor part = at::empty({B, G, C, K}, copts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "sg_fwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const acc_t sc = static_cast<acc_t>(scale);
    launch(lse_kernel<scalar_t, acc_t>, dim3(static_cast<unsigned>(K), static_cast<unsigned>(B)),
           dim3(kThreads), size_t(0), l.const_data_ptr<scalar_t>(), lse.mutable_data_ptr<acc_t>(),
           N, K, sc);
    launch(xyt_kernel<scalar_t, acc_t, true>, dim3(static_cast<unsigned>(G * n_ct * n_kt), static_cast<unsigned>(B)),
           dim3(kThreads), size_t(0), f.const_data_ptr<scalar_t>(), l.const_data_ptr<scalar_t>(),
           static_cast<const acc_t*>(lse.const_data_ptr<acc_t>()), static_cast<const acc_t*>(nullptr),
           part.mutable_data_ptr<acc_t>(), C, K, N, n_ct, n_kt, G, pix, sc);
    launch(gpu::sum_groups_kernel<acc_t, scalar_t>, dim3(blocks_for(B * C * K)), dim3(kThreads),
           size_t(0), static_cast<const acc_t*>(part.const_data_ptr<acc_t>()),
           out.mutable_data_ptr<scalar_t>(), B, G, C * K, acc_t(1));
  });
  return {out, lse};
}

// The gradients of feats and logits (in their dtype) from dregions [B, C, K].
template <class Launch>
std::tuple<at::Tensor, at::Tensor> bwd(const Launch& launch, const at::Tensor& dregions,
                                       const at::Tensor& feats, const at::Tensor& logits,
                                       const at::Tensor& regions, const at::Tensor& lse,
                                       double scale) {
  const int64_t B = feats.size(0), C = feats.size(1), K = logits.size(1);
  const int64_t N = feats.size(2) * feats.size(3);
  const at::ScalarType ct = acc_dtype(feats.scalar_type());
  at::Tensor dfeats = at::empty(feats.sizes(), feats.options());
  at::Tensor dlogits = at::empty(logits.sizes(), logits.options());
  const at::Tensor f = feats.contiguous(), l = logits.contiguous(), dr = dregions.to(ct).contiguous(),
                   r = regions.to(ct).contiguous(), ls = lse.contiguous(),
                   d = at::empty({B, K}, dr.options());
  TORCH_CHECK(B <= 65535 && cdiv(K, kKR) <= 65535 && cdiv(C, kCR) <= 65535,
              "fastctx.spatial_gather (sg_bwd): too many images, classes or channels for one launch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "sg_bwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const acc_t sc = static_cast<acc_t>(scale);
    launch(gpu::channel_dot_kernel<acc_t>, dim3(blocks_for(B * K)), dim3(kThreads), size_t(0),
           dr.const_data_ptr<acc_t>(), r.const_data_ptr<acc_t>(), d.mutable_data_ptr<acc_t>(), B,
           C, K);
    launch(dlogits_kernel<scalar_t, acc_t>,
           dim3(blocks_for(N), static_cast<unsigned>(cdiv(K, kKR)), static_cast<unsigned>(B)),
           dim3(kThreads), size_t(0), f.const_data_ptr<scalar_t>(), l.const_data_ptr<scalar_t>(),
           dr.const_data_ptr<acc_t>(), ls.const_data_ptr<acc_t>(),
           static_cast<const acc_t*>(d.const_data_ptr<acc_t>()),
           dlogits.mutable_data_ptr<scalar_t>(), C, K, N, sc);
    launch(dfeats_kernel<scalar_t, acc_t>,
           dim3(blocks_for(N), static_cast<unsigned>(cdiv(C, kCR)), static_cast<unsigned>(B)),
           dim3(kThreads), size_t(0), l.const_data_ptr<scalar_t>(), dr.const_data_ptr<acc_t>(),
           ls.const_data_ptr<acc_t>(), dfeats.mutable_data_ptr<scalar_t>(), C, K, N, sc);
  });
  return {dfeats, dlogits};
}

}  // namespace sg_gpu
}  // namespace fastctx
