// Vector helpers of the CPU kernels: GCC vector types of VL lanes with loads, stores, broadcast
// and a vectorised exp (Vec<T, VL>), register-blocked GEMM kernels and the loop that drives them
// over pixel windows (RegGemm), the softmax of one row of attention energies and its backward
// (SoftmaxRow), an 8 x 8 transpose of floats (transpose8, transpose8_move) and the packing of
// pixels of a channels-last map (pack_pixels, pack_nhwc; RegGemm::pack_map for either layout).
// Kernels derive from one of them.
//
// NO INCLUDE GUARD, on purpose: a kernels header includes this file once per instruction set,
// with FASTCTX_VEC_ISA naming the namespace (and, for AVX2, under
// `#pragma GCC target("avx2,fma")`), so these helpers are compiled once for the baseline target
// and once for AVX2 + FMA, next to the kernels that use them (see cpu::use_avx2 in common.h).
#ifndef FASTCTX_VEC_ISA
#error "vec.h: define FASTCTX_VEC_ISA (a namespace name) before including"
#endif

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

namespace fastctx {
namespace cpu {
namespace FASTCTX_VEC_ISA {

template <class T, int VL>
struct VecType {
  typedef T type __attribute__((vector_size(sizeof(T) * VL)));
};
template <class T>
struct VecType<T, 1> {
  typedef T type;
};

template <class T, int VL>
struct Vec {
  typedef typename VecType<T, VL>::type V;

  static inline V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static inline V zero() { return V{}; }
  // (Not V{} + s: adding +0.0 is no identity for -0.0, so the add would stay in the code; an
  // initialiser list of VL copies becomes one broadcast.)
  template <size_t... I>
  static inline V bcast_impl(T s, std::index_sequence<I...>) {
    return V{(static_cast<void>(I), s)...};
  }
  static inline V bcast(T s) {
    if constexpr (VL == 1) {
      return s;
    } else {
      return bcast_impl(s, std::make_index_sequence<VL>{});
    }
  }
  // Lanes [lo, VL) of p; the others 0.
  static inline V load_lo(const T* p, int lo) {
    if (lo == 0) return load(p);
    T tmp[VL];
    for (int l = 0; l < VL; ++l) tmp[l] = l < lo ? T(0) : p[l];
    return load(tmp);
  }
  // Stores lanes [lo, VL) only.
  static inline void store_lo(T* p, V v, int lo) {
    if (lo == 0) return store(p, v);
    T tmp[VL];
    store(tmp, v);
    for (int l = lo; l < VL; ++l) p[l] = tmp[l];
  }
  static inline V vmax(V a, V b) { return a > b ? a : b; }
  static inline T lane(V v, int l) {
    if constexpr (VL == 1) {
      (void)l;
      return v;
    } else {
      return v[l];
    }
  }

  // exp, lane-wise. float: Cephes expf (range reduction by ln 2, degree-6 polynomial, about
  // 1 ulp), 0 below ln(FLT_MIN) (so exp(-inf) = 0). Other types: std::exp per lane.
  static inline V vexp(V x) {
    if constexpr (VL > 1 && std::is_same<T, float>::value) {
      typedef int32_t VI __attribute__((vector_size(sizeof(T) * VL)));
      const V lo = bcast(-87.33654475f), hi = bcast(88.0f);
      const V xc = x < lo ? lo : (x > hi ? hi : x);
      const V magic = bcast(12582912.0f);  // 1.5 * 2^23: (t + magic) - magic rounds t
      const V n = (xc * bcast(1.44269504088896341f) + magic) - magic;
      V r = xc - n * bcast(0.693359375f);
      r = r - n * bcast(-2.12194440e-4f);
      const V z = r * r;
      V p = bcast(1.9875691500e-4f);
      p = p * r + bcast(1.3981999507e-3f);
      p = p * r + bcast(8.3334519073e-3f);
      p = p * r + bcast(4.1665795894e-2f);
      p = p * r + bcast(1.6666665459e-1f);
      p = p * r + bcast(5.0000001201e-1f);
      p = p * z + r + bcast(1.0f);
      const VI e = (__builtin_convertvector(n, VI) + 127) << 23;
      V two_n;
      std::memcpy(&two_n, &e, sizeof(V));
      const V res = p * two_n;
      return x < lo ? zero() : res;
    } else if constexpr (VL > 1) {
      V y;
      for (int l = 0; l < VL; ++l) y[l] = std::exp(x[l]);
      return y;
    } else {
      return std::exp(x);
    }
  }
};

// An 8 x 8 block of floats in eight 8-lane vectors, transposed in registers: r[i][l] becomes
// r[l][i].
typedef int32_t I8 __attribute__((vector_size(32)));
static inline void transpose8(typename Vec<float, 8>::V* r) {
  typedef typename Vec<float, 8>::V F;
  const I8 lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
  const I8 s44 = {0, 1, 8, 9, 4, 5, 12, 13}, sEE = {2, 3, 10, 11, 6, 7, 14, 15};
  const I8 p20 = {0, 1, 2, 3, 8, 9, 10, 11}, p31 = {4, 5, 6, 7, 12, 13, 14, 15};
  F t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shuffle(r[i], r[i + 1], lo);
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shuffle(t[i], t[i + 2], s44);
    u[i + 1] = __builtin_shuffle(t[i], t[i + 2], sEE);
    u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], s44);
    u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], sEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = __builtin_shuffle(u[i], u[i + 4], p20);
    r[i + 4] = __builtin_shuffle(u[i], u[i + 4], p31);
  }
}

