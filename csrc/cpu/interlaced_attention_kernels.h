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

// Long mode's packing when bw == 8 (float): one map row holds gw runs of the 8 groups' members,
// s[J * 8 + b] for group b, member J; pack_row8 writes them out group by group,
// d[b * ds + J] (b < 8, J < gw), transposing 8 x 8 blocks in registers (the last gw % 8 members
// element by element); unpack_row8 is the inverse, d[J * 8 + b] = s[b * ss + J].
using cpu::FASTCTX_ISA_NS::transpose8_move;

inline void pack_row8(const float* s, int64_t gw, float* d, int64_t ds) {
  int64_t J = 0;
  for (; J + 8 <= gw; J += 8) transpose8_move(s + J * 8, 8, d + J, ds);
  for (; J < gw; ++J)
    for (int b = 0; b < 8; ++b) d[b * ds + J] = s[J * 8 + b];
}

inline void unpack_row8(const float* s, int64_t ss, int64_t gw, float* d) {
  int64_t J = 0;
  for (; J + 8 <= gw; J += 8) transpose8_move(s + J, ss, d + J * 8, 8);
  for (; J < gw; ++J)
    for (int b = 0; b < 8; ++b) d[J * 8 + b] = s[b * ss + J];
}

// Entry points. The row passes (vec.h's SoftmaxRow), over a group's L x L matrix: row l holds
// the L energies of query l against the group's keys, then Lp - L padding columns.
// Forward: S -> P = softmax(scale * S) per row; lse[l] the row's log-sum-exp of scale * S.
template <class T>
void softmax_fwd(T* S, int64_t L, int64_t Lp, T scale, T* lse) {
  for (int64_t l = 0; l < L; ++l)
    lse[l] = cpu::FASTCTX_ISA_NS::SoftmaxRow<T>::fwd(S + l * Lp, L, Lp, -1, scale);
}
// Backward: dP -> scale * P * (dP - D), D = sum_m P dP, P the forward's weights.
template <class T>
void softmax_bwd(const T* P, T* dP, int64_t L, int64_t Lp, T scale) {
  for (int64_t l = 0; l < L; ++l)
    cpu::FASTCTX_ISA_NS::SoftmaxRow<T>::bwd(P + l * Lp, dP + l * Lp, Lp, scale);
}

}  // namespace FASTCTX_ISA_NS
}  // namespace isa_cpu
}  // namespace fastctx
