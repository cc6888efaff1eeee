// Spatial gather (OCR's soft region pooling), CPU: launchers and the CPU registration of the ops
// fastctx::sg_fwd and fastctx::sg_bwd (schemas: csrc/ops/spatial_gather.cpp). The per-task
// kernels and their design notes are in spatial_gather_kernels.h.
//
// Inputs are made contiguous in the compute dtype by prepare(): a no-op for NCHW float32 /
// float64 input; other strided inputs, and float16 / bfloat16 inputs (upcast to float32), are
// copied once. Channels-last float32 / float64 feats and logits are not copied: the kernels
// transpose them block by block (prepare_or_nhwc, vec.h's pack_nhwc). Outputs are contiguous in
// the input dtype; lse is float32 (float64 for float64 inputs). Accumulation is float32 for
// float16 / bfloat16 / float32 and float64 for float64. No tensor of size B x K x N is
// allocated besides the dlogits output.
//
// Forward: tasks (image, pixel chunk), chunks fixed by N alone, each writing its own partial
// (regions, running max, running sum); the partials of an image are merged in chunk order.
// Backward: tasks (image, pixel block), independent (no sums over pixels). Both are
// bit-identical run to run and for any thread count.
//
// Parallelism: at::parallel_for, one worker per thread, claiming items from a shared counter.
// Vector code: the kernels are compiled for the baseline target and (x86-64 with GCC) for
// AVX2 + FMA and (64-byte vectors, FASTCTX_*_VEC_BYTES) for AVX-512; the launcher takes the
// AVX-512 build where the CPU has AVX-512F/DQ/BW/VL (cpu::use_avx512; FASTCTX_CPU_AVX512=0 turns
// it off): on an Intel Xeon with AVX-512 (session 19) the AVX2 build lost to the reference, whose
// products run on AVX-512 (0.67-0.96x at 64x128), the AVX-512 build won (1.14-2.17x).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../ops/spatial_gather.h"
#include "common.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>

#define FASTCTX_SG_VEC_BYTES 32
#define FASTCTX_SG_ISA isa_base
#include "spatial_gather_kernels.h"
#undef FASTCTX_SG_ISA

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define FASTCTX_SG_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FASTCTX_SG_ISA isa_avx2
#include "spatial_gather_kernels.h"
#undef FASTCTX_SG_ISA
#pragma GCC pop_options
#undef FASTCTX_SG_VEC_BYTES

#define FASTCTX_SG_HAVE_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#define FASTCTX_SG_VEC_BYTES 64
#define FASTCTX_SG_ISA isa_avx512
#include "spatial_gather_kernels.h"
#undef FASTCTX_SG_ISA
#undef FASTCTX_SG_VEC_BYTES
#pragma GCC pop_options
#endif

