// Interlaced sparse self-attention (ISANet), CPU: the element-wise row passes of one group's
// L x L attention matrix (softmax forward, softmax backward from the kept weights P). The launcher, the packing of a
// group and the GEMMs are in interlaced_attention.cpp.
//
// NO INCLUDE GUARD, on purpose: interlaced_attention.cpp includes this file once per instruction
// set, each time with FASTCTX_ISA_NS naming a namespace (and, for AVX2, under
// `#pragma GCC target("avx2,fma")`), so the passes are compiled for the baseline target and for
// AVX2 + FMA and the launcher picks one at run time (as region_attention_kernels.h does). The
// entry points take no vector-typed arguments.
//
// Layout: a row l of the matrix holds the L energies of query l against the group's keys, then
// Lp - L padding columns (Lp: L rounded up to the vector width), so every pass runs over whole
// vectors. The forward gives the padding P = 0; the backward needs it 0 (the launcher copies the
// kept P in with zero padding) and gives dS = 0 there; the padding of the dP rows must hold
// finite values (the launcher's scratch starts zeroed and the GEMMs never write it).

#ifndef FASTCTX_ISA_NS
#error "interlaced_attention_kernels.h: define FASTCTX_ISA_NS (a namespace name) before including"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#define FASTCTX_VEC_ISA FASTCTX_ISA_NS
#include "vec.h"
#undef FASTCTX_VEC_ISA

namespace fastctx {
namespace isa_cpu {
namespace FASTCTX_ISA_NS {

template <class T>
struct Rows : cpu::FASTCTX_ISA_NS::Vec<T, 32 / static_cast<int>(sizeof(T))> {
  static constexpr int VL = 32 / static_cast<int>(sizeof(T));  // 8 floats, 4 doubles
  typedef cpu::FASTCTX_ISA_NS::Vec<T, VL> Base;
  typedef typename Base::V V;
  using Base::bcast;
  using Base::load;
  using Base::store;
  using Base::vexp;
  using Base::vmax;

  static inline T hmax(V v) {
    T m = v[0];
    for (int l = 1; l < VL; ++l) m = v[l] > m ? v[l] : m;
    return m;
  }
  static inline T hsum(V v) {  // fixed order: deterministic
    T s = T(0);
    for (int l = 0; l < VL; ++l) s += v[l];
    return s;
  }

  // Forward: S (L rows of Lp, energies) -> P = softmax(scale * S) per row; lse[l] the row's
  // log-sum-exp of scale * S.
  static void softmax_fwd(T* S, int64_t L, int64_t Lp, T scale, T* lse) {
    const T ninf = -std::numeric_limits<T>::infinity();
    const V sc = bcast(scale);
    for (int64_t l = 0; l < L; ++l) {
      T* row = S + l * Lp;
      for (int64_t m = 0; m < Lp; m += VL) store(row + m, sc * load(row + m));
      for (int64_t m = L; m < Lp; ++m) row[m] = ninf;
      V mx = bcast(ninf);
      for (int64_t m = 0; m < Lp; m += VL) mx = vmax(mx, load(row + m));
      const V mv = bcast(hmax(mx));
      V sum = bcast(T(0));
      for (int64_t m = 0; m < Lp; m += VL) {
        const V p = vexp(load(row + m) - mv);
        store(row + m, p);
        sum += p;
      }
      const T s = hsum(sum);
      const V inv = bcast(T(1) / s);
      for (int64_t m = 0; m < Lp; m += VL) store(row + m, load(row + m) * inv);
      lse[l] = mv[0] + std::log(s);
    }
  }

  // Backward: dP -> scale * P * (dP - D) with D = sum_m P dP (= <dout, out> of the row's
  // query), P the forward's weights (padding columns 0).
  static void softmax_bwd(const T* P, T* dP, int64_t L, int64_t Lp, T scale) {
    const V sc = bcast(scale);
    for (int64_t l = 0; l < L; ++l) {
      const T* row = P + l * Lp;
      T* drow = dP + l * Lp;
      V d = bcast(T(0));
      for (int64_t m = 0; m < Lp; m += VL) d += load(row + m) * load(drow + m);
      const V dv = bcast(hsum(d));
      for (int64_t m = 0; m < Lp; m += VL)
        store(drow + m, sc * load(row + m) * (load(drow + m) - dv));
    }
  }
};

// Long mode's packing when bw == 8 (float): one map row holds gw runs of the 8 groups' members,
// s[J * 8 + b] for group b, member J; pack_row8 writes them out group by group,
// d[b * ds + J] (b < 8, J < gw), transposing 8 x 8 blocks in registers (the last gw % 8 members
// element by element); unpack_row8 is the inverse, d[J * 8 + b] = s[b * ss + J].
typedef cpu::FASTCTX_ISA_NS::Vec<float, 8> F8;
using cpu::FASTCTX_ISA_NS::transpose8;

inline void pack_row8(const float* s, int64_t gw, float* d, int64_t ds) {
  int64_t J = 0;
  for (; J + 8 <= gw; J += 8) {
    F8::V r[8];
    for (int i = 0; i < 8; ++i) r[i] = F8::load(s + (J + i) * 8);
    transpose8(r);
    for (int b = 0; b < 8; ++b) F8::store(d + b * ds + J, r[b]);
  }
  for (; J < gw; ++J)
    for (int b = 0; b < 8; ++b) d[b * ds + J] = s[J * 8 + b];
}

inline void unpack_row8(const float* s, int64_t ss, int64_t gw, float* d) {
  int64_t J = 0;
  for (; J + 8 <= gw; J += 8) {
    F8::V r[8];
    for (int b = 0; b < 8; ++b) r[b] = F8::load(s + b * ss + J);
    transpose8(r);
    for (int i = 0; i < 8; ++i) F8::store(d + (J + i) * 8, r[i]);
  }
  for (; J < gw; ++J)
    for (int b = 0; b < 8; ++b) d[J * 8 + b] = s[b * ss + J];
}

// Entry points.
template <class T>
void softmax_fwd(T* S, int64_t L, int64_t Lp, T scale, T* lse) {
  Rows<T>::softmax_fwd(S, L, Lp, scale, lse);
}
template <class T>
void softmax_bwd(const T* P, T* dP, int64_t L, int64_t Lp, T scale) {
  Rows<T>::softmax_bwd(P, dP, L, Lp, scale);
}

}  // namespace FASTCTX_ISA_NS
}  // namespace isa_cpu
}  // namespace fastctx
