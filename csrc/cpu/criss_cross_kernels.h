// Criss-cross attention (CCNet), CPU: the element-wise passes of fastctx::cc_fwd / cc_bwd (one
// pixel's joint softmax over its column and its row, forward and backward) and the packing of a
// tile of columns. The launchers, the GEMMs and the design notes are in criss_cross.cpp.
//
// NO INCLUDE GUARD, on purpose: criss_cross.cpp includes this file once per instruction set,
// each time with FASTCTX_CC_ISA naming a namespace (and, for AVX2, under
// `#pragma GCC target("avx2,fma")`), so the passes are compiled for the baseline target and for
// AVX2 + FMA and the launcher picks one at run time (GCC's target_clones dispatcher tests the CPU
// *model* and never picks the AVX2 clone on AMD parts). The entry points take no vector-typed
// arguments.
//
// A pixel's energy row: Ld values, the H column energies (key rows y), then the W row energies
// (key columns x), then Ld - H - W padding (Ld: H + W rounded up to the vector width).

#ifndef FASTCTX_CC_ISA
#error "criss_cross_kernels.h: define FASTCTX_CC_ISA (a namespace name) before including"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#define FASTCTX_VEC_ISA FASTCTX_CC_ISA
#include "vec.h"
#undef FASTCTX_VEC_ISA

#ifndef FASTCTX_CC_CPU_TILE_DEFINED
#define FASTCTX_CC_CPU_TILE_DEFINED
namespace fastctx {
namespace cc_cpu {
constexpr int64_t kTile = 16;  // columns per tile of the column parts: 64 bytes of float
}  // namespace cc_cpu
}  // namespace fastctx
#endif

namespace fastctx {
namespace cc_cpu {
namespace FASTCTX_CC_ISA {

template <class T>
struct Rows : cpu::FASTCTX_CC_ISA::Vec<T, 32 / static_cast<int>(sizeof(T))> {
  static constexpr int VL = 32 / static_cast<int>(sizeof(T));  // 8 floats, 4 doubles
  typedef cpu::FASTCTX_CC_ISA::Vec<T, VL> Base;
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

  // Energies -> weights, in place: e = scale * row, e[self] = -inf (the query's own pixel is
  // counted once, in its row: entry `self` of the column part), the padding -inf, P = softmax(e).
  // Returns the log-sum-exp of e. The row part always holds the own pixel: the max is finite.
  static T softmax_fwd(T* row, int64_t L, int64_t Ld, int64_t self, T scale) {
    const T ninf = -std::numeric_limits<T>::infinity();
    const V sc = bcast(scale);
    for (int64_t m = 0; m < Ld; m += VL) store(row + m, sc * load(row + m));
    row[self] = ninf;
    for (int64_t m = L; m < Ld; ++m) row[m] = ninf;
    V mx = bcast(ninf);
    for (int64_t m = 0; m < Ld; m += VL) mx = vmax(mx, load(row + m));
    const V mv = bcast(hmax(mx));
    V sum = bcast(T(0));
    for (int64_t m = 0; m < Ld; m += VL) {
      const V p = vexp(load(row + m) - mv);
      store(row + m, p);
      sum += p;
    }
    const T s = hsum(sum);
    const V inv = bcast(T(1) / s);
    for (int64_t m = 0; m < Ld; m += VL) store(row + m, load(row + m) * inv);
    return mv[0] + std::log(s);
  }

