// Region attention (OCR's object attention, ANN's pyramid keys, ISNet's classes), CPU: launchers
// and the CPU registration of the ops fastctx::ra_fwd and fastctx::ra_bwd (schemas:
// csrc/ops/region_attention.cpp). The per-block kernels and their design notes are in
// region_attention_kernels.h.
//
// Inputs are made contiguous in the compute dtype by prepare(): that copy is the only copy of the
// big operands (q, dout), and a no-op for NCHW float32 / float64 input (other strided inputs,
// and float16 / bfloat16 inputs, which are upcast to float32, are copied once). A channels-last
// float32 / float64 q or dout is not copied: the kernels transpose it block by block
// (prepare_or_nhwc, pack_map). k and v ([B, C, S], small) are also packed transposed once.
// Outputs are contiguous in the input dtype; lse and p are float32 (float64 for float64 inputs).
// Accumulation is float32 for float16 / bfloat16 / float32 and float64 for float64. The only
// tensor of size B x S x N is p, the weights, which the forward writes when keep_p is set
// (fastctx sets it when the backward will run and there are enough keys: fastctx/ops/ocr.py
// RA_KEEP_MIN_KEYS) and the backward reads instead of recomputing them from lse; per-thread
// scratch holds one block of pixels x S.
//
// The backward takes D = <dout, out> as sum_s P dA (the same in exact arithmetic, and it needs no
// pass over out), so out is only checked; lse is read only when p is not given. Its reductions
// over pixels (dk, dv, dbias) are summed per task (a fixed range of pixel blocks of one image, the
// same for any number of threads) into partial buffers, then added in task order: deterministic,
// bit-identical run to run and for any thread count. Tasks run in waves of a few per thread, so
// only that many partial buffers exist at once.
//
// Parallelism: at::parallel_for, one worker per thread, claiming (image, pixel block) items in
// the forward and tasks in the backward from a shared counter.
//
// Vector code: the kernels are compiled for the baseline target and (x86-64 with GCC) for
// AVX2 + FMA and (64-byte vectors, FASTCTX_*_VEC_BYTES) for AVX-512; the launcher takes the
// AVX-512 build where the CPU has AVX-512F/DQ/BW/VL (cpu::use_avx512; FASTCTX_CPU_AVX512=0 turns
// it off): on an Intel Xeon with AVX-512 (session 19) the AVX2 build lost to the reference, whose
// products run on AVX-512 (0.67-0.96x at 64x128), the AVX-512 build won (1.14-2.17x).
// __builtin_cpu_supports decides at run time, so no -march flag is needed.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../ops/region_attention.h"
#include "common.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>

#define FASTCTX_RA_VEC_BYTES 32
#define FASTCTX_RA_ISA isa_base
#include "region_attention_kernels.h"
#undef FASTCTX_RA_ISA

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define FASTCTX_RA_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FASTCTX_RA_ISA isa_avx2
#include "region_attention_kernels.h"
#undef FASTCTX_RA_ISA
#pragma GCC pop_options
#undef FASTCTX_RA_VEC_BYTES

#define FASTCTX_RA_HAVE_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#define FASTCTX_RA_VEC_BYTES 64
#define FASTCTX_RA_ISA isa_avx512
#include "region_attention_kernels.h"
#undef FASTCTX_RA_ISA
#undef FASTCTX_RA_VEC_BYTES
#pragma GCC pop_options
#endif

