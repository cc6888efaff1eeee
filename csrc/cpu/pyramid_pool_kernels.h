// Pyramid pool (ANN), CPU kernels: the per-plane work of fastctx::pp_fwd / pp_bwd. Launchers,
// checks, the bin plan and registration: pyramid_pool.cpp. Semantics: shared/docs/OPERATORS.md
// section 3.
//
// NO INCLUDE GUARD, on purpose: pyramid_pool.cpp includes this file once per instruction set,
// each time with FASTCTX_PP_ISA naming a namespace (and, for AVX2, under
// `#pragma GCC target("avx2,fma")`), as region_attention_kernels.h does; the launcher picks one
// at run time. The loops are plain element-wise loops along a stride-1 axis (the width, or the
// channels of a channels_last map), left to the compiler's vectoriser.
//
// Design, per (b, c) plane (one task; planes are independent, so results do not depend on the
// thread count):
// - An "acc row" is one row bin (scale, i) of one scale: R = sum(s) of them (18 for 1, 3, 6, 8).
// - Forward: one pass over the plane's rows. Row h is added (vector adds along w) into the acc
//   rows of every row bin that contains it (one or two per scale); then each key (scale, i, j)
//   sums its columns of its acc row and multiplies by 1 / area. The plane is read once whatever
//   the number of scales; acc holds R x W values (9 KiB for the defaults at W = 128).
//   Channels-last maps go by an image and kWide channels at a time, a row's column-bin sums
//   first, vector adds along the channels (fwd_image_cl); other maps whose columns are not
//   stride-1 by chunks of kChunk planes, the same as a plane with acc [R][W][kChunk]
//   (fwd_planes_strided).
// - Backward: each acc row g(scale, i)[w] = sum over the column bins j containing w of
//   dout[key] / area; then dx row h = the sum of the acc rows of its row bins, in plan order, and
//   each row of dx is written once.
// Accumulation in T: float for float16 / bfloat16 / float32 inputs, double for float64.

#ifndef FASTCTX_PP_ISA
#error "pyramid_pool_kernels.h: define FASTCTX_PP_ISA (a namespace name) before including"
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

// Shared by every instruction set (defined once): the bin plan of one call.
#ifndef FASTCTX_PP_CPU_PLAN_DEFINED
#define FASTCTX_PP_CPU_PLAN_DEFINED
namespace fastctx {
namespace pp_cpu {

// Planes (channels) handled together when the columns are not stride-1: 16 float32 channels of
// a pixel are one 64-byte cache line in channels_last.
constexpr int64_t kChunk = 16;

// Index arrays of the bins of one call (every array owned by the launcher).
struct Plan {
  int64_t H, W;
  int64_t R;                // acc rows: one per (scale, row bin)
  int64_t S;                // keys: one per (scale, row bin, column bin)
  const int64_t* row_ptr;   // [H + 1]: the acc rows that contain image row h are
  const int64_t* row_idx;   //   row_idx[row_ptr[h] .. row_ptr[h + 1]), in increasing order
  const int64_t* key_row;   // [S]: acc row of key k
  const int64_t* key_c0;    // [S]: first column of key k
  const int64_t* key_c1;    // [S]: one past its last column
  const double* key_inv;    // [S]: 1 / area
  // Column bins (scale, j), R of them in the acc rows' order (for channels-last maps):
  const int64_t* col_ptr;   // [W + 1]: the column bins that contain column w are
  const int64_t* col_idx;   //   col_idx[col_ptr[w] .. col_ptr[w + 1]), in increasing order
  const int64_t* key_col;   // [S]: column bin of key k
  const int64_t* row_key0;  // [R + 1]: the keys of row bin r are row_key0[r] .. row_key0[r + 1)
};

// Channels handled together by one task of a channels-last map (fwd_image_cl): 64 float32
// channels are four cache lines of every pixel.
constexpr int64_t kWide = 64;

}  // namespace pp_cpu
}  // namespace fastctx
#endif  // FASTCTX_PP_CPU_PLAN_DEFINED

