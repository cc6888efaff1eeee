// Device code and launch sequences of region attention ("pixels attend to a few keys": OCR's
// regions, ANN's pooled positions, ISNet's classes), CUDA. Argument checks, launcher and op
// registration: csrc/cuda/region_attention.cu. Semantics: shared/docs/OPERATORS.md section 4;
// the host contract: csrc/ops/region_attention.cpp (this backend never keeps p: the backward
// recomputes the weights, as Triton's does).
//
// NCHW-contiguous (the sequences make it so), pixels n = i * W + j, accumulation in acc_t. The
// weights P [B, S, N] (acc_t) live in a scratch buffer for the call: S x N is small next to the
// maps at the models' sizes (S = 19 keys: 19 values a pixel against 512 channels). No atomics:
// every sum has one owner adding in a fixed order; sums over pixels go through per-group
// partials added in group order. Deterministic run to run on one device.
//
// Forward:
//   dots_kernel<ENERGY>  E[s, n] = scale <q[:, n], k[:, s]> + bias[s]: a thread per pixel and 32
//                        keys in registers, k staged 32 channels at a time;
//   softmax_kernel       per pixel: lse over the keys, E -> P in place (0 when every key of the
//                        pixel is masked: lse = -inf);
//   mix_kernel           out[c, n] = sum_s P[s, n] v[c, s]: a thread per pixel and 64 channels
//                        in registers, v staged 32 keys at a time.
// Backward (the same two kernels recompute P; D[n] = <dout[:, n], out[:, n]>):
//   gpu::pixel_dot_kernel  D;
//   dots_kernel<DSCORE>    dE[s, n] = P[s, n] (<dout[:, n], v[:, s]> - D[n]);
//   mix_kernel             dq[c, n] = scale sum_s dE[s, n] k[c, s];
//   sg_gpu::xyt_kernel     dk = scale q dE^T and dv = dout P^T (reductions over the pixels, per
//                          pixel group, then gpu::sum_groups_kernel);
//   row_sum_kernel         dbias[s] = sum_n dE[s, n].
//
// Not yet run on a GPU (written in a session without one). CI compiles it for sm_90 and runs
// it, kernels and sequences alike, on the CPU under an emulation of the CUDA execution model
// against the reference (tests/test_region_attention_cuda_emu.py). Nothing here is tuned.
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <math.h>
#include <tuple>

#include "common.cuh"
#include "spatial_gather_kernels.cuh"

namespace fastctx {
namespace ra_gpu {

using gpu::acc_log;
using gpu::blocks_for;
using gpu::cdiv;
using gpu::kThreads;
using gpu::lse_merge;
using gpu::neg_inf;
using gpu::prob;

constexpr int kST = 32;  // keys per thread (registers) in dots_kernel
constexpr int kCS = 32;  // channels per stage in dots_kernel
constexpr int kCR = 64;  // channels per thread (registers) in mix_kernel

// Grid (cdiv(N, kThreads), cdiv(S, kST), B), a thread per pixel n and keys s0 + j:
// acc[j] = <x[:, n], m[:, s0 + j]> over C channels (x [B, C, N], m [B, C, S]), then
//   DSCORE = false: e[s, n] = scale acc + bias[s]                       (e: E, written)
//   DSCORE = true:  e[s, n] = P[s, n] (acc - d[n])  with P read from p  (e: dE, written)
template <typename scalar_t, typename acc_t, bool DSCORE>
__global__ void __launch_bounds__(kThreads)
    dots_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ m,
                const scalar_t* __restrict__ bias, const acc_t* __restrict__ p,
                const acc_t* __restrict__ d, acc_t* __restrict__ e, int64_t C, int64_t S,
                int64_t N, acc_t scale) {
  __shared__ acc_t ms[kCS][kST];  // m[c0 + cc, s0 + j]
  const int64_t b = blockIdx.z, s0 = static_cast<int64_t>(blockIdx.y) * kST;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool live = n < N;  // every thread takes part in the barriers
  const int sn = static_cast<int>(S - s0 < kST ? S - s0 : kST);
  acc_t acc[kST];
#pragma unroll
  for (int j = 0; j < kST; ++j) acc[j] = 0;
  gpu::stream_dots<kST, kCS, acc_t>(x + b * C * N + n, m + b * C * S + s0, C, S, N, sn, live, ms, acc);
  if (!live) return;
#pragma unroll
  for (int j = 0; j < kST; ++j) {
    if (j < sn) {
      const int64_t o = (b * S + s0 + j) * N + n;
      if constexpr (DSCORE) {
        e[o] = p[o] * (acc[j] - d[b * N + n]);
      } else {
        e[o] = scale * acc[j] + static_cast<acc_t>(bias[b * S + s0 + j]);
      }
    }
  }
}

// One thread per pixel, B * N of them: lse[b, n] over the S energies of e [B, S, N], and e
// turned into the softmax weights in place.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    softmax_kernel(acc_t* __restrict__ e, acc_t* __restrict__ lse, int64_t B, int64_t S,
                   int64_t N) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= B * N) return;
  const int64_t b = i / N, n = i - b * N;
  acc_t* col = e + b * S * N + n;
  acc_t m = neg_inf<acc_t>(), l = 0;
  for (int64_t s = 0; s < S; ++s) lse_merge(m, l, col[s * N], acc_t(1));
  const acc_t ls = m == neg_inf<acc_t>() ? m : m + acc_log(l);
  lse[i] = ls;
  for (int64_t s = 0; s < S; ++s) col[s * N] = prob(col[s * N], ls);
}