namespace fastctx {
namespace ra_cpu {
namespace {

using cpu::prepare;
using cpu::use_avx2;

#define RA_OP "fastctx.region_attention"

constexpr int64_t kPartialBytes = int64_t(32) << 20;  // backward: partial sums of a wave, at most

template <class T>
void fwd_block(const FwdArgs<T>& a, const Geom& g, int64_t b, int64_t t, T* scratch) {
#ifdef FASTCTX_RA_HAVE_AVX512
  if (g.vbytes == 64) return isa_avx512::fwd_block<T>(a, g, b, t, scratch);
#endif
#ifdef FASTCTX_RA_HAVE_AVX2
  if (use_avx2()) return isa_avx2::fwd_block<T>(a, g, b, t, scratch);
#endif
  isa_base::fwd_block<T>(a, g, b, t, scratch);
}

template <class T>
void bwd_task(const BwdArgs<T>& a, const Geom& g, int64_t b, int64_t t0, int64_t t1, T* scratch,
              T* part) {
#ifdef FASTCTX_RA_HAVE_AVX512
  if (g.vbytes == 64) return isa_avx512::bwd_task<T>(a, g, b, t0, t1, scratch, part);
#endif
#ifdef FASTCTX_RA_HAVE_AVX2
  if (use_avx2()) return isa_avx2::bwd_task<T>(a, g, b, t0, t1, scratch, part);
#endif
  isa_base::bwd_task<T>(a, g, b, t0, t1, scratch, part);
}

// [B, C, S] -> [B, S, C] contiguous (small: no pixel axis).
at::Tensor transposed(const at::Tensor& t) { return t.transpose(1, 2).contiguous(); }

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> ra_fwd_cpu(const at::Tensor& q_in,
                                                          const at::Tensor& k_in,
                                                          const at::Tensor& v_in,
                                                          const at::Tensor& bias_in, double scale,
                                                          bool keep_p) {
  ra_checks::inputs(at::kCPU, q_in, k_in, v_in, bias_in, "ra_fwd");
  const int64_t B = q_in.size(0), Cqk = q_in.size(1), H = q_in.size(2), W = q_in.size(3);
  const int64_t S = k_in.size(2), Cv = v_in.size(1), N = H * W;
  const at::ScalarType dt = q_in.scalar_type(), ct = acc_dtype(dt);
  auto lse = at::empty({B, H, W}, q_in.options().dtype(ct));
  auto out = cpu::empty_output({B, Cv, H, W}, q_in.options());
  auto p = keep_p ? cpu::empty_output({B, S, N}, q_in.options().dtype(ct))
                  : at::empty({0}, q_in.options().dtype(ct));
  if (B == 0 || N == 0) return {out, lse, p};

  bool q_nhwc = false;
  const at::Tensor q = cpu::prepare_or_nhwc(q_in, ct, q_nhwc);
  const at::Tensor v = prepare(v_in, ct), bias = prepare(bias_in, ct);
  const at::Tensor kT = transposed(prepare(k_in, ct));
  at::Tensor out_c = ct == dt ? out : cpu::empty_output({B, Cv, H, W}, q_in.options().dtype(ct));

  AT_DISPATCH_FLOATING_TYPES(ct, "ra_fwd_cpu", [&] {
    using T = scalar_t;
    const Geom g = make_geom<T>(N, S, kNBW, cpu::vec_bytes());
    const FwdArgs<T> a{q.const_data_ptr<T>(),    kT.const_data_ptr<T>(),
                       v.const_data_ptr<T>(),    bias.const_data_ptr<T>(),
                       out_c.mutable_data_ptr<T>(), lse.mutable_data_ptr<T>(),
                       keep_p ? p.mutable_data_ptr<T>() : nullptr,
                       Cqk, Cv, S, N, static_cast<T>(scale), q_nhwc};
    const int64_t scratch = fwd_scratch(g, Cqk, S);
    cpu::for_each_item<T>(B * g.nblocks, scratch, [&](int64_t u, T* s) {
      fwd_block<T>(a, g, u / g.nblocks, u % g.nblocks, s);
    });
  });
  if (ct != dt) out.copy_(out_c);
  return {out, lse, p};
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ra_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& bias_in, const at::Tensor& out_in,
    const at::Tensor& lse_in, const at::Tensor& p_in, double scale) {
  ra_checks::inputs(at::kCPU, q_in, k_in, v_in, bias_in, "ra_bwd");
  ra_checks::outputs(at::kCPU, dout_in, out_in, q_in, v_in);
  const int64_t B = q_in.size(0), Cqk = q_in.size(1), H = q_in.size(2), W = q_in.size(3);
  const int64_t S = k_in.size(2), Cv = v_in.size(1), N = H * W;
  const at::ScalarType dt = q_in.scalar_type(), ct = acc_dtype(dt);
  // p: the weights the forward kept, or empty: then they are recomputed from lse.
  TORCH_CHECK(p_in.defined() && p_in.device() == q_in.device(),
              RA_OP " (ra_bwd): p must be a tensor on ", q_in.device());
  const bool have_p = p_in.numel() > 0 || (B * S * N == 0 && p_in.dim() == 3);
  if (have_p) {
    TORCH_CHECK(p_in.dim() == 3 && p_in.size(0) == B && p_in.size(1) == S && p_in.size(2) == N,
                RA_OP " (ra_bwd): p must be the weights that ra_fwd kept (keep_p=True), of shape "
                "[B, S, H*W] = [", B, ", ", S, ", ", N, "], or empty; got ", p_in.sizes());
    TORCH_CHECK(p_in.scalar_type() == ct, RA_OP " (ra_bwd): p must have dtype ", ct, " for ", dt,
                " inputs, got ", p_in.scalar_type());
  } else {
    TORCH_CHECK(lse_in.defined() && lse_in.device() == q_in.device() &&
                    lse_in.sizes() == at::IntArrayRef({B, H, W}) && lse_in.scalar_type() == ct,
                RA_OP " (ra_bwd): without kept weights p, lse must be the [B, H, W] = [", B, ", ",
                H, ", ", W, "] ", ct, " log-sum-exp of ra_fwd, got ",
                lse_in.defined() ? lse_in.sizes() : at::IntArrayRef{}, " ",
                lse_in.defined() ? lse_in.scalar_type() : ct);
  }

  const auto copts = q_in.options().dtype(ct);
  auto dq = cpu::empty_output({B, Cqk, H, W}, q_in.options());
  if (B == 0) {
    return {dq, at::empty({B, Cqk, S}, q_in.options()), at::empty({B, Cv, S}, q_in.options()),
            at::empty({B, S}, q_in.options())};
  }
  // Sums over the pixels, in the compute dtype (zero when there are no pixels).
  at::Tensor dk_c = at::zeros({B, Cqk, S}, copts), dv_c = at::zeros({B, Cv, S}, copts),
             db_c = at::zeros({B, S}, copts);
  if (N > 0) {
    bool q_nhwc = false, dout_nhwc = false;
    const at::Tensor q = cpu::prepare_or_nhwc(q_in, ct, q_nhwc), k = prepare(k_in, ct);
    const at::Tensor dout = cpu::prepare_or_nhwc(dout_in, ct, dout_nhwc);
    const at::Tensor vT = transposed(prepare(v_in, ct));
    const at::Tensor p = have_p ? p_in.contiguous() : at::Tensor();
    const at::Tensor kT = have_p ? at::Tensor() : transposed(k);
    const at::Tensor bias = have_p ? at::Tensor() : prepare(bias_in, ct);
    const at::Tensor lse = have_p ? at::Tensor() : lse_in.contiguous();
    at::Tensor dq_c = ct == dt ? dq : cpu::empty_output({B, Cqk, H, W}, copts);

    AT_DISPATCH_FLOATING_TYPES(ct, "ra_bwd_cpu", [&] {
      using T = scalar_t;
      const Geom g = make_geom<T>(N, S, have_p ? kNBW : kNBWLean, cpu::vec_bytes());
      const BwdArgs<T> a{dout.const_data_ptr<T>(),
                         q.const_data_ptr<T>(),
                         k.const_data_ptr<T>(),
                         have_p ? nullptr : kT.const_data_ptr<T>(),
                         vT.const_data_ptr<T>(),
                         have_p ? nullptr : bias.const_data_ptr<T>(),
                         have_p ? nullptr : lse.const_data_ptr<T>(),
                         have_p ? p.const_data_ptr<T>() : nullptr,
                         dq_c.mutable_data_ptr<T>(),
                         Cqk, Cv, S, N, static_cast<T>(scale), q_nhwc, dout_nhwc};
      // Tasks: tpi per image, each a fixed range of about kTaskBlocks blocks (independent of the
      // thread count). Waves of G tasks, up to four per thread (claimed dynamically, so a wave
      // waits for at most about one task at its end) while their partial sums stay under
      // kPartialBytes; after each wave its partial sums are added to the results in task order.
      // Without kept weights the backward runs lean instead (the caller chose memory over
      // time): one task per thread per wave and blocks of kNBWLean windows. Measured on 2
      // threads at OCR's S = 19, C = 512, 64 x 128: 0.83 MiB less scratch and partial sums
      // (65.16 MiB for fwd+bwd instead of 65.99; the reference holds 65.34), for a backward
      // 12-15 % slower.
      const int64_t tpi = (g.nblocks + kTaskBlocks - 1) / kTaskBlocks, ntask = B * tpi;
      const int64_t psize = partial_size(g, Cqk, Cv), scratch = bwd_scratch(g, Cqk, Cv, S);
      const int64_t nthr = std::max<int64_t>(1, at::get_num_threads());
      const int64_t fit = kPartialBytes / std::max<int64_t>(1, psize * int64_t(sizeof(T)));
      const int64_t G =
          std::min(ntask, have_p ? std::max(nthr, std::min(4 * nthr, fit)) : nthr);
      at::Tensor part_t = at::empty({G, std::max<int64_t>(psize, 1)}, copts);
      T* part = part_t.mutable_data_ptr<T>();
      T* dK = dk_c.mutable_data_ptr<T>();
      T* dV = dv_c.mutable_data_ptr<T>();
      T* dB = db_c.mutable_data_ptr<T>();
      const int64_t rows = Cqk + Cv + 1, Sp = g.Sp;
      for (int64_t w0 = 0; w0 < ntask; w0 += G) {
        const int64_t nt = std::min(G, ntask - w0);
        cpu::for_each_item<T>(nt, scratch, [&](int64_t i, T* s) {
          const int64_t t = w0 + i, b = t / tpi, c = t % tpi;
          bwd_task<T>(a, g, b, g.nblocks * c / tpi, g.nblocks * (c + 1) / tpi, s, part + i * psize);
        });
        const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, nt * S));
        at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r)
            for (int64_t i = 0; i < nt; ++i) {  // task order: deterministic
              const int64_t b = (w0 + i) / tpi;
              const T* src = part + i * psize + r * Sp;
              T* dst = r < Cqk        ? dK + (b * Cqk + r) * S
                       : r < Cqk + Cv ? dV + (b * Cv + r - Cqk) * S
                                      : dB + b * S;
              for (int64_t s = 0; s < S; ++s) dst[s] += src[s];
            }
        });
      }
    });
    if (ct != dt) dq.copy_(dq_c);
  }
  if (ct == dt) return {dq, dk_c, dv_c, db_c};
  return {dq, dk_c.to(dt), dv_c.to(dt), db_c.to(dt)};
}

}  // namespace
}  // namespace ra_cpu
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CPU, m) {
  m.impl("ra_fwd", &fastctx::ra_cpu::ra_fwd_cpu);
  m.impl("ra_bwd", &fastctx::ra_cpu::ra_bwd_cpu);
}