namespace fastctx {
namespace pp_cpu {
namespace FASTCTX_PP_ISA {

// sum of a[w0 .. w1), in kLanes interleaved partial sums (one vector of accumulators instead of a
// chain of dependent scalar adds), then added lane by lane: a fixed order.
constexpr int64_t kLanes = 8;
template <class T>
inline T sum_range(const T* __restrict a, int64_t w0, int64_t w1) {
  T part[kLanes] = {};
  int64_t w = w0;
  for (; w + kLanes <= w1; w += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) part[l] += a[w + l];
  T s = 0;
  for (; w < w1; ++w) s += a[w];
  for (int64_t l = 0; l < kLanes; ++l) s += part[l];
  return s;
}

// Adds image row h (src, W values) into the acc rows of the row bins that contain it.
template <class T>
inline void add_row(const Plan& p, const T* __restrict src, int64_t h, T* __restrict acc) {
  const int64_t W = p.W;
  for (int64_t e = p.row_ptr[h]; e < p.row_ptr[h + 1]; ++e) {
    T* __restrict a = acc + p.row_idx[e] * W;
    for (int64_t w = 0; w < W; ++w) a[w] += src[w];
  }
}

// out[k] = the column sum of key k's acc row over its columns, times 1 / area.
template <class X, class T>
inline void finish_plane(const Plan& p, const T* acc, X* __restrict out) {
  for (int64_t k = 0; k < p.S; ++k)
    out[k] = static_cast<X>(sum_range(acc + p.key_row[k] * p.W, p.key_c0[k], p.key_c1[k]) *
                            static_cast<T>(p.key_inv[k]));
}

// out[k] = mean of x over key k's bin, for one plane. x: row h at x + h * sh (stride-1 columns);
// acc: R * W scratch; rowbuf: W scratch (the row converted to T when X is a 16-bit type).
template <class X, class T>
void fwd_plane(const Plan& p, const X* x, int64_t sh, T* __restrict acc, T* __restrict rowbuf,
               X* __restrict out) {
  const int64_t W = p.W;
  std::fill(acc, acc + p.R * W, T(0));
  for (int64_t h = 0; h < p.H; ++h) {
    if constexpr (std::is_same<X, T>::value) {
      add_row<T>(p, x + h * sh, h, acc);
    } else {
      const X* __restrict xr = x + h * sh;
      for (int64_t w = 0; w < W; ++w) rowbuf[w] = static_cast<T>(xr[w]);
      add_row<T>(p, rowbuf, h, acc);
    }
  }
  finish_plane<X, T>(p, acc, out);
}

// The same for NC planes (channel stride sc) whose columns are not stride-1 and whose channels
// are not either (a transposed map; channels-last ones go by fwd_image_cl), vectorised along
// the channels: acc is [R][W][NC] and every pixel's NC channels are added together, so x is
// still read once. NC <= kChunk (a compile-time width for full chunks, the tail's nc
// otherwise); acc: R * W * kChunk scratch; out: nc rows of S values.
template <class X, class T, int64_t NC>
void fwd_planes_strided(const Plan& p, const X* x, int64_t sc, int64_t sh, int64_t sw,
                        int64_t nc_tail, T* __restrict acc, X* __restrict out) {
  const int64_t W = p.W, nc = NC > 0 ? NC : nc_tail;
  std::fill(acc, acc + p.R * W * nc, T(0));
  for (int64_t h = 0; h < p.H; ++h) {
    const X* xr = x + h * sh;
    for (int64_t e = p.row_ptr[h]; e < p.row_ptr[h + 1]; ++e) {
      T* __restrict a = acc + p.row_idx[e] * W * nc;
      for (int64_t w = 0; w < W; ++w) {
        const X* __restrict px = xr + w * sw;
        T* __restrict aw = a + w * nc;
        for (int64_t c = 0; c < nc; ++c) aw[c] += static_cast<T>(px[c * sc]);
      }
    }
  }
  T part[kChunk];
  for (int64_t k = 0; k < p.S; ++k) {
    for (int64_t c = 0; c < nc; ++c) part[c] = 0;
    const T* a = acc + p.key_row[k] * W * nc;
    for (int64_t w = p.key_c0[k]; w < p.key_c1[k]; ++w)
      for (int64_t c = 0; c < nc; ++c) part[c] += a[w * nc + c];
    const T inv = static_cast<T>(p.key_inv[k]);
    for (int64_t c = 0; c < nc; ++c) out[c * p.S + k] = static_cast<X>(part[c] * inv);
  }
}

// The same for nc <= kWide channels of one image of a channels-last map (channels at stride 1,
// pixels sh / sw apart), read in memory order, a pixel's nc channels at a time. Per map row h:
// colsum[cb][c] = the sum of the row's pixels in column bin cb (one per (scale, j), plan order);
// then each key of each row bin that contains h adds its column bin's colsum. keyacc: S * nc
// scratch, colsum: R * nc; out: nc rows of S values (row stride S). (Adding rows into
// [R][W][nc] accumulators as fwd_planes_strided does read each pixel's 16 channels, one cache
// line, per task: at C = 512 a task stepped through the map 2 KiB at a time.)
template <class X, class T, int64_t NC>
void fwd_image_cl(const Plan& p, const X* x, int64_t sh, int64_t sw, int64_t nc_tail,
                  T* __restrict keyacc, T* __restrict colsum, X* __restrict out) {
  const int64_t nc = NC > 0 ? NC : nc_tail;
  std::fill(keyacc, keyacc + p.S * nc, T(0));
  for (int64_t h = 0; h < p.H; ++h) {
    std::fill(colsum, colsum + p.R * nc, T(0));
    const X* xr = x + h * sh;
    for (int64_t w = 0; w < p.W; ++w) {
      const X* __restrict px = xr + w * sw;
      for (int64_t e = p.col_ptr[w]; e < p.col_ptr[w + 1]; ++e) {
        T* __restrict a = colsum + p.col_idx[e] * nc;
        for (int64_t c = 0; c < nc; ++c) a[c] += static_cast<T>(px[c]);
      }
    }
    for (int64_t e = p.row_ptr[h]; e < p.row_ptr[h + 1]; ++e) {
      const int64_t r = p.row_idx[e];
      for (int64_t k = p.row_key0[r]; k < p.row_key0[r + 1]; ++k) {
        T* __restrict a = keyacc + k * nc;
        const T* __restrict cs = colsum + p.key_col[k] * nc;
        for (int64_t c = 0; c < nc; ++c) a[c] += cs[c];
      }
    }
  }
  for (int64_t k = 0; k < p.S; ++k) {
    const T inv = static_cast<T>(p.key_inv[k]);
    const T* a = keyacc + k * nc;
    for (int64_t c = 0; c < nc; ++c) out[c * p.S + k] = static_cast<X>(a[c] * inv);
  }
}

// dx (one contiguous H x W plane) from dout[S] (T) of one plane; g: R * W scratch, rowbuf: W.
template <class X, class T>
void bwd_plane(const Plan& p, const T* __restrict dout, T* __restrict g, T* __restrict rowbuf,
               X* __restrict dx) {
  const int64_t W = p.W;
  std::fill(g, g + p.R * W, T(0));
  for (int64_t k = 0; k < p.S; ++k) {
    T* a = g + p.key_row[k] * W;
    const T val = dout[k] * static_cast<T>(p.key_inv[k]);
    for (int64_t w = p.key_c0[k]; w < p.key_c1[k]; ++w) a[w] += val;
  }
  for (int64_t h = 0; h < p.H; ++h) {
    T* __restrict dst;
    if constexpr (std::is_same<X, T>::value) {
      dst = dx + h * W;
    } else {
      dst = rowbuf;
    }
    const int64_t e0 = p.row_ptr[h], e1 = p.row_ptr[h + 1];  // e1 > e0: every row is in a bin
    const T* __restrict first = g + p.row_idx[e0] * W;
    for (int64_t w = 0; w < W; ++w) dst[w] = first[w];
    for (int64_t e = e0 + 1; e < e1; ++e) {
      const T* __restrict a = g + p.row_idx[e] * W;
      for (int64_t w = 0; w < W; ++w) dst[w] += a[w];
    }
    if constexpr (!std::is_same<X, T>::value) {
      X* __restrict xr = dx + h * W;
      for (int64_t w = 0; w < W; ++w) xr[w] = static_cast<X>(rowbuf[w]);
    }
  }
}

}  // namespace FASTCTX_PP_ISA
}  // namespace pp_cpu
}  // namespace fastctx
