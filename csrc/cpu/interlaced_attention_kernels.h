// Interlaced sparse self-attention (ISANet), CPU: the vector code of the packing of bands with
// 8-wide blocks and of channels-last bands (float32), and the element-wise row passes of one
// group's L x L attention matrix (softmax forward, softmax backward from the kept weights P). The
// launcher, the rest of the packing and the GEMMs are in interlaced_attention.cpp.
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

// Long mode's packing when bw is 8 or 4 (float), for one channel and one phase of a band: member
// l = I * gw + J of the phase's BW groups has its BW values, one per group, at
// s + off[I] + J * BW (row I of the phase, off[I] its offset); pack_members writes them out group
// by group, d[b * ds + l] (b < BW, l < L), transposing BW members at a time in registers (the
// last L % BW element by element); unpack_members is the inverse. Stepping over members, not map
// rows, keeps the stores (loads) to the packed groups whole vectors for any gw: a row holds only
// gw members per group, fewer than 8 for maps below 64 columns.
using cpu::FASTCTX_ISA_NS::transpose8;
typedef cpu::FASTCTX_ISA_NS::Vec<float, 8> V8;

// A 4 x 4 block of floats in four 4-lane vectors, transposed in registers: r[i][l] becomes
// r[l][i].
typedef int32_t I4 __attribute__((vector_size(16)));
inline void transpose4(typename cpu::FASTCTX_ISA_NS::Vec<float, 4>::V* r) {
  const I4 lo = {0, 4, 1, 5}, hi = {2, 6, 3, 7}, p01 = {0, 1, 4, 5}, p23 = {2, 3, 6, 7};
  const auto t0 = __builtin_shuffle(r[0], r[1], lo), t1 = __builtin_shuffle(r[0], r[1], hi);
  const auto t2 = __builtin_shuffle(r[2], r[3], lo), t3 = __builtin_shuffle(r[2], r[3], hi);
  r[0] = __builtin_shuffle(t0, t2, p01);
  r[1] = __builtin_shuffle(t0, t2, p23);
  r[2] = __builtin_shuffle(t1, t3, p01);
  r[3] = __builtin_shuffle(t1, t3, p23);
}

template <int BW>
struct Block {
  typedef cpu::FASTCTX_ISA_NS::Vec<float, BW> V;
  static inline void transpose(typename V::V* r) {
    if constexpr (BW == 8)
      transpose8(r);
    else
      transpose4(r);
  }
};

// The members' offsets in order: I, J with l = I * gw + J, member l at off[I] + J * step
// (step: the values a member spans along its row, BW in an NCHW row, bw pixels channels-last).
struct Members {
  const int64_t* off;
  int64_t gw, step, I = 0, J = 0;
  int64_t next() {
    const int64_t o = off[I] + J * step;
    if (++J == gw) J = 0, ++I;
    return o;
  }
};

template <int BW>
inline void pack_members(const float* s, const int64_t* off, int64_t gw, int64_t L, float* d,
                         int64_t ds) {
  typedef typename Block<BW>::V V;
  Members m{off, gw, BW};
  typename V::V r[BW];
  int64_t l = 0;
  for (; l + BW <= L; l += BW) {
    for (int i = 0; i < BW; ++i) r[i] = V::load(s + m.next());
    Block<BW>::transpose(r);
    for (int b = 0; b < BW; ++b) V::store(d + b * ds + l, r[b]);
  }
  for (; l < L; ++l) {
    const float* sl = s + m.next();
    for (int b = 0; b < BW; ++b) d[b * ds + l] = sl[b];
  }
}

template <int BW>
inline void unpack_members(const float* s, int64_t ss, const int64_t* off, int64_t gw, int64_t L,
                           float* d) {
  typedef typename Block<BW>::V V;
  Members m{off, gw, BW};
  typename V::V r[BW];
  int64_t l = 0;
  for (; l + BW <= L; l += BW) {
    for (int b = 0; b < BW; ++b) r[b] = V::load(s + b * ss + l);
    Block<BW>::transpose(r);
    for (int i = 0; i < BW; ++i) V::store(d + m.next(), r[i]);
  }
  for (; l < L; ++l) {
    float* dl = d + m.next();
    for (int b = 0; b < BW; ++b) dl[b] = s[b * ss + l];
  }
}

// Entry points of the two (bw 8 or 4).
inline void pack_members(int bw, const float* s, const int64_t* off, int64_t gw, int64_t L,
                         float* d, int64_t ds) {
  if (bw == 8) return pack_members<8>(s, off, gw, L, d, ds);
  pack_members<4>(s, off, gw, L, d, ds);
}

inline void unpack_members(int bw, const float* s, int64_t ss, const int64_t* off, int64_t gw,
                           int64_t L, float* d) {
  if (bw == 8) return unpack_members<8>(s, ss, off, gw, L, d);
  unpack_members<4>(s, ss, off, gw, L, d);
}

// Short mode's packing when bw is 8 or 4 (float), for one channel of a band: its `rows` map rows
// (sH apart) hold the runs of BW members of n groups, s[r * sH + J * BW + b] for group J, member
// r * BW + b, written to d[J * ds + r * BW + b]; unpack_runs is the inverse. One call per channel
// and band (a call per map row cost more than its two or four vector copies on 16x16 maps).
template <int BW>
inline void pack_runs(const float* s, int64_t sH, int64_t rows, int64_t n, float* d, int64_t ds) {
  typedef typename Block<BW>::V V;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t J = 0; J < n; ++J) V::store(d + J * ds + r * BW, V::load(s + r * sH + J * BW));
}

template <int BW>
inline void unpack_runs(const float* s, int64_t ss, int64_t rows, int64_t n, float* d,
                        int64_t dH) {
  typedef typename Block<BW>::V V;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t J = 0; J < n; ++J) V::store(d + r * dH + J * BW, V::load(s + J * ss + r * BW));
}