// Grid (cdiv(N, kThreads), cdiv(C, kCR), B), a thread per pixel n and channels c0 + i:
// y[c, n] = alpha * sum over s (in order) of w[c, s] a[s, n] (a [B, S, N] acc_t, w [B, C, S]).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    mix_kernel(const acc_t* __restrict__ a, const scalar_t* __restrict__ w,
               scalar_t* __restrict__ y, int64_t C, int64_t S, int64_t N, acc_t alpha) {
  __shared__ acc_t ws[kST][kCR];  // w[c0 + i, s0 + j]
  const int64_t b = blockIdx.z, c0 = static_cast<int64_t>(blockIdx.y) * kCR;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool live = n < N;
  const int cn = static_cast<int>(C - c0 < kCR ? C - c0 : kCR);
  acc_t acc[kCR];
#pragma unroll
  for (int i = 0; i < kCR; ++i) acc[i] = 0;
  const acc_t* ap = a + b * S * N + n;
  gpu::stream_mix<kCR, kST, acc_t>(w + (b * C + c0) * S, S, cn, live,
                                   [ap, N](int64_t s) { return ap[s * N]; }, ws, acc);
  if (!live) return;
  scalar_t* out = y + (b * C + c0) * N + n;
#pragma unroll
  for (int i = 0; i < kCR; ++i)
    if (i < cn) out[i * N] = static_cast<scalar_t>(alpha * acc[i]);
}

// Grid (S, B), kThreads threads: out[b, s] = sum over n of x[b, s, n] (a fixed tree over the
// block's threads).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    row_sum_kernel(const acc_t* __restrict__ x, scalar_t* __restrict__ out, int64_t S, int64_t N) {
  __shared__ acc_t sm[kThreads];
  const int64_t s = blockIdx.x, b = blockIdx.y;
  const int t = threadIdx.x;
  const acc_t* row = x + (b * S + s) * N;
  acc_t v = 0;
  for (int64_t n = t; n < N; n += kThreads) v += row[n];
  sm[t] = v;
  __syncthreads();
  for (int h = kThreads / 2; h > 0; h >>= 1) {
    if (t < h) sm[t] += sm[t + h];
    __syncthreads();
  }
  if (t == 0) out[b * S + s] = static_cast<scalar_t>(sm[0]);
}

// ---------------------------------------------------------------------------------------------
// Host side: the launch sequences, shared by the CUDA launcher (region_attention.cu) and the CPU
// emulation of tests/cuda_emu (a Launch: launch(kernel, grid, block, shared_bytes, args...) and
// `int sms`). Outputs and scratch are allocated on the inputs' device.