namespace fastctx {
namespace sg_cpu {
namespace {

using cpu::prepare;
using cpu::use_avx2;

template <class T>
void fwd_task(const FwdArgs<T>& a, const Geom& g, int64_t b, int64_t c, T* scratch, T* part) {
#ifdef FASTCTX_SG_HAVE_AVX512
  if (g.vbytes == 64) return isa_avx512::fwd_task<T>(a, g, b, c, scratch, part);
#endif
#ifdef FASTCTX_SG_HAVE_AVX2
  if (use_avx2()) return isa_avx2::fwd_task<T>(a, g, b, c, scratch, part);
#endif
  isa_base::fwd_task<T>(a, g, b, c, scratch, part);
}

template <class T>
void bwd_block(const BwdArgs<T>& a, const Geom& g, int64_t b, int64_t t, T* scratch) {
#ifdef FASTCTX_SG_HAVE_AVX512
  if (g.vbytes == 64) return isa_avx512::bwd_block<T>(a, g, b, t, scratch);
#endif
#ifdef FASTCTX_SG_HAVE_AVX2
  if (use_avx2()) return isa_avx2::bwd_block<T>(a, g, b, t, scratch);
#endif
  isa_base::bwd_block<T>(a, g, b, t, scratch);
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> sg_fwd_cpu(const at::Tensor& feats_in,
                                              const at::Tensor& logits_in, double scale) {
  sg_checks::inputs(at::kCPU, feats_in, logits_in, scale, "sg_fwd");
  const int64_t B = feats_in.size(0), C = feats_in.size(1), K = logits_in.size(1);
  const int64_t N = feats_in.size(2) * feats_in.size(3);
  const at::ScalarType dt = feats_in.scalar_type(), ct = acc_dtype(dt);
  const auto copts = feats_in.options().dtype(ct);
  auto lse = at::empty({B, K}, copts);
  auto out = at::empty({B, C, K}, feats_in.options());

  bool f_nhwc = false, l_nhwc = false;
  const at::Tensor f = cpu::prepare_or_nhwc(feats_in, ct, f_nhwc);
  const at::Tensor l = cpu::prepare_or_nhwc(logits_in, ct, l_nhwc);
  at::Tensor out_c = ct == dt ? out : at::empty({B, C, K}, copts);

  AT_DISPATCH_FLOATING_TYPES(ct, "sg_fwd_cpu", [&] {
    using T = scalar_t;
    const Geom g = make_geom<T>(N, K, cpu::vec_bytes());
    const FwdArgs<T> a{f.const_data_ptr<T>(), l.const_data_ptr<T>(), C, K, N,
                       static_cast<T>(scale), f_nhwc, l_nhwc};
    const int64_t ntask = B * g.nchunk, psize = fwd_partial(g, C), Kp = g.Kp;
    at::Tensor part_t = at::empty({ntask, psize}, copts);
    T* part = part_t.mutable_data_ptr<T>();
    cpu::for_each_item<T>(ntask, fwd_scratch(g, C, K, f_nhwc, l_nhwc), [&](int64_t i, T* s) {
      fwd_task<T>(a, g, i / g.nchunk, i % g.nchunk, s, part + i * psize);
    });

    // Merge the chunks of each image, in chunk order: coef[b][c][k] = exp(M_c - M) / L.
    const T ninf = -std::numeric_limits<T>::infinity();
    at::Tensor coef_t = at::empty({ntask, K}, copts);
    T* coef = coef_t.mutable_data_ptr<T>();
    T* LSE = lse.mutable_data_ptr<T>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < K; ++k) {
        T m = ninf;
        for (int64_t c = 0; c < g.nchunk; ++c)
          m = std::max(m, part[(b * g.nchunk + c) * psize + (C * Kp) + k]);
        if (m == ninf) {  // every logit of the class is -inf: zero region
          for (int64_t c = 0; c < g.nchunk; ++c) coef[(b * g.nchunk + c) * K + k] = T(0);
          LSE[b * K + k] = ninf;
          continue;
        }
        T sum = T(0);
        for (int64_t c = 0; c < g.nchunk; ++c) {
          const T* p = part + (b * g.nchunk + c) * psize + C * Kp;
          sum += p[Kp + k] * std::exp(p[k] - m);  // (a chunk with M_c = -inf adds 0)
        }
        for (int64_t c = 0; c < g.nchunk; ++c) {
          const T* p = part + (b * g.nchunk + c) * psize + C * Kp;
          coef[(b * g.nchunk + c) * K + k] = std::exp(p[k] - m) / sum;
        }
        LSE[b * K + k] = m + std::log(sum);  // sum >= 1: the maximum contributes exp(0)
      }
    T* O = out_c.mutable_data_ptr<T>();
    at::parallel_for(0, B * C, std::max<int64_t>(1, 4096 / (K * g.nchunk)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / C, ch = r % C;
        T* o = O + r * K;
        for (int64_t k = 0; k < K; ++k) o[k] = T(0);
        for (int64_t c = 0; c < g.nchunk; ++c) {
          const T* src = part + (b * g.nchunk + c) * psize + ch * Kp;
          const T* cf = coef + (b * g.nchunk + c) * K;
          for (int64_t k = 0; k < K; ++k) o[k] += src[k] * cf[k];
        }
      }
    });
  });
  if (ct != dt) out.copy_(out_c);
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> sg_bwd_cpu(const at::Tensor& dout_in,
                                              const at::Tensor& feats_in,
                                              const at::Tensor& logits_in,
                                              const at::Tensor& out_in, const at::Tensor& lse_in,
                                              double scale) {
  sg_checks::bwd(at::kCPU, dout_in, feats_in, logits_in, out_in, lse_in, scale);
  const int64_t B = feats_in.size(0), C = feats_in.size(1), K = logits_in.size(1);
  const int64_t N = feats_in.size(2) * feats_in.size(3);
  const at::ScalarType dt = feats_in.scalar_type(), ct = acc_dtype(dt);

  const auto copts = feats_in.options().dtype(ct);
  auto dfeats = cpu::empty_output(feats_in.sizes(), feats_in.options());
  auto dlogits = cpu::empty_output(logits_in.sizes(), logits_in.options());

  bool f_nhwc = false, l_nhwc = false;
  const at::Tensor f = cpu::prepare_or_nhwc(feats_in, ct, f_nhwc);
  const at::Tensor l = cpu::prepare_or_nhwc(logits_in, ct, l_nhwc);
  const at::Tensor dR = prepare(dout_in, ct), R = prepare(out_in, ct), lse = lse_in.contiguous();
  const at::Tensor dRT = dR.transpose(1, 2).contiguous();
  at::Tensor df_c = ct == dt ? dfeats : cpu::empty_output(feats_in.sizes(), copts);
  at::Tensor dl_c = ct == dt ? dlogits : cpu::empty_output(logits_in.sizes(), copts);
  // (the outputs are allocated contiguous: at::empty with sizes only)

  AT_DISPATCH_FLOATING_TYPES(ct, "sg_bwd_cpu", [&] {
    using T = scalar_t;
    const Geom g = make_geom<T>(N, K, cpu::vec_bytes());
    // D[b][k] = sum_c dR[b][c][k] * R[b][c][k], in channel order.
    at::Tensor D_t = at::empty({B, K}, copts);
    T* Dp = D_t.mutable_data_ptr<T>();
    const T* dRp = dR.const_data_ptr<T>();
    const T* Rp = R.const_data_ptr<T>();
    for (int64_t b = 0; b < B; ++b) {
      T* d = Dp + b * K;
      for (int64_t k = 0; k < K; ++k) d[k] = T(0);
      for (int64_t c = 0; c < C; ++c)
        for (int64_t k = 0; k < K; ++k) d[k] += dRp[(b * C + c) * K + k] * Rp[(b * C + c) * K + k];
    }
    const BwdArgs<T> a{f.const_data_ptr<T>(),   l.const_data_ptr<T>(),   dRp,
                       dRT.const_data_ptr<T>(), lse.const_data_ptr<T>(), Dp,
                       df_c.mutable_data_ptr<T>(), dl_c.mutable_data_ptr<T>(),
                       C, K, N, static_cast<T>(scale), f_nhwc, l_nhwc};
    cpu::for_each_item<T>(B * g.nblocks, bwd_scratch(g, C, K, l_nhwc), [&](int64_t u, T* s) {
      bwd_block<T>(a, g, u / g.nblocks, u % g.nblocks, s);
    });
  });
  if (ct != dt) {
    dfeats.copy_(df_c);
    dlogits.copy_(dl_c);
  }
  return {dfeats, dlogits};
}

}  // namespace
}  // namespace sg_cpu
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CPU, m) {
  m.impl("sg_fwd", &fastctx::sg_cpu::sg_fwd_cpu);
  m.impl("sg_bwd", &fastctx::sg_cpu::sg_bwd_cpu);
}
