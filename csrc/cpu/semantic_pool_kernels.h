// Semantic pooling (ISNet's per-class pooling), CPU kernels: the per-task work of fastctx::sp_fwd,
// sp_bwd and sp_scatter. Launchers, checks and registration: semantic_pool.cpp. Contract and
// backward math: shared/docs/OPERATORS.md section 5.
//
// NO INCLUDE GUARD, on purpose: semantic_pool.cpp includes this file once per instruction set,
// each time with FASTCTX_SP_ISA naming a namespace (and, for AVX2, under
// `#pragma GCC target("avx2,fma")`), as region_attention_kernels.h is; the launcher picks one at
// run time with a CPU feature test.
//
// Layout (NCHW): per image, feats is a C x N matrix whose pixel axis n is the stride-1 axis,
// logits K x N; labels and w are length-N vectors; regions is C x K. Channels-last feats and
// logits (N x C, N x K) are read in place by the _nhwc variants and segsum_rows(nhwc).
//
// - argmax_block: the labels (strict '>' over k = 1..K-1: ties keep the lowest index, an all
//   -inf pixel gets class 0) and the winning logit of a block of pixels, vectorised along n.
// - segsum_rows: out[r][k] = sum over the pixels n of class k of w[n] * x[r][n] (w = 1 without
//   HAS_W) for kRows channel rows at once. A block of kPack pixels of the rows is packed
//   transposed ([n][kRows]) so that each pixel adds one contiguous kRows-vector into the
//   accumulator row of its class ([k][kRows], in L1). One pass over the pixels in order: the
//   result does not depend on the number of threads.
// - bwd_block: for a block of pixels, dfeats[c][n] = w[n] * dr[c][lab[n]] and
//   dot[n] = sum_c dr[c][lab[n]] * f[c][n] (c in order), then the dlogits columns of the block:
//   w[n] * (dot[n] - drr[k]) at k = lab[n], 0 elsewhere.

#ifndef FASTCTX_SP_ISA
#error "semantic_pool_kernels.h: define FASTCTX_SP_ISA (a namespace name) before including"
#endif

#include <algorithm>
#include <cstdint>

#ifndef FASTCTX_SP_CPU_CONSTS_DEFINED
#define FASTCTX_SP_CPU_CONSTS_DEFINED
namespace fastctx {
namespace sp_cpu {
constexpr int64_t kRows = 16;   // channel rows per segmented-sum task
constexpr int64_t kPack = 256;  // pixels packed per step of the segmented sum
}  // namespace sp_cpu
}  // namespace fastctx
#endif

