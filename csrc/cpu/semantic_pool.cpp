// Semantic pooling (ISNet's per-class pooling), CPU: launchers and the CPU registration of the ops
// fastctx::sp_fwd, sp_bwd, sp_gather and sp_scatter (schemas: csrc/ops/semantic_pool.cpp). The
// per-task kernels are in semantic_pool_kernels.h.
//
// Inputs are made contiguous in the compute dtype (float32 for float16 / bfloat16 / float32,
// float64 for float64) by prepare(): a no-op for NCHW float32 / float64 input. Channels-last
// feats, logits (and dpooled) of the compute dtype are read in place (prepare_or_nhwc). Accumulation is in
// the compute dtype.
//
// Forward, per image (a segmented reduction over the pixels, keyed by each pixel's class):
//   A. per block of kPix pixels: labels (argmax over K), the winning logit, and the block's
//      per-class maximum of it;          then the per-class maximum m over the blocks (exact);
//   B. per block: e = exp(best - m[label]) and the block's per-class sums of e and pixel counts;
//      then Z and counts, summed over the blocks in block order;
//   C. per block: w = e / Z[label] (0 where Z = 0: a class whose logits are -inf at all its
//      pixels; m is taken as 0 there, so e = exp(-inf) = 0 and nothing is NaN);
//   D. per image and kRows channels: regions = the segmented sum of w * feats (one pass over the
//      pixels in order).
// Blocks and tasks do not depend on the number of threads and every sum runs in a fixed order:
// outputs are bit-identical run to run and for any thread count. No Python loop, no host sync,
// and the work is O(B * (C + K) * N) whatever K is.
//
// Backward (w_n = softmax weight of pixel n in its class c, r_c = sum w f, dr = dL/dregions):
//   dfeats_n = w_n dr_c;  dlogits[c, n] = w_n (<dr_c, f_n> - <dr_c, r_c>) at the pixel's own class,
//   0 at the others (the argmax is piecewise constant). Per block of pixels, no reduction over
//   pixels: deterministic.
//
// sp_gather writes pooled[b, :, n] = regions[b, :, labels[b, n]]; sp_scatter, its adjoint, is
// the segmented sum of D without weights. Labels are checked to lie in [0, K).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../ops/semantic_pool.h"
#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#define FASTCTX_SP_ISA isa_base
#include "semantic_pool_kernels.h"
#undef FASTCTX_SP_ISA

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define FASTCTX_SP_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FASTCTX_SP_ISA isa_avx2
#include "semantic_pool_kernels.h"
#undef FASTCTX_SP_ISA
#pragma GCC pop_options
#endif