// Moves an 8 x 8 block of floats and transposes it: dst[j * ds + i] = src[i * ss + j] (8 rows
// of src, ss apart, become 8 columns of dst, whose rows are ds apart).
static inline void transpose8_move(const float* src, int64_t ss, float* dst, int64_t ds) {
  typename Vec<float, 8>::V r[8];
  for (int i = 0; i < 8; ++i) r[i] = Vec<float, 8>::load(src + i * ss);
  transpose8(r);
  for (int i = 0; i < 8; ++i) Vec<float, 8>::store(dst + i * ds, r[i]);
}

// dst[c * ds + n] = src[n * sn + c] for n < nb, c < C: nb pixels sn apart, each a run of C
// contiguous channels (of a channels-last map), as C rows of nb values. Floats: 8 x 8 blocks
// transposed in registers (transpose8_move), the rest element by element.
template <class T>
static inline void pack_pixels(const T* __restrict src, int64_t sn, int64_t C, int64_t nb,
                               T* __restrict dst, int64_t ds) {
  int64_t n8 = 0, c8 = 0;  // pixels and channels done by the blocks
  if constexpr (std::is_same<T, float>::value) {
    n8 = nb / 8 * 8;
    c8 = C / 8 * 8;
    for (int64_t n = 0; n < n8; n += 8)
      for (int64_t c = 0; c < c8; c += 8) transpose8_move(src + n * sn + c, sn, dst + c * ds + n, ds);
  }
  for (int64_t n = 0; n < nb; ++n)
    for (int64_t c = n < n8 ? c8 : 0; c < C; ++c) dst[c * ds + n] = src[n * sn + c];
}

// The NCHW packing of a pixel block of a channels-last map: its nb pixels, each a row of C
// channels, as C rows of nb values.
template <class T>
static inline void pack_nhwc(const T* __restrict src, int64_t C, int64_t nb, T* __restrict dst,
                             int64_t ds) {
  pack_pixels(src, C, C, nb, dst, ds);
}

// The register-blocked GEMM kernels of the CPU attention kernels, and gemm(), the loop over
// chunks of K, panels and rows that region attention and spatial gather drive them with (over
// the pixel windows of windows(), in blocks packed by pack()). Register block kernel<R, NV>:
// C[r * cms + col[t]] (= or +=) sum_{kk < K} A[r * ams + kk] * B[kk * bks + col[t]] for r < R,
// t < NV (col[t]: column of vector t, in B and in C alike; A broadcast, B and C vectors of VL
// lanes). pick(mr, nr) returns kernel<mr, nr> for mr <= MRmax, nr <= NR; rows_for(nr) the rows
// of a block of nr vectors.
template <class T, int VL, int MR, int NR, int MRmax>
struct RegGemm : Vec<T, VL> {
  typedef Vec<T, VL> Base;
  typedef typename Base::V V;
  using Base::bcast;
  using Base::load;
  using Base::store;
  using Base::zero;

