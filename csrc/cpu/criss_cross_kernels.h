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

// Columns [j0, j0 + tn) of an NCHW image x (C planes of H x W) and their packed copy d[t][c][y]
// (tn x C x H: one contiguous C x H matrix per column): Pack copies x into d (pack_cols), !Pack
// d back into x (unpack_cols). Floats: 8 x 8 blocks (8 rows y, 8 columns) moved as 8 vectors and
// transposed in registers; the rest (the last H % 8 rows, the last tn % 8 columns, doubles)
// element by element, per channel tn passes over its H rows (the same cache lines, from L1 after
// the first).
template <bool Pack, class T>
void move_cols(T* x, int64_t C, int64_t H, int64_t W, int64_t j0, int64_t tn, T* d) {
  const int64_t HW = H * W, CH = C * H;
  int64_t y8 = 0, t8 = 0;  // rows and columns done by the blocks
  if constexpr (std::is_same<T, float>::value) {
    y8 = H / 8 * 8;
    t8 = tn / 8 * 8;
    for (int64_t c = 0; c < C; ++c)
      for (int64_t y0 = 0; y0 < y8; y0 += 8)
        for (int64_t tb = 0; tb < t8; tb += 8) {
          float* m = x + c * HW + y0 * W + j0 + tb;  // 8 rows of 8 columns, stride W
          float* p = d + tb * CH + c * H + y0;      // 8 columns of 8 rows, stride CH
          if (Pack) cpu::FASTCTX_CC_ISA::transpose8_move(m, W, p, CH);
          else cpu::FASTCTX_CC_ISA::transpose8_move(p, CH, m, W);
        }
  }
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < tn; ++t) {
      T* m = x + c * HW + j0 + t;
      T* p = d + t * CH + c * H;
      for (int64_t y = t < t8 ? y8 : 0; y < H; ++y) {
        if (Pack) p[y] = m[y * W];
        else m[y * W] = p[y];
      }
    }
}

// A pixel's joint softmax (vec.h's SoftmaxRow): the own pixel is counted once, in its row, so
// entry `self` of the column part is masked; the row part always holds the own pixel.
template <class T>
T softmax_fwd(T* row, int64_t L, int64_t Ld, int64_t self, T scale) {
  return cpu::FASTCTX_CC_ISA::SoftmaxRow<T>::fwd(row, L, Ld, self, scale);
}
template <class T>
void softmax_bwd(const T* P, T* dP, int64_t Ld, T scale) {
  cpu::FASTCTX_CC_ISA::SoftmaxRow<T>::bwd(P, dP, Ld, scale);
}

}  // namespace FASTCTX_CC_ISA
}  // namespace cc_cpu
}  // namespace fastctx