  // dP -> dE * scale = scale * P * (dP - D), in place, with D = sum P dP (= <dout, out> of the
  // pixel). P from softmax_fwd (0 at the own column entry and the padding); the padding of dP
  // must be finite.
  static void softmax_bwd(const T* P, T* dP, int64_t Ld, T scale) {
    const V sc = bcast(scale);
    V d = bcast(T(0));
    for (int64_t m = 0; m < Ld; m += VL) d += load(P + m) * load(dP + m);
    const V dv = bcast(hsum(d));
    for (int64_t m = 0; m < Ld; m += VL) store(dP + m, sc * load(P + m) * (load(dP + m) - dv));
  }
};

// Columns [j0, j0 + tn) of an NCHW image x (C planes of H x W) -> d[t][c][y] (tn x C x H): one
// contiguous C x H matrix per column. Floats: 8 x 8 blocks (8 rows y, 8 columns) loaded as 8
// vectors, transposed in registers, stored as 8 runs of 8 y; the rest (the last H % 8 rows, the
// last tn % 8 columns, doubles) element by element, per channel tn passes over its H rows (the
// same cache lines, from L1 after the first).
template <class T>
void pack_cols(const T* x, int64_t C, int64_t H, int64_t W, int64_t j0, int64_t tn, T* d) {
  const int64_t HW = H * W, CH = C * H;
  int64_t y8 = 0, t8 = 0;  // rows and columns done by the blocks
  if constexpr (std::is_same<T, float>::value) {
    typedef cpu::FASTCTX_CC_ISA::Vec<float, 8> F8;
    y8 = H / 8 * 8;
    t8 = tn / 8 * 8;
    for (int64_t c = 0; c < C; ++c)
      for (int64_t y0 = 0; y0 < y8; y0 += 8)
        for (int64_t tb = 0; tb < t8; tb += 8) {
          const float* s = x + c * HW + y0 * W + j0 + tb;
          float* o = d + tb * CH + c * H + y0;
          F8::V r[8];
          for (int i = 0; i < 8; ++i) r[i] = F8::load(s + i * W);
          cpu::FASTCTX_CC_ISA::transpose8(r);
          for (int t = 0; t < 8; ++t) F8::store(o + t * CH, r[t]);
        }
  }
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < tn; ++t) {
      const T* s = x + c * HW + j0 + t;
      T* o = d + t * CH + c * H;
      for (int64_t y = t < t8 ? y8 : 0; y < H; ++y) o[y] = s[y * W];
    }
}

// The inverse: x[c, y, j0 + t] = s[t][c][y].
template <class T>
void unpack_cols(const T* s, int64_t C, int64_t H, int64_t W, int64_t j0, int64_t tn, T* x) {
  const int64_t HW = H * W, CH = C * H;
  int64_t y8 = 0, t8 = 0;
  if constexpr (std::is_same<T, float>::value) {
    typedef cpu::FASTCTX_CC_ISA::Vec<float, 8> F8;
    y8 = H / 8 * 8;
    t8 = tn / 8 * 8;
    for (int64_t c = 0; c < C; ++c)
      for (int64_t y0 = 0; y0 < y8; y0 += 8)
        for (int64_t tb = 0; tb < t8; tb += 8) {
          const float* i = s + tb * CH + c * H + y0;
          float* o = x + c * HW + y0 * W + j0 + tb;
          F8::V r[8];
          for (int t = 0; t < 8; ++t) r[t] = F8::load(i + t * CH);
          cpu::FASTCTX_CC_ISA::transpose8(r);
          for (int y = 0; y < 8; ++y) F8::store(o + y * W, r[y]);
        }
  }
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < tn; ++t) {
      const T* i = s + t * CH + c * H;
      T* o = x + c * HW + j0 + t;
      for (int64_t y = t < t8 ? y8 : 0; y < H; ++y) o[y * W] = i[y];
    }
}

// Entry points.
template <class T>
T softmax_fwd(T* row, int64_t L, int64_t Ld, int64_t self, T scale) {
  return Rows<T>::softmax_fwd(row, L, Ld, self, scale);
}
template <class T>
void softmax_bwd(const T* P, T* dP, int64_t Ld, T scale) {
  Rows<T>::softmax_bwd(P, dP, Ld, scale);
}

}  // namespace FASTCTX_CC_ISA
}  // namespace cc_cpu
}  // namespace fastctx
