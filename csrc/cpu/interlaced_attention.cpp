// Interlaced sparse self-attention (ISANet), CPU: launchers and the CPU registration of the ops
// fastctx::isa_fwd and fastctx::isa_bwd (schemas: csrc/ops/interlaced_attention.cpp). Semantics:
// shared/docs/OPERATORS.md section 2.
//
// Work item: one group of one image (groups are independent in both directions, so there are no
// cross-item reductions: results are bit-identical run to run and for any thread count). Items
// are numbered so that consecutive ones share cache lines (long mode: groups of equal row phase
// a, short mode: blocks of one block row) and claimed one at a time from a shared counter.
//
// Per item, with L members:
// - pack: the group's members are read straight from the strided q, k, v (dout) by index
//   arithmetic, converted to the compute dtype, into per-thread scratch [C][L] (channel-major;
//   member-major reads for channels_last inputs). No permuted copy of a whole tensor is made.
// - GEMMs: at::mm_out on the scratch buffers (BLAS; ATen runs it single-threaded inside
//   at::parallel_for). Forward: S = Q^T K [L, L], P = softmax(scale S) per row, O = V P^T.
//   Backward (P recomputed from the saved lse): dP = dO^T V, dS = scale P (dP - rowsum(P dP)),
//   dV = dO P, dK = Q dS, dQ = K dS^T.
// - the row passes (softmax, its backward) are in interlaced_attention_kernels.h, compiled for
//   the baseline target and for AVX2 + FMA, picked at run time.
// - unpack: results are written to the members' positions of the NCHW outputs.
//
// Outputs are contiguous NCHW in the input dtype; lse [B, H, W] is float32 (float64 for float64
// inputs). Compute (and accumulation) dtype: float64 for float64 inputs, float32 otherwise.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vector types in the baseline build
#endif

#define FASTCTX_ISA_NS isa_base
#include "interlaced_attention_kernels.h"
#undef FASTCTX_ISA_NS

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define FASTCTX_ISA_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FASTCTX_ISA_NS isa_avx2
#include "interlaced_attention_kernels.h"
#undef FASTCTX_ISA_NS
#pragma GCC pop_options
#endif