inline void pack_runs(int bw, const float* s, int64_t sH, int64_t rows, int64_t n, float* d,
                      int64_t ds) {
  if (bw == 8) return pack_runs<8>(s, sH, rows, n, d, ds);
  pack_runs<4>(s, sH, rows, n, d, ds);
}

inline void unpack_runs(int bw, const float* s, int64_t ss, int64_t rows, int64_t n, float* d,
                        int64_t dH) {
  if (bw == 8) return unpack_runs<8>(s, ss, rows, n, d, dH);
  unpack_runs<4>(s, ss, rows, n, d, dH);
}

// Long mode's packing of a channels-last map (float), for one group of a band and a chunk of C
// channels: member l = I * gw + J at s + off[I] + J * sJ (row I of the group's phase, off[I] its
// offset; sJ: bw pixels), its channels contiguous; written d[c * ds + l] (c < C, l < L).
// 8 members x 8 channels at a time are transposed in registers (the last L % 8 members and C % 8
// channels element by element); stepping over members, not map rows, keeps the blocks whole
// when a row holds a number of members that is not a multiple of 8 (13 on 104x104 maps).
inline void pack_members_cl(const float* s, const int64_t* off, int64_t gw, int64_t sJ, int64_t L,
                            int64_t C, float* d, int64_t ds) {
  const float* p[8];
  Members m{off, gw, sJ};
  int64_t l = 0;
  const int64_t C8 = C / 8 * 8;
  for (; l + 8 <= L; l += 8) {
    for (int i = 0; i < 8; ++i) p[i] = s + m.next();
    V8::V r[8];
    for (int64_t c = 0; c < C8; c += 8) {
      for (int i = 0; i < 8; ++i) r[i] = V8::load(p[i] + c);
      transpose8(r);
      for (int i = 0; i < 8; ++i) V8::store(d + (c + i) * ds + l, r[i]);
    }
    for (int64_t c = C8; c < C; ++c)
      for (int i = 0; i < 8; ++i) d[c * ds + l + i] = p[i][c];
  }
  for (; l < L; ++l) {
    const float* a = s + m.next();
    for (int64_t c = 0; c < C; ++c) d[c * ds + l] = a[c];
  }
}

// Short mode's (float): d[c * ds + n] = s[n * sn + c] for the n < nb pixels of a block row
// (sn apart) and c < C channels (vec.h's pack_pixels: 8 x 8 blocks transposed in registers).
inline void pack_pixels(const float* s, int64_t sn, int64_t C, int64_t nb, float* d, int64_t ds) {
  cpu::FASTCTX_ISA_NS::pack_pixels(s, sn, C, nb, d, ds);
}

// The GEMMs of groups of L <= 8 members (float), where a BLAS call costs more than its
// arithmetic (long mode on small maps: 16x16 with block 8x8 has groups of 4, and a forward made
// 384 calls of 4 x 4 x 128). X, Y: packed chunks [cn][L] (row stride L); M: an L x L matrix of
// row stride ldm >= 8 (S, P, dS: the scratch rows of Lp); results:
//   small_atb: C[l][m] (+)= sum_c X[c][l] Y[c][m]  (S = Q^T K, dP = dO^T V), C of row stride ldc;
//   small_abt: C[c][l] = sum_m X[c][m] M[l][m]     (O = V P^T, dQ = K dS^T), C [cn][L];
//   small_ab:  C[c][m] = sum_l X[c][l] M[l][m]     (dV = dO P, dK = Q dS), C [cn][L].
// Only the L x L or cn x L results are written; the sums run over c, m or l in order.
inline V8::V load_n(const float* p, int64_t n) {
  float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) t[i] = p[i];
  return V8::load(t);
}

inline void store_n(float* p, V8::V v, int64_t n) {
  float t[8];
  V8::store(t, v);
  for (int64_t i = 0; i < n; ++i) p[i] = t[i];
}

inline void small_atb(const float* X, const float* Y, int64_t cn, int64_t L, float* C, int64_t ldc,
                      bool accumulate) {
  V8::V acc[8];
  for (int64_t l = 0; l < L; ++l) acc[l] = accumulate ? load_n(C + l * ldc, L) : V8::zero();
  for (int64_t c = 0; c < cn; ++c) {
    const V8::V y = load_n(Y + c * L, L);
    for (int64_t l = 0; l < L; ++l) acc[l] += V8::bcast(X[c * L + l]) * y;
  }
  for (int64_t l = 0; l < L; ++l) store_n(C + l * ldc, acc[l], L);
}

inline void small_abt(const float* X, int64_t cn, int64_t L, const float* M, int64_t ldm, float* C) {
  V8::V mt[8];  // mt[m][l] = M[l][m]
  for (int64_t m = 0; m < L; ++m) {
    float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t l = 0; l < L; ++l) t[l] = M[l * ldm + m];
    mt[m] = V8::load(t);
  }
  for (int64_t c = 0; c < cn; ++c) {
    V8::V o = V8::zero();
    for (int64_t m = 0; m < L; ++m) o += V8::bcast(X[c * L + m]) * mt[m];
    store_n(C + c * L, o, L);
  }
}

inline void small_ab(const float* X, int64_t cn, int64_t L, const float* M, int64_t ldm, float* C) {
  V8::V mr[8];
  for (int64_t l = 0; l < L; ++l) mr[l] = load_n(M + l * ldm, L);
  for (int64_t c = 0; c < cn; ++c) {
    V8::V o = V8::zero();
    for (int64_t l = 0; l < L; ++l) o += V8::bcast(X[c * L + l]) * mr[l];
    store_n(C + c * L, o, L);
  }
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
