// Criss-cross attention (CCNet), CPU: launchers and the CPU registration of the ops
// fastctx::cc_fwd and fastctx::cc_bwd (schemas: csrc/ops/criss_cross.cpp). The per-task kernels
// and their design notes are in criss_cross_kernels.h.
//
// Inputs are made NCHW-contiguous in the compute dtype by prepare(): that copy is the only copy,
// and a no-op for NCHW float32 / float64 input (channels_last or other strided inputs, and
// float16 / bfloat16 inputs, which are upcast to float32, are copied once). Outputs are
// NCHW-contiguous in the input dtype; lse and the backward's D are float32 (float64 for float64
// inputs). Accumulation is float32 for float16 / bfloat16 / float32 and float64 for float64.
// The backward gathers per key (no atomics): results are deterministic run to run and do not
// depend on the number of threads.
//
// Parallelism: at::parallel_for over equal shares of an image's rows (see for_each_row_block),
// processed in tasks of at most kTR rows; per-thread scratch of O(kTR * (H + W) * W) values.
//
// Vector code: the kernels are compiled twice, for the baseline target and (x86-64 with GCC)
// for AVX2 + FMA; __builtin_cpu_supports picks one at run time, so no -march flag is needed.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vector types in the baseline build
#endif

#define FASTCTX_CC_ISA isa_base
#include "criss_cross_kernels.h"
#undef FASTCTX_CC_ISA

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define FASTCTX_CC_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FASTCTX_CC_ISA isa_avx2
#define FASTCTX_CC_IN_REGISTER(v) __asm__("" : "+x"(v))
#include "criss_cross_kernels.h"
#undef FASTCTX_CC_IN_REGISTER
#undef FASTCTX_CC_ISA
#pragma GCC pop_options
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

