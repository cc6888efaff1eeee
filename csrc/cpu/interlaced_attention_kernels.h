// Interlaced sparse self-attention (ISANet), CPU: the element-wise row passes of one group's
// L x L attention matrix (softmax forward, softmax backward). The launcher, the packing of a
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
// vectors. The passes give the padding P = 0 and dS = 0; the padding of the dP rows must hold
// finite values (the launcher's scratch starts zeroed and the GEMMs never write it).

#ifndef FASTCTX_ISA_NS
#error "interlaced_attention_kernels.h: define FASTCTX_ISA_NS (a namespace name) before including"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace fastctx {
namespace isa_cpu {
namespace FASTCTX_ISA_NS {

template <class T>
struct Rows {
  static constexpr int VL = 32 / static_cast<int>(sizeof(T));  // 8 floats, 4 doubles
  typedef T V __attribute__((vector_size(32)));

  static inline V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static inline V bcast(T s) {
    V v;
    for (int l = 0; l < VL; ++l) v[l] = s;
    return v;
  }
  static inline V vmax(V a, V b) { return a > b ? a : b; }
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

  // exp, lane-wise. float: Cephes expf (range reduction by ln 2, degree-6 polynomial, about
  // 1 ulp), 0 below ln(FLT_MIN) (so exp(-inf) = 0). double: std::exp per lane.
  static inline V vexp(V x) {
    if constexpr (std::is_same<T, float>::value) {
      typedef int32_t VI __attribute__((vector_size(32)));
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
      return x < lo ? bcast(0.0f) : res;
    } else {
      V y;
      for (int l = 0; l < VL; ++l) y[l] = std::exp(x[l]);
      return y;
    }
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

  // Backward: S (energies) -> P = exp(scale * S - lse); dP -> scale * P * (dP - D) with
  // D = sum_m P dP (= <dout, out> of the row's query).
  static void softmax_bwd(T* S, T* dP, int64_t L, int64_t Lp, T scale, const T* lse) {
    const T ninf = -std::numeric_limits<T>::infinity();
    const V sc = bcast(scale);
    for (int64_t l = 0; l < L; ++l) {
      T* row = S + l * Lp;
      T* drow = dP + l * Lp;
      const V lv = bcast(lse[l]);
      for (int64_t m = 0; m < Lp; m += VL) store(row + m, sc * load(row + m));
      for (int64_t m = L; m < Lp; ++m) row[m] = ninf;
      V d = bcast(T(0));
      for (int64_t m = 0; m < Lp; m += VL) {
        const V p = vexp(load(row + m) - lv);
        store(row + m, p);
        d += p * load(drow + m);
      }
      const V dv = bcast(hsum(d));
      for (int64_t m = 0; m < Lp; m += VL)
        store(drow + m, sc * load(row + m) * (load(drow + m) - dv));
    }
  }
};

// Entry points.
template <class T>
void softmax_fwd(T* S, int64_t L, int64_t Lp, T scale, T* lse) {
  Rows<T>::softmax_fwd(S, L, Lp, scale, lse);
}
template <class T>
void softmax_bwd(T* S, T* dP, int64_t L, int64_t Lp, T scale, const T* lse) {
  Rows<T>::softmax_bwd(S, dP, L, Lp, scale, lse);
}

}  // namespace FASTCTX_ISA_NS
}  // namespace isa_cpu
}  // namespace fastctx
