// Pyramid pool (ANN's APNB / AFNB), CPU: the bin plan, launchers and the CPU registration of the
// ops fastctx::pp_fwd and fastctx::pp_bwd (schemas: csrc/ops/pyramid_pool.cpp). The per-plane
// kernels and their design notes are in pyramid_pool_kernels.h.
//
// x is read through its strides, never copied: a plane at a time when its columns are stride-1
// (NCHW, and slices of it); channels-last maps an image and 64 channels at a time, pixel by
// pixel; other maps (transposed) 16 planes at a time, vectorised along the channels. 16-bit
// inputs are converted as they are read; accumulation is float32 for float16 / bfloat16 /
// float32 and float64 for float64. out [B, C, S] and dx [B, C, H, W] are contiguous, in the
// input dtype.
//
// Parallelism: at::parallel_for over the B * C planes (or chunks of them). Each plane is computed
// by one thread in a fixed order, so the results are bit-identical run to run and for any thread count.
//
// Vector code: the kernels are compiled twice, for the baseline target and (x86-64 with GCC)
// for AVX2 + FMA; __builtin_cpu_supports picks one at run time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#define FASTCTX_PP_ISA isa_base
#include "pyramid_pool_kernels.h"
#undef FASTCTX_PP_ISA

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define FASTCTX_PP_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FASTCTX_PP_ISA isa_avx2
#include "pyramid_pool_kernels.h"
#undef FASTCTX_PP_ISA
#pragma GCC pop_options
#endif

namespace fastctx {
namespace pp_cpu {
namespace {

#define PP_OP "fastctx.pyramid_pool"

using cpu::use_avx2;

template <class X, class T>
void fwd_plane(const Plan& p, const X* x, int64_t sh, T* acc, T* rowbuf, X* out) {
#ifdef FASTCTX_PP_HAVE_AVX2
  if (use_avx2()) return isa_avx2::fwd_plane<X, T>(p, x, sh, acc, rowbuf, out);
#endif
  isa_base::fwd_plane<X, T>(p, x, sh, acc, rowbuf, out);
}

template <class X, class T, int64_t NC>
void fwd_planes_strided(const Plan& p, const X* x, int64_t sc, int64_t sh, int64_t sw, int64_t nc,
                        T* acc, X* out) {
#ifdef FASTCTX_PP_HAVE_AVX2
  if (use_avx2()) return isa_avx2::fwd_planes_strided<X, T, NC>(p, x, sc, sh, sw, nc, acc, out);
#endif
  isa_base::fwd_planes_strided<X, T, NC>(p, x, sc, sh, sw, nc, acc, out);
}

// Picks the instantiation: full chunks at a compile-time width.
template <class X, class T>
void fwd_chunk(const Plan& p, const X* x, int64_t sc, int64_t sh, int64_t sw, int64_t nc, T* acc,
               X* out) {
  if (nc == kChunk) return fwd_planes_strided<X, T, kChunk>(p, x, sc, sh, sw, nc, acc, out);
  fwd_planes_strided<X, T, 0>(p, x, sc, sh, sw, nc, acc, out);
}

template <class X, class T, int64_t NC>
void fwd_image_cl_isa(const Plan& p, const X* x, int64_t sh, int64_t sw, int64_t nc, T* keyacc,
                      T* colsum, X* out) {
#ifdef FASTCTX_PP_HAVE_AVX2
  if (use_avx2()) return isa_avx2::fwd_image_cl<X, T, NC>(p, x, sh, sw, nc, keyacc, colsum, out);
#endif
  isa_base::fwd_image_cl<X, T, NC>(p, x, sh, sw, nc, keyacc, colsum, out);
}

// Full chunks at a compile-time width.
template <class X, class T>
void fwd_image_cl(const Plan& p, const X* x, int64_t sh, int64_t sw, int64_t nc, T* keyacc,
                  T* colsum, X* out) {
  if (nc == kWide) return fwd_image_cl_isa<X, T, kWide>(p, x, sh, sw, nc, keyacc, colsum, out);
  fwd_image_cl_isa<X, T, 0>(p, x, sh, sw, nc, keyacc, colsum, out);
}

template <class X, class T>
void bwd_plane(const Plan& p, const T* dout, T* g, T* rowbuf, X* dx) {
#ifdef FASTCTX_PP_HAVE_AVX2
  if (use_avx2()) return isa_avx2::bwd_plane<X, T>(p, dout, g, rowbuf, dx);
#endif
  isa_base::bwd_plane<X, T>(p, dout, g, rowbuf, dx);
}

// The bins of every scale for an H x W map, as adaptive_avg_pool2d computes them.
class PlanData {
 public:
  PlanData(at::IntArrayRef scales, int64_t H, int64_t W, const char* op) {
    TORCH_CHECK(!scales.empty(), PP_OP " (", op, "): scales must not be empty");
    TORCH_CHECK(H > 0 && W > 0, PP_OP " (", op, "): the map must not be empty, got ", H, "x", W);
    int64_t R = 0, S = 0;
    for (const int64_t s : scales) {
      TORCH_CHECK(s > 0 && s <= (int64_t(1) << 24), PP_OP " (", op,
                  "): scales must be positive (and at most 2^24), got ", scales);
      R += s;
      S += s * s;
    }
    bins(scales, H, row_ptr_, row_idx_);
    bins(scales, W, col_ptr_, col_idx_);
    key_row_.reserve(S);
    key_col_.reserve(S);
    row_key0_.reserve(R + 1);
    key_c0_.reserve(S);
    key_c1_.reserve(S);
    key_inv_.reserve(S);
    int64_t r = 0;
    for (const int64_t s : scales) {
      for (int64_t i = 0; i < s; ++i, ++r) {
        const int64_t r0 = i * H / s, r1 = ((i + 1) * H + s - 1) / s;
        row_key0_.push_back(static_cast<int64_t>(key_row_.size()));
        for (int64_t j = 0; j < s; ++j) {
          const int64_t c0 = j * W / s, c1 = ((j + 1) * W + s - 1) / s;
          key_row_.push_back(r);
          key_col_.push_back(r - i + j);  // column bin (scale, j): the same numbering as rows
          key_c0_.push_back(c0);
          key_c1_.push_back(c1);
          key_inv_.push_back(1.0 / static_cast<double>((r1 - r0) * (c1 - c0)));
        }
      }
    }
    row_key0_.push_back(S);
    plan_ = Plan{H, W, R, S, row_ptr_.data(), row_idx_.data(), key_row_.data(),
                 key_c0_.data(), key_c1_.data(), key_inv_.data(), col_ptr_.data(),
                 col_idx_.data(), key_col_.data(), row_key0_.data()};
  }
  const Plan& plan() const { return plan_; }