namespace fastctx {
namespace sp_cpu {
namespace FASTCTX_SP_ISA {

// labels and winning logit of pixels [0, np) of a block; lg: the block's first pixel of class 0.
template <class T>
void argmax_block(const T* __restrict__ lg, int64_t N, int64_t K, int64_t np,
                  T* __restrict__ best, int64_t* __restrict__ lab) {
  for (int64_t j = 0; j < np; ++j) {
    best[j] = lg[j];
    lab[j] = 0;
  }
  for (int64_t k = 1; k < K; ++k) {
    const T* __restrict__ row = lg + k * N;
    for (int64_t j = 0; j < np; ++j) {
      const T v = row[j];
      const bool gt = v > best[j];
      best[j] = gt ? v : best[j];
      lab[j] = gt ? k : lab[j];
    }
  }
}

// The same for a block of a channels-last map: the pixels' K logits are contiguous, pixel j's at
// lg + j * K.
template <class T>
void argmax_block_nhwc(const T* __restrict__ lg, int64_t K, int64_t np, T* __restrict__ best,
                       int64_t* __restrict__ lab) {
  for (int64_t j = 0; j < np; ++j) {
    const T* __restrict__ px = lg + j * K;
    T b = px[0];
    int64_t l = 0;
    for (int64_t k = 1; k < K; ++k) {
      const bool gt = px[k] > b;
      b = gt ? px[k] : b;
      l = gt ? k : l;
    }
    best[j] = b;
    lab[j] = l;
  }
}

// acc [K][kRows] (scratch), pack [kPack][kRows] (scratch); x: rows x N (row stride N), or, nhwc,
// N pixels of C channels (x: the first pixel's first row; the rows are contiguous in a pixel);
// out: rows x K (row stride K).
template <bool HAS_W, class T>
void segsum_rows(const T* __restrict__ x, bool nhwc, int64_t C, const int64_t* __restrict__ lab,
                 const T* __restrict__ w, int64_t N, int64_t K, int64_t rows,
                 T* __restrict__ acc, T* __restrict__ pack, T* __restrict__ out) {
  std::fill(acc, acc + K * kRows, T(0));
  if (rows < kRows) std::fill(pack, pack + kPack * kRows, T(0));
  for (int64_t n0 = 0; n0 < N; n0 += kPack) {
    const int64_t np = std::min(kPack, N - n0);
    if (nhwc) {
      for (int64_t j = 0; j < np; ++j) {
        const T* __restrict__ src = x + (n0 + j) * C;
        for (int64_t r = 0; r < rows; ++r) pack[j * kRows + r] = src[r];
      }
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        const T* __restrict__ src = x + r * N + n0;
        for (int64_t j = 0; j < np; ++j) pack[j * kRows + r] = src[j];
      }
    }
    for (int64_t j = 0; j < np; ++j) {
      T* __restrict__ a = acc + lab[n0 + j] * kRows;
      const T* __restrict__ p = pack + j * kRows;
      if (HAS_W) {
        const T ww = w[n0 + j];
        for (int64_t r = 0; r < kRows; ++r) a[r] += ww * p[r];
      } else {
        for (int64_t r = 0; r < kRows; ++r) a[r] += p[r];
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k) out[r * K + k] = acc[k * kRows + r];
}

// The dlogits columns of a block of np pixels (dl: the block's first pixel of class 0, row
// stride N): w[n] * (dot[n] - drr[k]) at k = lab[n], 0 elsewhere.
template <class T>
void dlogits_block(const T* __restrict__ drr, const int64_t* __restrict__ lab,
                   const T* __restrict__ w, const T* __restrict__ dot, int64_t N, int64_t K,
                   int64_t np, T* __restrict__ dl) {
  for (int64_t k = 0; k < K; ++k) {
    T* __restrict__ dlrow = dl + k * N;
    const T d = drr[k];
    for (int64_t j = 0; j < np; ++j) dlrow[j] = lab[j] == k ? w[j] * (dot[j] - d) : T(0);
  }
}

// One block of np pixels of one image. f, df: the block's first pixel of channel 0 (row stride
// N); dl likewise for dlogits (K rows); dr: C x K; drr: K; lab, w: the block's labels / weights;
// dot: np values of scratch.
template <class T>
void bwd_block(const T* __restrict__ f, const T* __restrict__ dr, const T* __restrict__ drr,
               const int64_t* __restrict__ lab, const T* __restrict__ w, int64_t N, int64_t C,
               int64_t K, int64_t np, T* __restrict__ dot, T* __restrict__ df,
               T* __restrict__ dl) {
  std::fill(dot, dot + np, T(0));
  for (int64_t c = 0; c < C; ++c) {
    const T* __restrict__ drow = dr + c * K;
    const T* __restrict__ frow = f + c * N;
    T* __restrict__ dfrow = df + c * N;
    for (int64_t j = 0; j < np; ++j) {
      const T g = drow[lab[j]];
      dfrow[j] = w[j] * g;
      dot[j] += g * frow[j];
    }
  }
  dlogits_block<T>(drr, lab, w, dot, N, K, np, dl);
}

// bwd_block for a channels-last f (pixel j's C channels at f + j * C): the same dfeats (NCHW, row
// stride N) and dlogits; dot[j] = <drT[lab[j]], f_j> over c in 8 interleaved partial sums (then
// added in a fixed order), drT: K x C, the transpose of dr.
template <class T>
void bwd_block_nhwc(const T* __restrict__ f, const T* __restrict__ dr, const T* __restrict__ drT,
                    const T* __restrict__ drr, const int64_t* __restrict__ lab,
                    const T* __restrict__ w, int64_t N, int64_t C, int64_t K, int64_t np,
                    T* __restrict__ dot, T* __restrict__ df, T* __restrict__ dl) {
  constexpr int64_t kLanes = 8;
  for (int64_t j = 0; j < np; ++j) {
    const T* __restrict__ fj = f + j * C;
    const T* __restrict__ g = drT + lab[j] * C;
    T part[kLanes] = {};
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) part[l] += g[c + l] * fj[c + l];
    T d = 0;
    for (; c < C; ++c) d += g[c] * fj[c];
    for (int64_t l = 0; l < kLanes; ++l) d += part[l];
    dot[j] = d;
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* __restrict__ drow = dr + c * K;
    T* __restrict__ dfrow = df + c * N;
    for (int64_t j = 0; j < np; ++j) dfrow[j] = w[j] * drow[lab[j]];
  }
  dlogits_block<T>(drr, lab, w, dot, N, K, np, dl);
}

}  // namespace FASTCTX_SP_ISA
}  // namespace sp_cpu
}  // namespace fastctx
