// What the CUDA sources share: device math in the accumulation type (float for float16 /
// bfloat16 / float32, double for float64: acc_dtype of ../ops/checks.h, which also holds the
// launchers' argument checks).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <math.h>

#include "../ops/checks.h"

// A kernel's dynamic shared memory (the CPU emulation of tests/cuda_emu defines its own).
#ifndef FASTCTX_DYNAMIC_SMEM
#define FASTCTX_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace fastctx {
namespace gpu {

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
__device__ __forceinline__ float acc_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double acc_max(double a, double b) { return fmax(a, b); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -static_cast<acc_t>(INFINITY);
}

// (m, s) <- the log-sum-exp pair of (m, s) and (m2, s2): s * exp(m) + s2 * exp(m2) = s' exp(m').
template <typename acc_t>
__device__ __forceinline__ void lse_merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  if (m2 == neg_inf<acc_t>()) return;
  if (m == neg_inf<acc_t>()) {
    m = m2;
    s = s2;
    return;
  }
  const acc_t mx = acc_max(m, m2);
  s = s * acc_exp(m - mx) + s2 * acc_exp(m2 - mx);
  m = mx;
}

// exp(x - lse): a softmax weight, 0 when lse = -inf (everything masked: no finite logit).
template <typename acc_t>
__device__ __forceinline__ acc_t prob(acc_t scaled_logit, acc_t lk) {
  return lk == neg_inf<acc_t>() ? acc_t(0) : acc_exp(scaled_logit - lk);
}

// Threads per block of the simple per-element kernels.
constexpr int kThreads = 256;
// Dynamic shared memory a block may take without an opt-in.
constexpr int64_t kSmemBudget = 48 * 1024;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of kThreads for `threads` threads (a 1-D grid).
inline unsigned blocks_for(int64_t threads) {
  const int64_t n = cdiv(threads, kThreads);
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "fastctx: too many elements for one launch (",
              threads, ")");
  return static_cast<unsigned>(n);
}

// How many pixel groups a reduction over the pixels splits into (each group's blocks write
// partials, then sum_groups_kernel adds them in group order: deterministic, no atomics): about 4
// blocks per multiprocessor for `blocks_per_group` blocks a group, each group at least
// `min_steps` of the `steps` pixel steps, and the partials (`partial_bytes` a group) at most
// 16 MiB, written and read back once (that stays in L2).
inline int64_t pixel_groups(int64_t blocks_per_group, int64_t steps, int64_t min_steps,
                            int64_t partial_bytes, int64_t sms) {
  int64_t G = cdiv(4 * sms, blocks_per_group);
  G = std::min(G, std::max<int64_t>(1, steps / min_steps));
  return std::min(G, std::max<int64_t>(1, (int64_t(16) << 20) / std::max<int64_t>(1, partial_bytes)));
}

// One thread per output element, B * CK of them: out[b, r] = alpha * (sum over g (in order) of
// part[b, g, r]), converted to out_t.
template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
    sum_groups_kernel(const acc_t* __restrict__ part, out_t* __restrict__ out, int64_t B,
                      int64_t G, int64_t CK, acc_t alpha) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= B * CK) return;
  const int64_t b = i / CK, r = i - b * CK;
  const acc_t* p = part + b * G * CK + r;
  acc_t s = 0;
  for (int64_t g = 0; g < G; ++g) s += p[g * CK];
  out[i] = static_cast<out_t>(alpha * s);
}

// D[b, n] = <dout[b, :, n], out[b, :, n]> over C channels, one thread per pixel (a grid-stride
// loop over the B * N pixels, any 1-D launch).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    pixel_dot_kernel(const scalar_t* __restrict__ dout, const scalar_t* __restrict__ out,
                     acc_t* __restrict__ delta, int64_t B, int64_t C, int64_t N) {
  const int64_t n = B * N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < n;
       p += stride) {
    const int64_t b = p / N;
    const int64_t off = b * C * N + (p - b * N);
    acc_t d = acc_t(0);
    for (int64_t c = 0; c < C; ++c)
      d += static_cast<acc_t>(dout[off + c * N]) * static_cast<acc_t>(out[off + c * N]);
    delta[p] = d;
  }
}