inline void check_grid(int64_t B, int64_t S, int64_t C, const char* stage) {
  TORCH_CHECK(B <= 65535 && cdiv(S, kST) <= 65535 && cdiv(C, kCR) <= 65535 && S <= 65535,
              "fastctx.region_attention (", stage, "): too many images, keys or channels for one "
              "CUDA launch (B=", B, ", S=", S, ", C=", C, ")");
}

// P [B, S, N] (acc_t, written into `pe`) and lse [B, N] from q, k, bias.
template <typename scalar_t, typename acc_t, class Launch>
void weights(const Launch& launch, const at::Tensor& q, const at::Tensor& k,
             const at::Tensor& bias, const at::Tensor& pe, const at::Tensor& lse, acc_t scale) {
  const int64_t B = q.size(0), Cqk = q.size(1), N = q.size(2) * q.size(3), S = k.size(2);
  launch(dots_kernel<scalar_t, acc_t, false>,
         dim3(blocks_for(N), static_cast<unsigned>(cdiv(S, kST)), static_cast<unsigned>(B)),
         dim3(kThreads), size_t(0), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
         bias.const_data_ptr<scalar_t>(), static_cast<const acc_t*>(nullptr),
         static_cast<const acc_t*>(nullptr), pe.mutable_data_ptr<acc_t>(), Cqk, S, N, scale);
  launch(softmax_kernel<acc_t>, dim3(blocks_for(B * N)), dim3(kThreads), size_t(0),
         pe.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>(), B, S, N);
}

// q [B, Cqk, H, W], k [B, Cqk, S], v [B, Cv, S], bias [B, S] (dtype of q) -> out [B, Cv, H, W],
// lse [B, H, W] and an empty p.
template <class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const Launch& launch, const at::Tensor& q_in,
                                                   const at::Tensor& k_in, const at::Tensor& v_in,
                                                   const at::Tensor& bias_in, double scale) {
  const int64_t B = q_in.size(0), H = q_in.size(2), W = q_in.size(3), N = H * W;
  const int64_t S = k_in.size(2), Cv = v_in.size(1);
  const auto sopts = q_in.options().dtype(acc_dtype(q_in.scalar_type()));
  at::Tensor out = at::empty({B, Cv, H, W}, v_in.options()), lse = at::empty({B, H, W}, sopts);
  if (B * N == 0) return {out, lse, at::empty({0}, sopts)};
  check_grid(B, S, std::max(Cv, q_in.size(1)), "ra_fwd");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(),
                   bias = bias_in.contiguous(), pe = at::empty({B, S, N}, sopts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "ra_fwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    weights<scalar_t, acc_t>(launch, q, k, bias, pe, lse, static_cast<acc_t>(scale));
    launch(mix_kernel<scalar_t, acc_t>,
           dim3(blocks_for(N), static_cast<unsigned>(cdiv(Cv, kCR)), static_cast<unsigned>(B)),
           dim3(kThreads), size_t(0), static_cast<const acc_t*>(pe.const_data_ptr<acc_t>()),
           v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), Cv, S, N, acc_t(1));
  });
  return {out, lse, at::empty({0}, sopts)};
}

// x [B, C, H, W] and y [B, S, N] (acc_t) -> alpha * x y^T [B, C, S] in x's dtype, summed over
// pixel groups (sg_gpu::xyt_kernel and its plan).
template <typename scalar_t, typename acc_t, class Launch>
at::Tensor xyt(const Launch& launch, const at::Tensor& x, const at::Tensor& y, acc_t alpha) {
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2) * x.size(3), S = y.size(1);
  int64_t G = 0, pix = 0;
  std::tie(G, pix) = sg_gpu::fwd_plan(B, C, S, N, static_cast<int64_t>(sizeof(acc_t)), launch.sms);
  const int64_t n_ct = cdiv(C, sg_gpu::kCT), n_kt = cdiv(S, sg_gpu::kKT);
  const at::Tensor part = at::empty({B, G, C, S}, y.options());
  at::Tensor out = at::empty({B, C, S}, x.options());
  launch(sg_gpu::xyt_kernel<scalar_t, acc_t, false>,
         dim3(static_cast<unsigned>(G * n_ct * n_kt), static_cast<unsigned>(B)), dim3(kThreads),
         size_t(0), x.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr),
         static_cast<const acc_t*>(nullptr), y.const_data_ptr<acc_t>(),
         part.mutable_data_ptr<acc_t>(), C, S, N, n_ct, n_kt, G, pix, acc_t(1));
  launch(gpu::sum_groups_kernel<acc_t, scalar_t>, dim3(blocks_for(B * C * S)), dim3(kThreads),
         size_t(0), static_cast<const acc_t*>(part.const_data_ptr<acc_t>()),
         out.mutable_data_ptr<scalar_t>(), B, G, C * S, alpha);
  return out;
}

