// Layout changes of the CPU kernels' inputs: a channels-last map into NCHW (prepare() in
// common.h; the launcher is layout.cpp).
//
// NO INCLUDE GUARD, on purpose: layout.cpp includes this file once per instruction set, with
// FASTCTX_LAYOUT_ISA naming a namespace (and, for AVX2, under `#pragma GCC target("avx2,fma")`),
// as the kernels headers of the ops do.

#ifndef FASTCTX_LAYOUT_ISA
#error "layout_kernels.h: define FASTCTX_LAYOUT_ISA (a namespace name) before including"
#endif

#include <cstdint>

#define FASTCTX_VEC_ISA FASTCTX_LAYOUT_ISA
#include "vec.h"
#undef FASTCTX_VEC_ISA

namespace fastctx {
namespace cpu {
namespace FASTCTX_LAYOUT_ISA {

// Positions [n0, n0 + nn) of one image: s holds N rows (positions) of C values, d C rows of N
// (vec.h's pack_nhwc: 8 x 8 blocks of floats transposed in registers, the rest element by
// element).
template <class T>
void nhwc_to_nchw(const T* s, T* d, int64_t C, int64_t N, int64_t n0, int64_t nn) {
  pack_nhwc(s + n0 * C, C, nn, d + n0, N);
}

}  // namespace FASTCTX_LAYOUT_ISA
}  // namespace cpu
}  // namespace fastctx