 private:
  // The bins (scale, i) of every scale along an axis of n positions, numbered in plan order, as
  // a compressed list per position: ptr [n + 1], idx (increasing within a position).
  static void bins(at::IntArrayRef scales, int64_t n, std::vector<int64_t>& ptr,
                   std::vector<int64_t>& idx) {
    ptr.assign(n + 1, 0);
    for (const int64_t s : scales)
      for (int64_t i = 0; i < s; ++i)
        for (int64_t h = i * n / s; h < ((i + 1) * n + s - 1) / s; ++h) ++ptr[h + 1];
    for (int64_t h = 0; h < n; ++h) ptr[h + 1] += ptr[h];
    idx.resize(ptr[n]);
    std::vector<int64_t> fill(ptr.begin(), ptr.end() - 1);
    int64_t r = 0;
    for (const int64_t s : scales)
      for (int64_t i = 0; i < s; ++i, ++r)
        for (int64_t h = i * n / s; h < ((i + 1) * n + s - 1) / s; ++h) idx[fill[h]++] = r;
  }

  std::vector<int64_t> row_ptr_, row_idx_, key_row_, key_c0_, key_c1_;
  std::vector<int64_t> col_ptr_, col_idx_, key_col_, row_key0_;
  std::vector<double> key_inv_;
  Plan plan_;
};

void check_tensor(const at::Tensor& t, const char* op, const char* name, int64_t dim,
                  const char* shape) {
  cpu::check_tensor(PP_OP, op, t, name, dim, shape);
  check_float(PP_OP, op, t, name);
}

// Planes per parallel_for grain: about 64 Ki pixels.
int64_t grain(int64_t H, int64_t W) { return std::max<int64_t>(1, (int64_t(1) << 16) / (H * W)); }

// ---------------------------------------------------------------------------------------------
at::Tensor pp_fwd_cpu(const at::Tensor& x_in, at::IntArrayRef scales) {
  check_tensor(x_in, "pp_fwd", "x", 4, "[B, C, H, W]");
  const int64_t B = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const PlanData pd(scales, H, W, "pp_fwd");
  const Plan& p = pd.plan();
  auto out = at::empty({B, C, p.S}, x_in.options());
  if (B * C == 0) return out;
  const at::Tensor& x = x_in;
  const int64_t sb = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pp_fwd_cpu", [&] {
    using X = scalar_t;
    using T = std::conditional_t<std::is_same<X, double>::value, double, float>;
    const X* xp = x.const_data_ptr<X>();
    X* op = out.mutable_data_ptr<X>();
    if (W == 1 || sw == 1) {  // stride-1 columns: a plane at a time
      at::parallel_for(0, B * C, grain(H, W), [&](int64_t p0, int64_t p1) {
        std::vector<T> acc(p.R * W), rowbuf(W);
        for (int64_t i = p0; i < p1; ++i) {
          const X* xi = xp + (i / C) * sb + (i % C) * sc;
          fwd_plane<X, T>(p, xi, sh, acc.data(), rowbuf.data(), op + i * p.S);
        }
      });
    } else if (sc == 1) {  // channels-last: an image and kWide channels at a time
      const int64_t nch = (C + kWide - 1) / kWide;
      at::parallel_for(0, B * nch, 1, [&](int64_t t0, int64_t t1) {
        std::vector<T> keyacc(kWide * p.S), colsum(kWide * p.R);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = t / nch, c0 = (t % nch) * kWide, nc = std::min(kWide, C - c0);
          fwd_image_cl<X, T>(p, xp + b * sb + c0, sh, sw, nc, keyacc.data(), colsum.data(),
                             op + (b * C + c0) * p.S);
        }
      });
    } else {  // chunks of kChunk planes, vectorised along the channels
      const int64_t nch = (C + kChunk - 1) / kChunk;
      at::parallel_for(0, B * nch, 1, [&](int64_t t0, int64_t t1) {
        std::vector<T> acc(kChunk * p.R * W);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = t / nch, c0 = (t % nch) * kChunk, nc = std::min(kChunk, C - c0);
          fwd_chunk<X, T>(p, xp + b * sb + c0 * sc, sc, sh, sw, nc, acc.data(),
                          op + (b * C + c0) * p.S);
        }
      });
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
at::Tensor pp_bwd_cpu(const at::Tensor& dout_in, at::IntArrayRef scales, int64_t H, int64_t W) {
  check_tensor(dout_in, "pp_bwd", "dout", 3, "[B, C, S]");
  const int64_t B = dout_in.size(0), C = dout_in.size(1);
  const PlanData pd(scales, H, W, "pp_bwd");
  const Plan& p = pd.plan();
  TORCH_CHECK(dout_in.size(2) == p.S, PP_OP " (pp_bwd): dout must be [B, C, S] with S = ", p.S,
              " for scales ", scales, ", got ", dout_in.sizes());
  auto dx = cpu::empty_output({B, C, H, W}, dout_in.options());
  if (B * C == 0) return dx;
  const at::ScalarType dt = dout_in.scalar_type();
  const at::ScalarType ct = acc_dtype(dt);
  const at::Tensor dout = dout_in.to(ct).contiguous();  // [B, C, S]: small

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "pp_bwd_cpu", [&] {
    using X = scalar_t;
    using T = std::conditional_t<std::is_same<X, double>::value, double, float>;
    const T* dp = dout.const_data_ptr<T>();
    X* dxp = dx.mutable_data_ptr<X>();
    at::parallel_for(0, B * C, grain(H, W), [&](int64_t p0, int64_t p1) {
      std::vector<T> g(p.R * W), rowbuf(W);
      for (int64_t i = p0; i < p1; ++i)
        bwd_plane<X, T>(p, dp + i * p.S, g.data(), rowbuf.data(), dxp + i * H * W);
    });
  });
  return dx;
}

}  // namespace
}  // namespace pp_cpu
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CPU, m) {
  m.impl("pp_fwd", &fastctx::pp_cpu::pp_fwd_cpu);
  m.impl("pp_bwd", &fastctx::pp_cpu::pp_bwd_cpu);
}