  template <int R, int NV>
  static void kernel(const T* __restrict A, int64_t ams, const T* __restrict B, int64_t bks,
                     const int64_t* col, int64_t K, T* __restrict C, int64_t cms, bool acc_in) {
    V acc[R][NV];
    const T* bp[NV];
    const T* ap[R];
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t) bp[t] = B + col[t];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) ap[r] = A + r * ams;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int t = 0; t < NV; ++t) acc[r][t] = acc_in ? load(C + r * cms + col[t]) : zero();
    for (int64_t kk = 0; kk < K; ++kk) {
      V bv[NV];
#pragma GCC unroll 8
      for (int t = 0; t < NV; ++t) bv[t] = load(bp[t] + kk * bks);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const V a = bcast(ap[r][kk]);
#pragma GCC unroll 8
        for (int t = 0; t < NV; ++t) acc[r][t] += a * bv[t];
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int t = 0; t < NV; ++t) store(C + r * cms + col[t], acc[r][t]);
  }

  typedef void (*KernelFn)(const T*, int64_t, const T*, int64_t, const int64_t*, int64_t, T*,
                           int64_t, bool);
  template <int... I>
  static KernelFn pick_impl(int mr, int nr, std::integer_sequence<int, I...>) {
    static const KernelFn table[] = {&kernel<I / NR + 1, I % NR + 1>...};
    return table[(mr - 1) * NR + (nr - 1)];
  }
  static KernelFn pick(int mr, int nr) {
    return pick_impl(mr, nr, std::make_integer_sequence<int, MRmax * NR>{});
  }
  // 12 accumulators for nr = 3 or 2 (with NR = 3, MR = 4), MRmax rows for nr = 1.
  static int rows_for(int nr) { return nr == NR ? MR : nr == 2 ? 6 : MRmax; }

  // Prefetch rows [r0, r1) of A (row stride ams), columns [0, K).
  static void prefetch_rows(const T* A, int64_t ams, int64_t r0, int64_t r1, int64_t K) {
    const int64_t bytes = K * static_cast<int64_t>(sizeof(T));
    for (int64_t r = r0; r < r1; ++r) {
      const uintptr_t a = reinterpret_cast<uintptr_t>(A + r * ams);
      for (uintptr_t l = a & ~uintptr_t(63); l < a + bytes; l += 64)
        __builtin_prefetch(reinterpret_cast<const void*>(l), 0, 3);
    }
  }

  // C[m * cms + col[w]] (= or +=) sum_{kk < K} A[m * ams + kk] * B[kk * bks + col[w]] for m < M
  // and the nw vectors w. K is split into equal chunks of at most kmax. Loop order within a
  // chunk: panels of NR vectors, blocks of rows (the chunk x NR panel of B stays in L1 while
  // the rows of A stream past it; a last panel of fewer vectors takes more rows per block), or
  // with rows_outer, blocks of MR rows, panels (each block of rows of A is read once, from
  // memory, while B stays in L2; with prefetch_a the rows two blocks ahead are prefetched).
  // K == 0 stores zeros (or leaves C as it is when accumulating).
  // Windows may overlap (windows(): a block's last one is shifted back). With K in several
  // chunks, a column of two windows in different panels would take the later chunks twice (each
  // panel loads C, adds its chunk, stores), so an overlapping last window gets its own pass over
  // the whole K after the others: it stores the column's full sum again. Callers that
  // accumulate into C pass windows that do not overlap.
  static void gemm(const T* A, int64_t ams, const T* B, int64_t bks, int64_t M, int64_t K,
                   const int64_t* col, int64_t nw, T* C, int64_t cms, bool accumulate,
                   int64_t kmax, bool rows_outer, bool prefetch_a = false) {
    const int64_t nchunk = std::max<int64_t>(1, (K + kmax - 1) / kmax);
    if (nchunk > 1 && nw > 1 && col[nw - 1] < col[nw - 2] + VL) {
      gemm(A, ams, B, bks, M, K, col, nw - 1, C, cms, accumulate, kmax, rows_outer, prefetch_a);
      gemm(A, ams, B, bks, M, K, col + nw - 1, 1, C, cms, accumulate, K, rows_outer, prefetch_a);
      return;
    }
    for (int64_t ch = 0; ch < nchunk; ++ch) {
      const int64_t k0 = K * ch / nchunk, kn = K * (ch + 1) / nchunk - k0;
      const bool acc_in = accumulate || ch > 0;
      auto block = [&](int64_t m0, int mr, int64_t w0, int nr) {
        pick(mr, nr)(A + m0 * ams + k0, ams, B + k0 * bks, bks, col + w0, kn, C + m0 * cms, cms,
                     acc_in);
      };
      if (rows_outer) {
        if (prefetch_a) prefetch_rows(A + k0, ams, 0, std::min<int64_t>(2 * MR, M), kn);
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, M - m0));
          if (prefetch_a)
            prefetch_rows(A + k0, ams, std::min(M, m0 + 2 * MR), std::min(M, m0 + 3 * MR), kn);
          for (int64_t w0 = 0; w0 < nw; w0 += NR)
            block(m0, mr, w0, static_cast<int>(std::min<int64_t>(NR, nw - w0)));
        }
      } else {
        for (int64_t w0 = 0; w0 < nw; w0 += NR) {
          const int nr = static_cast<int>(std::min<int64_t>(NR, nw - w0));
          const int rows = rows_for(nr);
          for (int64_t m0 = 0; m0 < M; m0 += rows)
            block(m0, static_cast<int>(std::min<int64_t>(rows, M - m0)), w0, nr);
        }
      }
    }
  }

  // Windows of a block of nb pixels: columns w * VL, the last one shifted to end at nb.
  static int64_t windows(int64_t nb, int64_t* col) {
    const int64_t nw = (nb + VL - 1) / VL;
    for (int64_t w = 0; w < nw; ++w) col[w] = std::min<int64_t>(w * VL, nb - VL);
    return nw;
  }

  // dst[c * NBcap + j] = src[c * N + j] for c < C, j < nb, prefetching kAhead rows ahead.
  static void pack(const T* __restrict src, int64_t C, int64_t N, int64_t nb, T* __restrict dst,
                   int64_t NBcap) {
    constexpr int64_t kAhead = 8;
    const int64_t bytes = nb * static_cast<int64_t>(sizeof(T));
    prefetch_rows(src, N, 0, std::min(kAhead, C), nb);
    for (int64_t c = 0; c < C; ++c) {
      if (c + kAhead < C) prefetch_rows(src, N, c + kAhead, c + kAhead + 1, nb);
      std::memcpy(dst + c * NBcap, src + c * N, bytes);
    }
  }

  // The columns of pixels [n0, n0 + nb) of one image into dst ([C][NBcap]): from an NCHW image
  // (C rows of N pixels: pack) or, nhwc, from a channels-last one (N rows of C: pack_nhwc).
  static void pack_map(const T* __restrict img, bool nhwc, int64_t C, int64_t N, int64_t n0,
                       int64_t nb, T* __restrict dst, int64_t NBcap) {
    if (nhwc)
      pack_nhwc(img + n0 * C, C, nb, dst, NBcap);
    else
      pack(img + n0, C, N, nb, dst, NBcap);
  }
};