namespace fastctx {
namespace cc_cpu {
namespace {

using cpu::compute_dtype;
using cpu::prepare;
using cpu::use_avx2;

#define CC_OP "fastctx.criss_cross_attention"

template <class T>
void fwd_task(const FwdArgs<T>& a, int64_t b, int64_t i0, int64_t nrows, T* scratch) {
#ifdef FASTCTX_CC_HAVE_AVX2
  if (use_avx2()) return isa_avx2::fwd_rows<T>(a, b, i0, nrows, scratch);
#endif
  isa_base::fwd_rows<T>(a, b, i0, nrows, scratch);
}

template <class T>
void bwd_task(const BwdArgs<T>& a, int64_t b, int64_t i0, int64_t nrows, T* scratch, int pass) {
#ifdef FASTCTX_CC_HAVE_AVX2
  if (use_avx2()) return isa_avx2::bwd_rows<T>(a, b, i0, nrows, scratch, pass);
#endif
  isa_base::bwd_rows<T>(a, b, i0, nrows, scratch, pass);
}

template <class T>
void prep_task(const T* dO, const T* O, const T* lse, int64_t Cv, int64_t HW, int64_t W,
               int64_t Wp, T* D, T* Lp) {
#ifdef FASTCTX_CC_HAVE_AVX2
  if (use_avx2()) return isa_avx2::prep_row<T>(dO, O, lse, Cv, HW, W, Wp, D, Lp);
#endif
  isa_base::prep_row<T>(dO, O, lse, Cv, HW, W, Wp, D, Lp);
}

// Row stride of the scratch rows: W rounded up to 64 bytes.
template <class T>
int64_t padded_width(int64_t W) {
  constexpr int64_t q = 64 / sizeof(T);
  return (W + q - 1) / q * q;
}

// Runs fn(b, i0, nrows, scratch) over every image, in blocks of at most kTR rows.
// The cost of a block is that of its register blocks of kRB rows, so the work is split into
// equal shares of those, one per thread. Images go a few at a time: as few as give every thread
// about 4 register blocks, so that the threads mostly work on one image at once and stream the
// same k / v / dout planes at about the same time (sharing them in the last-level cache).
template <class T, class Fn>
void for_each_row_block(int64_t B, int64_t H, int64_t scratch_elems, const Fn& fn) {
  const int64_t nrb = (H + kRB - 1) / kRB;  // register blocks per image
  const int64_t nthr = std::max<int64_t>(1, at::get_num_threads());
  const int64_t group = std::min<int64_t>(B, std::max<int64_t>(1, (4 * nthr + nrb - 1) / nrb));
  for (int64_t b0 = 0; b0 < B; b0 += group) {
    const int64_t g = std::min(group, B - b0);
    const int64_t units = g * nrb;
    const int64_t shares = std::min(units, nthr);
    const int64_t bytes = scratch_elems * static_cast<int64_t>(sizeof(T));
    const cpu::ScratchSlots slots(shares, bytes);
    at::parallel_for(0, shares, 1, [&](int64_t begin, int64_t end) {
      T* s = reinterpret_cast<T*>(slots.slot(begin, bytes));
      for (int64_t p = begin; p < end; ++p) {
        // Share p: register blocks [u0, u1) of the group, image by image, kTR rows at a time.
        const int64_t u0 = units * p / shares, u1 = units * (p + 1) / shares;
        for (int64_t u = u0; u < u1;) {
          const int64_t b = u / nrb, ub = u % nrb;
          const int64_t ue = std::min(u1 - u, std::min<int64_t>(kTR / kRB, nrb - ub));
          const int64_t i0 = ub * kRB;
          fn(b0 + b, i0, std::min<int64_t>(ue * kRB, H - i0), s);
          u += ue;
        }
      }
    });
  }
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  cpu::check_tensor(CC_OP, op, q, "q", 4, "[B, Cqk, H, W]", q);
  cpu::check_float(CC_OP, op, q, "q");
  cpu::check_tensor(CC_OP, op, k, "k", 4, "[B, Cqk, H, W]", q);
  cpu::check_tensor(CC_OP, op, v, "v", 4, "[B, Cv, H, W]", q);
  TORCH_CHECK(k.sizes() == q.sizes(), CC_OP " (", op, "): q and k must have the same shape, got q ",
              q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(2) == q.size(2) && v.size(3) == q.size(3),
              CC_OP " (", op, "): v must match q in batch and spatial size, got q ", q.sizes(),
              " and v ", v.sizes());
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> cc_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                              const at::Tensor& v_in, double scale) {
  check_qkv(q_in, k_in, v_in, "cc_fwd");
  const int64_t B = q_in.size(0), H = q_in.size(2), W = q_in.size(3);
  const int64_t Cv = v_in.size(1);
  int64_t Cqk = q_in.size(1);
  const at::ScalarType dt = q_in.scalar_type(), ct = compute_dtype(dt);
  auto lse = at::empty({B, H, W}, q_in.options().dtype(ct));
  if (B == 0 || H == 0 || W == 0) return {at::empty({B, Cv, H, W}, v_in.options()), lse};

  at::Tensor q, k;
  if (Cqk == 0) {  // every energy is 0: run with one zero channel
    Cqk = 1;
    q = k = at::zeros({B, 1, H, W}, q_in.options().dtype(ct));
  } else {
    q = prepare(q_in, ct);
    k = prepare(k_in, ct);
  }
  const at::Tensor v = prepare(v_in, ct);
  at::Tensor out = cpu::empty_output({B, Cv, H, W}, v_in.options().dtype(ct));

  AT_DISPATCH_FLOATING_TYPES(ct, "cc_fwd_cpu", [&] {
    using T = scalar_t;
    const int64_t Wp = padded_width<T>(W);
    const FwdArgs<T> a{q.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(),
                       out.mutable_data_ptr<T>(), lse.mutable_data_ptr<T>(), Cqk, Cv, H, W, Wp,
                       static_cast<T>(scale)};
    const int64_t scratch = kTR * (H + W) * Wp + 2 * Wp;
    for_each_row_block<T>(B, H, scratch, [&](int64_t b, int64_t i0, int64_t n, T* s) {
      fwd_task<T>(a, b, i0, n, s);
    });
  });
  if (ct != dt) out = out.to(dt);
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> cc_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in, double scale) {
  check_qkv(q_in, k_in, v_in, "cc_bwd");
  cpu::check_tensor(CC_OP, "cc_bwd", dout_in, "dout", 4, "[B, Cv, H, W]", q_in);
  cpu::check_tensor(CC_OP, "cc_bwd", out_in, "out", 4, "[B, Cv, H, W]", q_in);
  TORCH_CHECK(dout_in.sizes() == v_in.sizes(), CC_OP " (cc_bwd): dout must have the shape of v ",
              v_in.sizes(), ", got ", dout_in.sizes());
  TORCH_CHECK(out_in.sizes() == v_in.sizes(), CC_OP " (cc_bwd): out must have the shape of v ",
              v_in.sizes(), ", got ", out_in.sizes());
  const int64_t B = q_in.size(0), H = q_in.size(2), W = q_in.size(3);
  int64_t Cqk = q_in.size(1), Cv = v_in.size(1);
  TORCH_CHECK(lse_in.defined() && lse_in.device() == q_in.device(),
              CC_OP " (cc_bwd): lse must be a tensor on ", q_in.device());
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == B && lse_in.size(1) == H &&
                  lse_in.size(2) == W,
              CC_OP " (cc_bwd): lse must have shape [B, H, W] = [", B, ", ", H, ", ", W,
              "], got ", lse_in.sizes());
  const at::ScalarType dt = q_in.scalar_type(), ct = compute_dtype(dt);
  TORCH_CHECK(lse_in.scalar_type() == ct, CC_OP " (cc_bwd): lse must have dtype ", ct, " for ",
              dt, " inputs, got ", lse_in.scalar_type());

