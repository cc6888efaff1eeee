// Layout changes of the CPU kernels' inputs: a channels-last map into NCHW (prepare() in
// common.h; the launcher is layout.cpp).
//
// NO INCLUDE GUARD, on purpose: layout.cpp includes this file once per instruction set, with
// FASTCTX_LAYOUT_ISA naming a namespace (and, for AVX2, under `#pragma GCC target("avx2,fma")`),
// as the kernels headers of the ops do.

#ifndef FASTCTX_LAYOUT_ISA
#error "layout_kernels.h: define FASTCTX_LAYOUT_ISA (a namespace name) before including"
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

#define FASTCTX_VEC_ISA FASTCTX_LAYOUT_ISA
#include "vec.h"
#undef FASTCTX_VEC_ISA

namespace fastctx {
namespace cpu {
namespace FASTCTX_LAYOUT_ISA {

// Positions [n0, n0 + nn) of one image: s holds N rows (positions) of C values, d C rows of N.
// float: blocks of 8 positions x 8 channels transposed in registers (transpose8_move), the rest
// element by element; double: element by element, in tiles of 16 x 16.
template <class T>
void nhwc_to_nchw(const T* s, T* d, int64_t C, int64_t N, int64_t n0, int64_t nn) {
  int64_t c0 = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (nn == 8)
      for (; c0 + 8 <= C; c0 += 8) transpose8_move(s + n0 * C + c0, C, d + c0 * N + n0, N);
  }
  for (; c0 < C; c0 += 16) {
    const int64_t cn = std::min<int64_t>(16, C - c0);
    for (int64_t c = c0; c < c0 + cn; ++c)
      for (int64_t n = n0; n < n0 + nn; ++n) d[c * N + n] = s[n * C + c];
  }
}

}  // namespace FASTCTX_LAYOUT_ISA
}  // namespace cpu
}  // namespace fastctx