// One row of attention energies (criss-cross's [column | row] of a pixel, an interlaced group's
// row): Ld values, a whole number of 32-byte vectors, of which the first L are real.
template <class T>
struct SoftmaxRow : Vec<T, 32 / static_cast<int>(sizeof(T))> {
  static constexpr int VL = 32 / static_cast<int>(sizeof(T));  // 8 floats, 4 doubles
  typedef Vec<T, VL> Base;
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

  // Energies -> weights, in place: e = scale * row, e[masked] = -inf if masked >= 0 (set after
  // the scaling: 0 * -inf would be NaN), the padding -inf, P = softmax(e). Returns the
  // log-sum-exp of e. The row must hold a finite energy.
  static T fwd(T* row, int64_t L, int64_t Ld, int64_t masked, T scale) {
    const T ninf = -std::numeric_limits<T>::infinity();
    const V sc = bcast(scale);
    for (int64_t m = 0; m < Ld; m += VL) store(row + m, sc * load(row + m));
    if (masked >= 0) row[masked] = ninf;
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
  // row's query). P from fwd (0 at the masked entry and the padding); the padding of dP must be
  // finite.
  static void bwd(const T* P, T* dP, int64_t Ld, T scale) {
    const V sc = bcast(scale);
    V d = bcast(T(0));
    for (int64_t m = 0; m < Ld; m += VL) d += load(P + m) * load(dP + m);
    const V dv = bcast(hsum(d));
    for (int64_t m = 0; m < Ld; m += VL) store(dP + m, sc * load(P + m) * (load(dP + m) - dv));
  }
};

}  // namespace FASTCTX_VEC_ISA
}  // namespace cpu
}  // namespace fastctx