  auto dq = cpu::empty_output({B, Cqk, H, W}, q_in.options());
  auto dk = cpu::empty_output({B, Cqk, H, W}, k_in.options());
  auto dv = cpu::empty_output({B, Cv, H, W}, v_in.options());
  if (B == 0 || H == 0 || W == 0) return {dq, dk, dv};

  // Zero-width q/k or v/dout: run with one zero channel (energies 0, resp. dA = D = 0) into
  // scratch gradients that are dropped; the real gradient of that width is empty.
  const auto copts = q_in.options().dtype(ct);
  at::Tensor q, k, v, dout, out;
  const bool no_qk = Cqk == 0, no_v = Cv == 0;
  if (no_qk) {
    Cqk = 1;
    q = k = at::zeros({B, 1, H, W}, copts);
  } else {
    q = prepare(q_in, ct);
    k = prepare(k_in, ct);
  }
  if (no_v) {
    Cv = 1;
    v = dout = out = at::zeros({B, 1, H, W}, copts);
  } else {
    v = prepare(v_in, ct);
    dout = prepare(dout_in, ct);
    out = prepare(out_in, ct);
  }
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor dq_c = (ct == dt && !no_qk) ? dq : cpu::empty_output({B, Cqk, H, W}, copts);
  at::Tensor dk_c = (ct == dt && !no_qk) ? dk : cpu::empty_output({B, Cqk, H, W}, copts);
  at::Tensor dv_c = (ct == dt && !no_v) ? dv : cpu::empty_output({B, Cv, H, W}, copts);

  AT_DISPATCH_FLOATING_TYPES(ct, "cc_bwd_cpu", [&] {
    using T = scalar_t;
    const int64_t Wp = padded_width<T>(W), HW = H * W;
    // D = <dout, out> per pixel and a copy of lse, both with rows padded to Wp.
    at::Tensor D = at::empty({B, H, Wp}, copts), Lp = at::empty({B, H, Wp}, copts);
    {
      const T* dO = dout.const_data_ptr<T>();
      const T* O = out.const_data_ptr<T>();
      const T* L = lse.const_data_ptr<T>();
      T* Dd = D.mutable_data_ptr<T>();
      T* Ld = Lp.mutable_data_ptr<T>();
      const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, Cv * W));
      at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t b = t / H, i = t % H;
          prep_task<T>(dO + b * Cv * HW + i * W, O + b * Cv * HW + i * W, L + t * W, Cv, HW, W,
                       Wp, Dd + t * Wp, Ld + t * Wp);
        }
      });
    }
    // The column weights and scores of every query (kernel header: pass 0 writes every row).
    at::Tensor Pc = cpu::empty_output({B, H, H, Wp}, copts), dSc = cpu::empty_output({B, H, H, Wp}, copts);
    const BwdArgs<T> a{dout.const_data_ptr<T>(), q.const_data_ptr<T>(), k.const_data_ptr<T>(),
                       v.const_data_ptr<T>(),    Lp.const_data_ptr<T>(), D.const_data_ptr<T>(),
                       dq_c.mutable_data_ptr<T>(), dk_c.mutable_data_ptr<T>(),
                       dv_c.mutable_data_ptr<T>(), Pc.mutable_data_ptr<T>(),
                       dSc.mutable_data_ptr<T>(),  Cqk, Cv, H, W, Wp, static_cast<T>(scale)};
    const int64_t scratch = 2 * kTR * (H + W) * Wp + W * Wp;
    for (int pass = 0; pass < 2; ++pass)
      for_each_row_block<T>(B, H, scratch, [&](int64_t b, int64_t i0, int64_t n, T* s) {
        bwd_task<T>(a, b, i0, n, s, pass);
      });
  });
  if (!no_qk && ct != dt) {
    dq = dq_c.to(dt);
    dk = dk_c.to(dt);
  }
  if (!no_v && ct != dt) dv = dv_c.to(dt);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace cc_cpu
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CPU, m) {
  m.impl("cc_fwd", &fastctx::cc_cpu::cc_fwd_cpu);
  m.impl("cc_bwd", &fastctx::cc_cpu::cc_bwd_cpu);
}