namespace fastctx {
namespace isa_cpu {
namespace {

#define ISA_OP "fastctx.interlaced_attention"

bool use_avx2() {
#ifdef FASTCTX_ISA_HAVE_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

template <class T>
void softmax_fwd(T* S, int64_t L, int64_t Lp, T scale, T* lse) {
#ifdef FASTCTX_ISA_HAVE_AVX2
  if (use_avx2()) return isa_avx2::softmax_fwd<T>(S, L, Lp, scale, lse);
#endif
  isa_base::softmax_fwd<T>(S, L, Lp, scale, lse);
}

template <class T>
void softmax_bwd(T* S, T* dP, int64_t L, int64_t Lp, T scale, const T* lse) {
#ifdef FASTCTX_ISA_HAVE_AVX2
  if (use_avx2()) return isa_avx2::softmax_bwd<T>(S, dP, L, Lp, scale, lse);
#endif
  isa_base::softmax_bwd<T>(S, dP, L, Lp, scale, lse);
}

// The grouping of one call.
struct Geom {
  int64_t H, W, bh, bw, gh, gw;
  int64_t G;   // groups per image
  int64_t L;   // members per group
  int64_t Lp;  // L rounded up to the vector width (row stride of the L x L matrices)
  bool long_mode;
};

Geom make_geom(int64_t H, int64_t W, int64_t bh, int64_t bw, bool long_mode, int64_t vl) {
  Geom g;
  g.H = H, g.W = W, g.bh = bh, g.bw = bw, g.gh = H / bh, g.gw = W / bw;
  g.long_mode = long_mode;
  g.G = long_mode ? bh * bw : g.gh * g.gw;
  g.L = long_mode ? g.gh * g.gw : bh * bw;
  g.Lp = (g.L + vl - 1) / vl * vl;
  return g;
}

// Rows pi[l] and columns pj[l] of the members of group gi (of any image). Long mode: group
// (a, b) = (gi / bw, gi % bw), member l = I * gw + J at (I * bh + a, J * bw + b). Short mode:
// group (I, J) = (gi / gw, gi % gw), member l = a * bw + b at the same place.
void members(const Geom& g, int64_t gi, int64_t* pi, int64_t* pj) {
  if (g.long_mode) {
    const int64_t a = gi / g.bw, b = gi % g.bw;
    for (int64_t I = 0; I < g.gh; ++I)
      for (int64_t J = 0; J < g.gw; ++J) pi[I * g.gw + J] = I * g.bh + a, pj[I * g.gw + J] = J * g.bw + b;
  } else {
    const int64_t I = gi / g.gw, J = gi % g.gw;
    for (int64_t a = 0; a < g.bh; ++a)
      for (int64_t b = 0; b < g.bw; ++b) pi[a * g.bw + b] = I * g.bh + a, pj[a * g.bw + b] = J * g.bw + b;
  }
}

// A 4-D tensor [B, C, H, W] by pointer and strides (in elements).
template <class T>
struct Map {
  T* p;
  int64_t C, sB, sC, sH, sW;
};

template <class T>
Map<T> map_of(const at::Tensor& t) {
  return Map<T>{static_cast<T*>(t.data_ptr()), t.size(1), t.stride(0), t.stride(1), t.stride(2),
                t.stride(3)};
}

// dst[c * L + l] = x[b, c, pi[l], pj[l]] in the compute dtype A. Channel-major reads unless the
// channels are the tighter stride (channels_last), then member-major. off: L values of scratch.
template <class T, class A>
void pack(const Map<const T>& x, int64_t b, const int64_t* pi, const int64_t* pj, int64_t L,
          int64_t* off, A* dst) {
  const T* base = x.p + b * x.sB;
  for (int64_t l = 0; l < L; ++l) off[l] = pi[l] * x.sH + pj[l] * x.sW;
  if (std::abs(x.sC) < std::abs(x.sW)) {
    for (int64_t l = 0; l < L; ++l) {
      const T* s = base + off[l];
      for (int64_t c = 0; c < x.C; ++c) dst[c * L + l] = static_cast<A>(s[c * x.sC]);
    }
  } else {
    for (int64_t c = 0; c < x.C; ++c) {
      const T* s = base + c * x.sC;
      A* d = dst + c * L;
      for (int64_t l = 0; l < L; ++l) d[l] = static_cast<A>(s[off[l]]);
    }
  }
}

// y[b, c, pi[l], pj[l]] = src[c * L + l], converted to T (y is a freshly made contiguous tensor).
template <class T, class A>
void unpack(const Map<T>& y, int64_t b, const int64_t* pi, const int64_t* pj, int64_t L,
            int64_t* off, const A* src) {
  T* base = y.p + b * y.sB;
  for (int64_t l = 0; l < L; ++l) off[l] = pi[l] * y.sH + pj[l] * y.sW;
  for (int64_t c = 0; c < y.C; ++c) {
    T* d = base + c * y.sC;
    const A* s = src + c * L;
    for (int64_t l = 0; l < L; ++l) d[off[l]] = static_cast<T>(s[l]);
  }
}

// Zero-initialised, 64-byte aligned per-thread scratch (zeros: the padding columns of the dP
// rows must be finite, see the kernels header; the same alignment for every thread keeps the
// BLAS results independent of which thread ran an item).
class Scratch {
 public:
  explicit Scratch(int64_t bytes) {
    const size_t n = (static_cast<size_t>(std::max<int64_t>(bytes, 1)) + 63) / 64 * 64;
    p_ = std::aligned_alloc(64, n);
    TORCH_CHECK(p_ != nullptr, ISA_OP ": could not allocate ", n, " bytes of scratch");
    std::memset(p_, 0, n);
  }
  ~Scratch() { std::free(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  char* data() const { return static_cast<char*>(p_); }

 private:
  void* p_;
};

// Runs setup(scratch) once per worker thread, then item(i) for every i in [0, n), each item
// claimed from a shared counter by one of up to get_num_threads() workers.
template <class Setup>
void for_each_item(int64_t n, int64_t scratch_bytes, const Setup& setup) {
  const int64_t nthr = std::min<int64_t>(n, std::max<int64_t>(1, at::get_num_threads()));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthr, 1, [&](int64_t, int64_t) {
    Scratch s(scratch_bytes);
    auto item = setup(s.data());
    for (int64_t i = next++; i < n; i = next++) item(i);
  });
}

at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_tensor(const at::Tensor& t, const char* op, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.defined(), ISA_OP " (", op, "): ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), ISA_OP " (", op, "): ", name,
              " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 4, ISA_OP " (", op, "): ", name, " must be 4-D [B, C, H, W], got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), ISA_OP " (", op, "): ", name, " has dtype ",
              t.scalar_type(), " but q has dtype ", q.scalar_type());
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t bh,
                  int64_t bw, const char* op) {
  check_tensor(q, op, "q", q);
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              ISA_OP " (", op, "): q must be float16, bfloat16, float32 or float64, got ", st);
  check_tensor(k, op, "k", q);
  check_tensor(v, op, "v", q);
  TORCH_CHECK(k.sizes() == q.sizes(), ISA_OP " (", op, "): q and k must have the same shape, got q ",
              q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(2) == q.size(2) && v.size(3) == q.size(3),
              ISA_OP " (", op, "): v must match q in batch and spatial size, got q ", q.sizes(),
              " and v ", v.sizes());
  TORCH_CHECK(bh > 0 && bw > 0, ISA_OP " (", op, "): block must be positive, got ", bh, "x", bw);
  TORCH_CHECK(q.size(2) % bh == 0 && q.size(3) % bw == 0, ISA_OP " (", op, "): the map ",
              q.size(2), "x", q.size(3), " is not divisible by block ", bh, "x", bw);
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& v, const at::Tensor& q) {
  check_tensor(t, "isa_bwd", name, q);
  TORCH_CHECK(t.sizes() == v.sizes(), ISA_OP " (isa_bwd): ", name, " must have the shape of v ",
              v.sizes(), ", got ", t.sizes());
}

// Scratch layout of one worker (elements of the compute dtype A, then int64 index arrays).
struct Layout {
  int64_t q, k, v, d, s, dp, r, lse, idx, bytes;
};

template <class A>
Layout layout(const Geom& g, int64_t Cqk, int64_t Cv, bool backward) {
  const int64_t L = g.L, LL = L * g.Lp;
  Layout y;
  int64_t n = 0;
  auto take = [&](int64_t elems) {
    const int64_t at = n;
    n += (elems + 15) / 16 * 16;  // keep every buffer 64-byte aligned
    return at;
  };
  y.q = take(Cqk * L);
  y.k = take(Cqk * L);
  y.v = take(Cv * L);
  y.d = take(backward ? Cv * L : 0);  // dout
  y.s = take(LL);
  y.dp = take(backward ? LL : 0);
  y.r = take(std::max(Cqk, Cv) * L);  // a result [C][L] before it is unpacked
  y.lse = take(L);
  y.idx = n * static_cast<int64_t>(sizeof(A));
  y.bytes = y.idx + 3 * L * static_cast<int64_t>(sizeof(int64_t));
  return y;
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> isa_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                               const at::Tensor& v_in, int64_t bh, int64_t bw,
                                               bool long_mode, double scale) {
  check_inputs(q_in, k_in, v_in, bh, bw, "isa_fwd");
  const int64_t B = q_in.size(0), Cqk = q_in.size(1), H = q_in.size(2), W = q_in.size(3);
  const int64_t Cv = v_in.size(1);
  const at::ScalarType dt = q_in.scalar_type(), ct = compute_dtype(dt);
  auto out = at::empty({B, Cv, H, W}, q_in.options());
  auto lse = at::empty({B, H, W}, q_in.options().dtype(ct));
  if (B == 0 || H == 0 || W == 0) return {out, lse};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "isa_fwd_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(ct, "isa_fwd_cpu_compute", [&] {
      using A = scalar_t;
      const Geom g = make_geom(H, W, bh, bw, long_mode, 32 / int64_t(sizeof(A)));
      const Layout y = layout<A>(g, Cqk, Cv, false);
      const Map<const T> mq = map_of<const T>(q_in), mk = map_of<const T>(k_in),
                         mv = map_of<const T>(v_in);
      const Map<T> mo = map_of<T>(out);
      A* lse_p = lse.mutable_data_ptr<A>();
      const int64_t L = g.L, Lp = g.Lp;
      const auto opts = at::TensorOptions().dtype(ct).device(at::kCPU);
      for_each_item(B * g.G, y.bytes, [&](char* scratch) {
        A* base = reinterpret_cast<A*>(scratch);
        A *Q = base + y.q, *K = base + y.k, *V = base + y.v, *S = base + y.s, *R = base + y.r;
        A* lg = base + y.lse;
        int64_t* pi = reinterpret_cast<int64_t*>(scratch + y.idx);
        int64_t *pj = pi + L, *off = pj + L;
        const at::Tensor Qt = at::from_blob(Q, {Cqk, L}, opts).t();  // [L, Cqk]
        const at::Tensor Kt = at::from_blob(K, {Cqk, L}, opts);
        const at::Tensor Vt = at::from_blob(V, {Cv, L}, opts);
        at::Tensor St = at::from_blob(S, {L, L}, {Lp, 1}, opts);
        const at::Tensor Pt = St.t();
        at::Tensor Ot = at::from_blob(R, {Cv, L}, opts);
        return [=, &mq, &mk, &mv, &mo, &g](int64_t item) mutable {
          const int64_t b = item / g.G, gi = item % g.G;
          members(g, gi, pi, pj);
          pack(mq, b, pi, pj, L, off, Q);
          pack(mk, b, pi, pj, L, off, K);
          pack(mv, b, pi, pj, L, off, V);
          at::mm_out(St, Qt, Kt);  // S = Q^T K
          softmax_fwd<A>(S, L, Lp, static_cast<A>(scale), lg);
          at::mm_out(Ot, Vt, Pt);  // O = V P^T
          unpack(mo, b, pi, pj, L, off, R);
          A* lb = lse_p + b * H * W;
          for (int64_t l = 0; l < L; ++l) lb[pi[l] * W + pj[l]] = lg[l];
        };
      });
    });
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> isa_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in, int64_t bh,
    int64_t bw, bool long_mode, double scale) {
  check_inputs(q_in, k_in, v_in, bh, bw, "isa_bwd");
  check_like(dout_in, "dout", v_in, q_in);
  check_like(out_in, "out", v_in, q_in);
  const int64_t B = q_in.size(0), Cqk = q_in.size(1), H = q_in.size(2), W = q_in.size(3);
  const int64_t Cv = v_in.size(1);
  const at::ScalarType dt = q_in.scalar_type(), ct = compute_dtype(dt);
  TORCH_CHECK(lse_in.defined() && lse_in.device().is_cpu(),
              ISA_OP " (isa_bwd): lse must be a CPU tensor");
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == B && lse_in.size(1) == H &&
                  lse_in.size(2) == W,
              ISA_OP " (isa_bwd): lse must have shape [B, H, W] = [", B, ", ", H, ", ", W,
              "], got ", lse_in.sizes());
  TORCH_CHECK(lse_in.scalar_type() == ct, ISA_OP " (isa_bwd): lse must have dtype ", ct, " for ",
              dt, " inputs, got ", lse_in.scalar_type());

  auto dq = at::empty({B, Cqk, H, W}, q_in.options());
  auto dk = at::empty({B, Cqk, H, W}, q_in.options());
  auto dv = at::empty({B, Cv, H, W}, q_in.options());
  if (B == 0 || H == 0 || W == 0) return {dq, dk, dv};
  const at::Tensor lse = lse_in.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "isa_bwd_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(ct, "isa_bwd_cpu_compute", [&] {
      using A = scalar_t;
      const Geom g = make_geom(H, W, bh, bw, long_mode, 32 / int64_t(sizeof(A)));
      const Layout y = layout<A>(g, Cqk, Cv, true);
      const Map<const T> mq = map_of<const T>(q_in), mk = map_of<const T>(k_in),
                         mv = map_of<const T>(v_in), mdo = map_of<const T>(dout_in);
      const Map<T> mdq = map_of<T>(dq), mdk = map_of<T>(dk), mdv = map_of<T>(dv);
      const A* lse_p = lse.const_data_ptr<A>();
      const int64_t L = g.L, Lp = g.Lp;
      const auto opts = at::TensorOptions().dtype(ct).device(at::kCPU);
      for_each_item(B * g.G, y.bytes, [&](char* scratch) {
        A* base = reinterpret_cast<A*>(scratch);
        A *Q = base + y.q, *K = base + y.k, *V = base + y.v, *dO = base + y.d, *S = base + y.s;
        A *dP = base + y.dp, *R = base + y.r, *lg = base + y.lse;
        int64_t* pi = reinterpret_cast<int64_t*>(scratch + y.idx);
        int64_t *pj = pi + L, *off = pj + L;
        const at::Tensor Qc = at::from_blob(Q, {Cqk, L}, opts), Qt = Qc.t();
        const at::Tensor Kc = at::from_blob(K, {Cqk, L}, opts);
        const at::Tensor Vc = at::from_blob(V, {Cv, L}, opts);
        const at::Tensor dOc = at::from_blob(dO, {Cv, L}, opts), dOt = dOc.t();
        at::Tensor St = at::from_blob(S, {L, L}, {Lp, 1}, opts);   // S, then P
        at::Tensor dPt = at::from_blob(dP, {L, L}, {Lp, 1}, opts);  // dP, then scale dS
        const at::Tensor dSt = dPt.t();
        at::Tensor Rk = at::from_blob(R, {Cqk, L}, opts), Rv = at::from_blob(R, {Cv, L}, opts);
        return [=, &mq, &mk, &mv, &mdo, &mdq, &mdk, &mdv, &g](int64_t item) mutable {
          const int64_t b = item / g.G, gi = item % g.G;
          members(g, gi, pi, pj);
          pack(mq, b, pi, pj, L, off, Q);
          pack(mk, b, pi, pj, L, off, K);
          pack(mv, b, pi, pj, L, off, V);
          pack(mdo, b, pi, pj, L, off, dO);
          const A* lb = lse_p + b * H * W;
          for (int64_t l = 0; l < L; ++l) lg[l] = lb[pi[l] * W + pj[l]];
          at::mm_out(St, Qt, Kc);   // S = Q^T K
          at::mm_out(dPt, dOt, Vc);  // dP = dO^T V
          softmax_bwd<A>(S, dP, L, Lp, static_cast<A>(scale), lg);
          at::mm_out(Rv, dOc, St);  // dV = dO P
          unpack(mdv, b, pi, pj, L, off, R);
          at::mm_out(Rk, Qc, dPt);  // dK = Q dS
          unpack(mdk, b, pi, pj, L, off, R);
          at::mm_out(Rk, Kc, dSt);  // dQ = K dS^T
          unpack(mdq, b, pi, pj, L, off, R);
        };
      });
    });
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace isa_cpu
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CPU, m) {
  m.impl("isa_fwd", &fastctx::isa_cpu::isa_fwd_cpu);
  m.impl("isa_bwd", &fastctx::isa_cpu::isa_bwd_cpu);
}