// The gradients of q, k, v and bias (in their dtypes) from dout [B, Cv, H, W].
template <class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const Launch& launch, const at::Tensor& dout_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& bias_in,
    const at::Tensor& out_in, double scale) {
  const int64_t B = q_in.size(0), Cqk = q_in.size(1), H = q_in.size(2), W = q_in.size(3),
                N = H * W, S = k_in.size(2), Cv = v_in.size(1);
  if (B * N == 0)
    return {at::zeros_like(q_in, at::MemoryFormat::Contiguous), at::zeros_like(k_in, at::MemoryFormat::Contiguous),
            at::zeros_like(v_in, at::MemoryFormat::Contiguous), at::zeros_like(bias_in, at::MemoryFormat::Contiguous)};
  check_grid(B, S, std::max(Cv, Cqk), "ra_bwd");
  const auto sopts = q_in.options().dtype(acc_dtype(q_in.scalar_type()));
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(),
                   bias = bias_in.contiguous(), dout = dout_in.contiguous(),
                   out = out_in.contiguous();
  const at::Tensor pe = at::empty({B, S, N}, sopts), de = at::empty({B, S, N}, sopts),
                   lse = at::empty({B, N}, sopts), d = at::empty({B, N}, sopts);
  at::Tensor dq = at::empty({B, Cqk, H, W}, q_in.options()), dbias = at::empty({B, S}, bias_in.options());
  at::Tensor dk, dv;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "ra_bwd_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const acc_t sc = static_cast<acc_t>(scale);
    weights<scalar_t, acc_t>(launch, q, k, bias, pe, lse, sc);
    launch(gpu::pixel_dot_kernel<scalar_t, acc_t>, dim3(std::min<unsigned>(blocks_for(B * N), 1u << 20)),
           dim3(kThreads), size_t(0), dout.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
           d.mutable_data_ptr<acc_t>(), B, Cv, N);
    launch(dots_kernel<scalar_t, acc_t, true>,
           dim3(blocks_for(N), static_cast<unsigned>(cdiv(S, kST)), static_cast<unsigned>(B)),
           dim3(kThreads), size_t(0), dout.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
           static_cast<const scalar_t*>(nullptr), static_cast<const acc_t*>(pe.const_data_ptr<acc_t>()),
           static_cast<const acc_t*>(d.const_data_ptr<acc_t>()), de.mutable_data_ptr<acc_t>(), Cv, S,
           N, sc);
    launch(mix_kernel<scalar_t, acc_t>,
           dim3(blocks_for(N), static_cast<unsigned>(cdiv(Cqk, kCR)), static_cast<unsigned>(B)),
           dim3(kThreads), size_t(0), static_cast<const acc_t*>(de.const_data_ptr<acc_t>()),
           k.const_data_ptr<scalar_t>(), dq.mutable_data_ptr<scalar_t>(), Cqk, S, N, sc);
    dk = xyt<scalar_t, acc_t>(launch, q, de, sc);
    dv = xyt<scalar_t, acc_t>(launch, dout, pe, acc_t(1));
    launch(row_sum_kernel<scalar_t, acc_t>, dim3(static_cast<unsigned>(S), static_cast<unsigned>(B)),
           dim3(kThreads), size_t(0), static_cast<const acc_t*>(de.const_data_ptr<acc_t>()),
           dbias.mutable_data_ptr<scalar_t>(), S, N);
  });
  return {dq, dk, dv, dbias};
}

}  // namespace ra_gpu
}  // namespace fastctx