// One thread per (image, k), B * K of them: out[b, k] = sum over c (in order) of
// x[b, c, k] * y[b, c, k] (the backward's <dR[:, k], R[:, k]> of the pooling ops).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    channel_dot_kernel(const acc_t* __restrict__ x, const acc_t* __restrict__ y,
                       acc_t* __restrict__ out, int64_t B, int64_t C, int64_t K) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= B * K) return;
  const int64_t b = i / K, k = i - b * K;
  const int64_t base = b * C * K + k;
  acc_t s = 0;
  for (int64_t c = 0; c < C; ++c) s += x[base + c * K] * y[base + c * K];
  out[i] = s;
}

// The per-pixel streaming loops of the pooling and attention backwards: a thread owns pixel n
// and J (or CR) outputs in registers; a block-wide operand is staged in shared memory `ST` rows
// at a time. Every thread of the block calls them (they hold barriers); `live` threads (n < N)
// compute.
//
// acc[j] += sum over c < C (in order) of x[c * N] * m[c * S + j], j < sn: x points at the thread's
// pixel of channel 0, m at column 0 of a [C, S] operand (ms: [ST][J] shared).
template <int J, int ST, typename acc_t, typename xt, typename mt>
__device__ __forceinline__ void stream_dots(const xt* __restrict__ x, const mt* __restrict__ m,
                                            int64_t C, int64_t S, int64_t N, int sn, bool live,
                                            acc_t (*ms)[J], acc_t (&acc)[J]) {
  const int t = threadIdx.x;
  for (int64_t c0 = 0; c0 < C; c0 += ST) {
    const int cn = static_cast<int>(C - c0 < ST ? C - c0 : ST);
    __syncthreads();  // the previous stage's reads are done
    for (int i = t; i < ST * J; i += blockDim.x) {
      const int cc = i / J, j = i - cc * J;
      ms[cc][j] = (cc < cn && j < sn) ? static_cast<acc_t>(m[(c0 + cc) * S + j]) : acc_t(0);
    }
    __syncthreads();
    if (live) {
      for (int cc = 0; cc < cn; ++cc) {
        const acc_t xv = static_cast<acc_t>(x[(c0 + cc) * N]);
#pragma unroll
        for (int j = 0; j < J; ++j) acc[j] += xv * ms[cc][j];
      }
    }
  }
}

// acc[i] += sum over s < S (in order) of a(s) * w[i * S + s], i < cn: w points at row 0 of a
// [cn, S] operand, a(s) is the thread's weight of column s (ws: [ST][CR] shared).
template <int CR, int ST, typename acc_t, typename wt, typename A>
__device__ __forceinline__ void stream_mix(const wt* __restrict__ w, int64_t S, int cn, bool live,
                                           const A& a, acc_t (*ws)[CR], acc_t (&acc)[CR]) {
  const int t = threadIdx.x;
  for (int64_t s0 = 0; s0 < S; s0 += ST) {
    const int sn = static_cast<int>(S - s0 < ST ? S - s0 : ST);
    __syncthreads();
    for (int i = t; i < ST * CR; i += blockDim.x) {
      const int j = i / CR, ci = i - j * CR;
      ws[j][ci] = (j < sn && ci < cn) ? static_cast<acc_t>(w[ci * S + s0 + j]) : acc_t(0);
    }
    __syncthreads();
    if (live) {
      for (int j = 0; j < sn; ++j) {
        const acc_t av = a(s0 + j);
#pragma unroll
        for (int i = 0; i < CR; ++i) acc[i] += av * ws[j][i];
      }
    }
  }
}

}  // namespace gpu
}  // namespace fastctx