namespace fastctx {
namespace sp_cpu {
namespace {

#define SP_OP "fastctx.semantic_pool"

using cpu::prepare;
using cpu::prepare_or_nhwc;
using cpu::use_avx2;

constexpr int64_t kPix = 1024;  // forward: pixels per block of phases A-C
constexpr int64_t kPixB = 256;  // backward: pixels per block
constexpr int64_t kMinWork = int64_t(1) << 16;  // element operations per parallel chunk, at least

// Items per parallel chunk for items of `work` element operations each: small calls run on one
// thread (a fork-join costs more than they do, and much more on a loaded machine).
int64_t grain(int64_t work) { return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work)); }

template <class T>
void argmax_block(const T* lg, int64_t N, int64_t K, int64_t np, T* best, int64_t* lab) {
#ifdef FASTCTX_SP_HAVE_AVX2
  if (use_avx2()) return isa_avx2::argmax_block<T>(lg, N, K, np, best, lab);
#endif
  isa_base::argmax_block<T>(lg, N, K, np, best, lab);
}

template <class T>
void argmax_block_nhwc(const T* lg, int64_t K, int64_t np, T* best, int64_t* lab) {
#ifdef FASTCTX_SP_HAVE_AVX2
  if (use_avx2()) return isa_avx2::argmax_block_nhwc<T>(lg, K, np, best, lab);
#endif
  isa_base::argmax_block_nhwc<T>(lg, K, np, best, lab);
}

template <bool HAS_W, class T>
void segsum_rows(const T* x, bool nhwc, int64_t C, const int64_t* lab, const T* w, int64_t N,
                 int64_t K, int64_t rows, T* acc, T* pack, T* out) {
#ifdef FASTCTX_SP_HAVE_AVX2
  if (use_avx2())
    return isa_avx2::segsum_rows<HAS_W, T>(x, nhwc, C, lab, w, N, K, rows, acc, pack, out);
#endif
  isa_base::segsum_rows<HAS_W, T>(x, nhwc, C, lab, w, N, K, rows, acc, pack, out);
}

template <class T>
void bwd_block(const T* f, const T* dr, const T* drr, const int64_t* lab, const T* w, int64_t N,
               int64_t C, int64_t K, int64_t np, T* dot, T* df, T* dl) {
#ifdef FASTCTX_SP_HAVE_AVX2
  if (use_avx2()) return isa_avx2::bwd_block<T>(f, dr, drr, lab, w, N, C, K, np, dot, df, dl);
#endif
  isa_base::bwd_block<T>(f, dr, drr, lab, w, N, C, K, np, dot, df, dl);
}

template <class T>
void bwd_block_nhwc(const T* f, const T* dr, const T* drT, const T* drr, const int64_t* lab,
                    const T* w, int64_t N, int64_t C, int64_t K, int64_t np, T* dot, T* df,
                    T* dl) {
#ifdef FASTCTX_SP_HAVE_AVX2
  if (use_avx2())
    return isa_avx2::bwd_block_nhwc<T>(f, dr, drT, drr, lab, w, N, C, K, np, dot, df, dl);
#endif
  isa_base::bwd_block_nhwc<T>(f, dr, drT, drr, lab, w, N, C, K, np, dot, df, dl);
}

void check_label_range(const int64_t* lab, int64_t n, int64_t K, const char* op) {
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<uint64_t>(lab[i]) >= static_cast<uint64_t>(K);
  TORCH_CHECK(!bad, SP_OP " (", op, "): labels must lie in [0, K) with K = ", K);
}

// Runs fn(i, scratch) for i in [0, n) in parallel (items of `work` element operations each),
// scratch: `elems` values of T per chunk.
template <class T, class Fn>
void parallel_items(int64_t n, int64_t work, int64_t elems, const Fn& fn) {
  at::parallel_for(0, n, grain(work), [&](int64_t i0, int64_t i1) {
    std::vector<T> scratch(static_cast<size_t>(std::max<int64_t>(elems, 1)));
    for (int64_t i = i0; i < i1; ++i) fn(i, scratch.data());
  });
}

// The segmented sum of D (w may be null: weights 1): out [B, C, K] from x [B, C, N] (nhwc:
// [B, N, C]).
template <class T>
void segsum(const T* x, bool nhwc, const int64_t* lab, const T* w, int64_t B, int64_t C,
            int64_t N, int64_t K, T* out) {
  const int64_t tiles = (C + kRows - 1) / kRows;
  parallel_items<T>(B * tiles, kRows * N, K * kRows + kPack * kRows, [&](int64_t i, T* s) {
    const int64_t b = i / tiles, c0 = (i % tiles) * kRows, rows = std::min(kRows, C - c0);
    const T* xb = nhwc ? x + b * N * C + c0 : x + (b * C + c0) * N;
    const int64_t* lb = lab + b * N;
    T* ob = out + (b * C + c0) * K;
    if (w != nullptr)
      segsum_rows<true, T>(xb, nhwc, C, lb, w + b * N, N, K, rows, s, s + K * kRows, ob);
    else
      segsum_rows<false, T>(xb, nhwc, C, lb, nullptr, N, K, rows, s, s + K * kRows, ob);
  });
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sp_fwd_cpu(const at::Tensor& feats_in,
                                                                      const at::Tensor& logits_in) {
  sp_checks::fwd(at::kCPU, feats_in, logits_in);
  const int64_t B = feats_in.size(0), C = feats_in.size(1), H = feats_in.size(2),
                W = feats_in.size(3), K = logits_in.size(1), N = H * W;
  const at::ScalarType ct = acc_dtype(feats_in.scalar_type());
  const auto copts = feats_in.options().dtype(ct), lopts = feats_in.options().dtype(at::kLong);
  at::Tensor regions = at::zeros({B, C, K}, copts), counts = at::zeros({B, K}, lopts);
  at::Tensor labels = at::empty({B, H, W}, lopts), w = at::empty({B, H, W}, copts);
  if (B == 0 || N == 0) return {regions, counts, labels, w};

  bool f_nhwc = false, l_nhwc = false;
  const at::Tensor f = prepare_or_nhwc(feats_in, ct, f_nhwc), l = prepare_or_nhwc(logits_in, ct, l_nhwc);
  const int64_t nb = (N + kPix - 1) / kPix;
  at::Tensor best_t = at::empty({B, N}, copts), part_t = at::empty({B, nb, K}, copts);
  at::Tensor pcnt_t = at::empty({B, nb, K}, lopts), m_t = at::empty({B, K}, copts),
             z_t = at::empty({B, K}, copts);

  AT_DISPATCH_FLOATING_TYPES(ct, "sp_fwd_cpu", [&] {
    using T = scalar_t;
    const T* F = f.const_data_ptr<T>();
    const T* L = l.const_data_ptr<T>();
    T* best = best_t.mutable_data_ptr<T>();
    T* part = part_t.mutable_data_ptr<T>();
    T* Wt = w.mutable_data_ptr<T>();
    T* M = m_t.mutable_data_ptr<T>();
    T* Z = z_t.mutable_data_ptr<T>();
    int64_t* lab = labels.mutable_data_ptr<int64_t>();
    int64_t* pcnt = pcnt_t.mutable_data_ptr<int64_t>();
    int64_t* cnt = counts.mutable_data_ptr<int64_t>();
    constexpr T kNegInf = -std::numeric_limits<T>::infinity();

    // A: labels, winning logits, per-block per-class maxima
    at::parallel_for(0, B * nb, grain(kPix * K), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / nb, n0 = (i % nb) * kPix, np = std::min(kPix, N - n0);
        T* bst = best + b * N + n0;
        int64_t* lb = lab + b * N + n0;
        if (l_nhwc)
          argmax_block_nhwc<T>(L + (b * N + n0) * K, K, np, bst, lb);
        else
          argmax_block<T>(L + b * K * N + n0, N, K, np, bst, lb);
        T* pm = part + i * K;
        std::fill(pm, pm + K, kNegInf);
        for (int64_t j = 0; j < np; ++j) pm[lb[j]] = std::max(pm[lb[j]], bst[j]);
      }
    });
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < K; ++k) {
        T mx = kNegInf;
        for (int64_t blk = 0; blk < nb; ++blk) mx = std::max(mx, part[(b * nb + blk) * K + k]);
        M[b * K + k] = mx == kNegInf ? T(0) : mx;  // no pixel is finite: exp(-inf - 0) = 0
      }
    // B: e = exp(best - m), per-block per-class sums of e and counts
    at::parallel_for(0, B * nb, grain(kPix * 4), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / nb, n0 = (i % nb) * kPix, np = std::min(kPix, N - n0);
        const T* bst = best + b * N + n0;
        const int64_t* lb = lab + b * N + n0;
        const T* mb = M + b * K;
        T* e = Wt + b * N + n0;
        T* pz = part + i * K;
        int64_t* pc = pcnt + i * K;
        std::fill(pz, pz + K, T(0));
        std::fill(pc, pc + K, int64_t(0));
        for (int64_t j = 0; j < np; ++j) {
          e[j] = std::exp(bst[j] - mb[lb[j]]);
          pz[lb[j]] += e[j];
          pc[lb[j]] += 1;
        }
      }
    });
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < K; ++k) {
        T z = 0;
        int64_t c = 0;
        for (int64_t blk = 0; blk < nb; ++blk) {  // block order: deterministic
          z += part[(b * nb + blk) * K + k];
          c += pcnt[(b * nb + blk) * K + k];
        }
        Z[b * K + k] = z;
        cnt[b * K + k] = c;
      }
    // C: w = e / Z (0 where Z = 0)
    at::parallel_for(0, B * nb, grain(kPix * 4), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / nb, n0 = (i % nb) * kPix, np = std::min(kPix, N - n0);
        const int64_t* lb = lab + b * N + n0;
        const T* zb = Z + b * K;
        T* e = Wt + b * N + n0;
        for (int64_t j = 0; j < np; ++j) {
          const T z = zb[lb[j]];
          e[j] = z > T(0) ? e[j] / z : T(0);
        }
      }
    });
    // D: regions = segmented sum of w * feats
    segsum<T>(F, f_nhwc, lab, Wt, B, C, N, K, regions.mutable_data_ptr<T>());
  });
  return {regions, counts, labels, w};
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> sp_bwd_cpu(const at::Tensor& dregions_in,
                                              const at::Tensor& feats_in,
                                              const at::Tensor& labels_in, const at::Tensor& w_in,
                                              const at::Tensor& regions_in) {
  sp_checks::bwd(at::kCPU, dregions_in, feats_in, labels_in, w_in, regions_in);
  const int64_t B = feats_in.size(0), C = feats_in.size(1), H = feats_in.size(2),
                W = feats_in.size(3), K = regions_in.size(2), N = H * W;
  const at::ScalarType dt = feats_in.scalar_type(), ct = acc_dtype(dt);
  const auto copts = feats_in.options().dtype(ct);
  at::Tensor dfeats = cpu::empty_output({B, C, H, W}, feats_in.options());
  at::Tensor dlogits = cpu::empty_output({B, K, H, W}, feats_in.options());
  if (B == 0 || N == 0) return {dfeats, dlogits};

  bool f_nhwc = false;
  const at::Tensor f = prepare_or_nhwc(feats_in, ct, f_nhwc), dr = prepare(dregions_in, ct),
                   rg = prepare(regions_in, ct), wc = prepare(w_in, ct),
                   lab = labels_in.contiguous();
  check_label_range(lab.const_data_ptr<int64_t>(), B * N, K, "sp_bwd");
  at::Tensor df_c = ct == dt ? dfeats : cpu::empty_output({B, C, H, W}, copts);
  at::Tensor dl_c = ct == dt ? dlogits : cpu::empty_output({B, K, H, W}, copts);
  at::Tensor drr_t = at::empty({B, K}, copts);
  at::Tensor drT_t = f_nhwc ? dr.transpose(1, 2).contiguous() : at::Tensor();  // [B, K, C]

  AT_DISPATCH_FLOATING_TYPES(ct, "sp_bwd_cpu", [&] {
    using T = scalar_t;
    const T* DR = dr.const_data_ptr<T>();
    const T* RG = rg.const_data_ptr<T>();
    T* drr = drr_t.mutable_data_ptr<T>();
    for (int64_t b = 0; b < B; ++b)  // drr[b, k] = <dr[b, :, k], regions[b, :, k]>, c in order
      for (int64_t k = 0; k < K; ++k) {
        T s = 0;
        for (int64_t c = 0; c < C; ++c) s += DR[(b * C + c) * K + k] * RG[(b * C + c) * K + k];
        drr[b * K + k] = s;
      }
    const T* F = f.const_data_ptr<T>();
    const T* Wt = wc.const_data_ptr<T>();
    const int64_t* LAB = lab.const_data_ptr<int64_t>();
    T* DF = df_c.mutable_data_ptr<T>();
    T* DL = dl_c.mutable_data_ptr<T>();
    const int64_t nb = (N + kPixB - 1) / kPixB;
    const T* DRT = f_nhwc ? drT_t.const_data_ptr<T>() : nullptr;
    parallel_items<T>(B * nb, kPixB * (C + K), kPixB, [&](int64_t i, T* dot) {
      const int64_t b = i / nb, n0 = (i % nb) * kPixB, np = std::min(kPixB, N - n0);
      if (f_nhwc)
        bwd_block_nhwc<T>(F + (b * N + n0) * C, DR + b * C * K, DRT + b * K * C, drr + b * K,
                          LAB + b * N + n0, Wt + b * N + n0, N, C, K, np, dot,
                          DF + b * C * N + n0, DL + b * K * N + n0);
      else
        bwd_block<T>(F + b * C * N + n0, DR + b * C * K, drr + b * K, LAB + b * N + n0,
                     Wt + b * N + n0, N, C, K, np, dot, DF + b * C * N + n0, DL + b * K * N + n0);
    });
  });
  if (ct != dt) {
    dfeats.copy_(df_c);
    dlogits.copy_(dl_c);
  }
  return {dfeats, dlogits};
}

// ---------------------------------------------------------------------------------------------
at::Tensor sp_gather_cpu(const at::Tensor& regions_in, const at::Tensor& labels_in,
                         at::ScalarType dtype) {
  sp_checks::gather(at::kCPU, regions_in, labels_in, dtype);
  const int64_t B = regions_in.size(0), C = regions_in.size(1), K = regions_in.size(2);
  const int64_t H = labels_in.size(1), W = labels_in.size(2), N = H * W;
  at::Tensor out = cpu::empty_output({B, C, H, W}, regions_in.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const at::Tensor r = prepare(regions_in, dtype), lab = labels_in.contiguous();
  const int64_t* LAB = lab.const_data_ptr<int64_t>();
  check_label_range(LAB, B * N, K, "sp_gather");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sp_gather_cpu", [&] {
    const scalar_t* R = r.const_data_ptr<scalar_t>();
    scalar_t* O = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * C, grain(N), [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        const scalar_t* src = R + row * K;
        const int64_t* lb = LAB + (row / C) * N;
        scalar_t* dst = O + row * N;
        for (int64_t n = 0; n < N; ++n) dst[n] = src[lb[n]];
      }
    });
  });
  return out;
}

at::Tensor sp_scatter_cpu(const at::Tensor& dpooled_in, const at::Tensor& labels_in, int64_t K) {
  sp_checks::scatter(at::kCPU, dpooled_in, labels_in, K);
  const int64_t B = dpooled_in.size(0), C = dpooled_in.size(1),
                N = dpooled_in.size(2) * dpooled_in.size(3);
  const at::ScalarType ct = acc_dtype(dpooled_in.scalar_type());
  at::Tensor out = at::zeros({B, C, K}, dpooled_in.options().dtype(ct));
  if (B == 0 || C == 0 || N == 0) return out;
  bool nhwc = false;
  const at::Tensor x = prepare_or_nhwc(dpooled_in, ct, nhwc), lab = labels_in.contiguous();
  const int64_t* LAB = lab.const_data_ptr<int64_t>();
  check_label_range(LAB, B * N, K, "sp_scatter");
  AT_DISPATCH_FLOATING_TYPES(ct, "sp_scatter_cpu", [&] {
    using T = scalar_t;
    segsum<T>(x.const_data_ptr<T>(), nhwc, LAB, nullptr, B, C, N, K, out.mutable_data_ptr<T>());
  });
  return out;
}

}  // namespace
}  // namespace sp_cpu
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CPU, m) {
  m.impl("sp_fwd", &fastctx::sp_cpu::sp_fwd_cpu);
  m.impl("sp_bwd", &fastctx::sp_cpu::sp_bwd_cpu);
  m.impl("sp_gather", &fastctx::sp_cpu::sp_gather_cpu);
  m.impl("sp_scatter", &fastctx::sp_cpu::sp_scatter_cpu);
}
