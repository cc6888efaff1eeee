// Spatial gather (OCR's soft region pooling), CPU kernels: the per-task work of fastctx::sg_fwd /
// sg_bwd. Launchers, checks and registration: spatial_gather.cpp. Contract:
// shared/docs/OPERATORS.md section 4 (spatial_gather).
//
// NO INCLUDE GUARD, on purpose (the pattern of region_attention_kernels.h): spatial_gather.cpp
// includes this file once per instruction set, each time with FASTCTX_SG_ISA naming a namespace
// (and, for AVX2 and AVX-512, under `#pragma GCC target(...)`) and FASTCTX_SG_VEC_BYTES its
// vector width (32 or 64); the launcher picks one at run time (Geom::vbytes).
//
// Design (NCHW: per image, feats is a C x N matrix F and logits a K x N matrix L, pixel axis n
// stride 1; R = regions[b] is C x K; channels-last feats or logits are read as they are and
// transposed into that layout block by block, vec.h's pack_nhwc):
// - One register-blocked GEMM kernel, 4 rows x 3 vectors (8 x 1 for a last narrow panel):
//     C[m][col] (+)= sum_kk A[m][kk] * B[kk][col]     (A broadcast, B and C vectors along col)
//   used three ways:
//     R  [c][k] += sum_n F[c][n] * Pt[n][k]       forward (vectors along classes; Pt: the block's
//                                                  softmax numerators, transposed, [nb][Kp])
//     G  [k][n]  = sum_c dRT[k][c] * Fb[c][n]     backward (vectors along pixels; Fb: the block's
//                                                  feats packed, dRT: dregions transposed)
//     dF [c][n]  = sum_k dR[c][k] * W[k][n]       backward, straight into the NCHW dfeats
// - Forward: a task is a fixed pixel range (chunk) of one image; it streams the range in blocks of
//   kFwdNB pixels with an online softmax per class: running max M[k] and sum L[k] of
//   exp(scale * l - M[k]); when a block raises M[k], the task's partial R column k and L[k] are
//   multiplied by exp(M_old - M_new) before the block is added. Each task leaves (R, M, L) in its
//   own partial buffer; the launcher merges the chunks of an image in chunk order. The chunks
//   depend only on N, so the result is bit-identical run to run and for any thread count.
//   Nothing of size K x N is stored: per-thread scratch holds one block's Pt.
// - Backward, per block of pixels (no reduction over pixels, so blocks are independent):
//   W = exp(scale * l - lse), G = dR^T F, dlogits = scale * W * (G - D) with D[k] =
//   sum_c dR[c][k] R[c][k] (from the saved regions), dfeats = dR W.
// - Pixel vectors in the backward: a block of nb pixels (NB = kNBW * VL, a last block of fewer
//   than VL pixels merged into the one before) is covered by windows of VL lanes, the last one
//   shifted left to end at the block's last pixel (its overlap is recomputed with the same
//   arithmetic): no load or store leaves the block. VL = 1 when N < vec_lanes.
// - A class whose logits are all -inf: M stays -inf, its exps use 0 as the max (exp(-inf) = 0),
//   R = 0, lse = -inf; the backward uses +inf for its lse, so W = 0 and every gradient is 0.

#ifndef FASTCTX_SG_ISA
#error "spatial_gather_kernels.h: define FASTCTX_SG_ISA (a namespace name) before including"
#endif
#ifndef FASTCTX_SG_VEC_BYTES
#error "spatial_gather_kernels.h: define FASTCTX_SG_VEC_BYTES (32 or 64) before including"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#define FASTCTX_VEC_ISA FASTCTX_SG_ISA
#include "vec.h"
#undef FASTCTX_VEC_ISA
#include <vector>

// Shared by every instruction set (defined once): blocking constants, geometry, task arguments.
#ifndef FASTCTX_SG_CPU_ARGS_DEFINED
#define FASTCTX_SG_CPU_ARGS_DEFINED
namespace fastctx {
namespace sg_cpu {

constexpr int kMR = 4;                  // GEMM register block: rows (broadcast operand)
constexpr int kNR = 3;                  // GEMM register block: vectors
constexpr int kMRmax = 8;               // GEMM register block: rows when a panel has 1 vector
constexpr int64_t kFwdNB = 256;         // forward: pixels per block
constexpr int64_t kFwdSub = 64;         // forward, channels-last feats: pixels per packed panel
constexpr int64_t kChunkPixels = 1024;  // forward: pixels per task, at least (unless N is less)
constexpr int64_t kMaxChunks = 8;       // forward: tasks per image, at most
constexpr int64_t kNBW = 12;            // backward: windows (vectors) per pixel block
constexpr int64_t kKC = 256;            // GEMM: reduction chunk over channels (G)
constexpr int64_t kKS = 128;            // GEMM: reduction chunk over classes (dfeats)

template <class T>
constexpr int64_t vec_lanes(int64_t bytes = 32) {
  return bytes / static_cast<int64_t>(sizeof(T));
}

// Blocking of one image (the same for every image of a call; it depends only on N and K).
struct Geom {
  int64_t vbytes;   // vector bytes of the instruction set that runs it (32: AVX2, 64: AVX-512)
  int64_t VL;       // vector lanes (1 when N < vec_lanes)
  int64_t NB;       // backward: pixels of a full block
  int64_t NBcap;    // backward: scratch columns of a block (the largest, rounded up to VL)
  int64_t nblocks;  // backward: blocks per image
  int64_t Kp;       // K rounded up to VL (forward: columns of Pt and of the partial R)
  int64_t nchunk;   // forward: tasks (pixel chunks) per image
};

template <class T>
Geom make_geom(int64_t N, int64_t K, int64_t vbytes = 32) {
  Geom g;
  g.vbytes = vbytes;
  g.VL = N >= vec_lanes<T>(vbytes) ? vec_lanes<T>(vbytes) : 1;
  g.NB = kNBW * g.VL;
  g.nblocks = std::max<int64_t>(1, (N + g.NB - 1) / g.NB);
  if (g.nblocks > 1 && N - (g.nblocks - 1) * g.NB < g.VL) --g.nblocks;  // merge a short tail
  g.NBcap = (std::max(g.NB, N - (g.nblocks - 1) * g.NB) + g.VL - 1) / g.VL * g.VL;
  g.Kp = (K + g.VL - 1) / g.VL * g.VL;
  g.nchunk = std::min<int64_t>(kMaxChunks, std::max<int64_t>(1, N / kChunkPixels));
  return g;
}

// Pixels [p0, p1) of forward chunk c.
inline void chunk_range(const Geom& g, int64_t N, int64_t c, int64_t& p0, int64_t& p1) {
  p0 = N * c / g.nchunk;
  p1 = N * (c + 1) / g.nchunk;
}

// First pixel and pixel count of backward block t.
inline void block_range(const Geom& g, int64_t N, int64_t t, int64_t& n0, int64_t& nb) {
  n0 = t * g.NB;
  nb = t == g.nblocks - 1 ? N - n0 : g.NB;
}

// Per-thread scratch and per-task partial sizes (elements). Channels-last inputs add their
// packed columns: the forward's feats panel [C][kFwdSub] and logits block [K][kFwdNB], the
// backward's logits block [K][NBcap] (its feats go to Fb as NCHW feats do).
inline int64_t fwd_scratch(const Geom& g, int64_t C, int64_t K, bool f_nhwc, bool l_nhwc) {
  return (kFwdNB + 1) * g.Kp + (f_nhwc ? C * kFwdSub : 0) + (l_nhwc ? K * kFwdNB : 0);
}
inline int64_t fwd_partial(const Geom& g, int64_t C) { return (C + 2) * g.Kp; }
inline int64_t bwd_scratch(const Geom& g, int64_t C, int64_t K, bool l_nhwc) {
  return (C + 2 * K + (l_nhwc ? K : 0)) * g.NBcap;
}

// Forward arguments (pointers at image 0; every tensor contiguous).
template <class T>
struct FwdArgs {
  const T* f;  // [B, C, N], or [B, N, C] when f_nhwc
  const T* l;  // [B, K, N], or [B, N, K] when l_nhwc
  int64_t C, K, N;
  T scale;
  bool f_nhwc, l_nhwc;  // channels-last maps, read as they are
};

// Backward arguments.
template <class T>
struct BwdArgs {
  const T* f;    // [B, C, N], or [B, N, C] when f_nhwc
  const T* l;    // [B, K, N], or [B, N, K] when l_nhwc
  const T* dR;   // [B, C, K]
  const T* dRT;  // [B, K, C]  (dR transposed)
  const T* lse;  // [B, K]
  const T* D;    // [B, K]     sum_c dR * R
  T* df;         // [B, C, N]
  T* dl;         // [B, K, N]
  int64_t C, K, N;
  T scale;
  bool f_nhwc, l_nhwc;  // channels-last maps, read as they are
};

}  // namespace sg_cpu
}  // namespace fastctx
#endif  // FASTCTX_SG_CPU_ARGS_DEFINED

namespace fastctx {
namespace sg_cpu {
namespace FASTCTX_SG_ISA {

template <class T, int VL>
struct Kern : cpu::FASTCTX_SG_ISA::RegGemm<T, VL, kMR, kNR, kMRmax> {
  typedef cpu::FASTCTX_SG_ISA::RegGemm<T, VL, kMR, kNR, kMRmax> Base;
  typedef typename Base::V V;
  using Base::bcast;
  using Base::gemm;
  using Base::lane;
  using Base::load;
  using Base::pack_map;
  using Base::store;
  using Base::vexp;
  using Base::vmax;
  using Base::windows;
  using Base::zero;

  static T hmax(V v) {
    T r = lane(v, 0);
    for (int l = 1; l < VL; ++l) r = std::max(r, lane(v, l));
    return r;
  }
  static T hsum(V v) {
    T r = lane(v, 0);
    for (int l = 1; l < VL; ++l) r += lane(v, l);
    return r;
  }

  // max_j x[j], j < n (n >= 1).
  static T row_max(const T* x, int64_t n) {
    V m = bcast(-std::numeric_limits<T>::infinity());
    int64_t j = 0;
    for (; j + VL <= n; j += VL) m = vmax(m, load(x + j));
    T r = hmax(m);
    for (; j < n; ++j) r = std::max(r, x[j]);
    return r;
  }

  // dst[j * ds] = exp(scale * x[j] - sub) for j < n; returns their sum.
  static T exp_row(const T* x, int64_t n, T scale, T sub, T* dst, int64_t ds) {
    const V sc = bcast(scale), sv = bcast(sub);
    V acc = zero();
    int64_t j = 0;
    for (; j + VL <= n; j += VL) {
      const V p = vexp(sc * load(x + j) - sv);
      acc += p;
      if (ds == 1) {
        store(dst + j, p);
      } else {
        for (int l = 0; l < VL; ++l) dst[(j + l) * ds] = lane(p, l);
      }
    }
    T sum = hsum(acc);
    for (; j < n; ++j) {
      const T p = std::exp(scale * x[j] - sub);
      dst[j * ds] = p;
      sum += p;
    }
    return sum;
  }

  // ------------------------------------------------------------------------------------------
  // Forward of chunk c of image b: part = R [C][Kp] (columns >= K unspecified), M [Kp], L [Kp]
  // (see the top of the file). Scratch: fwd_scratch values, zero-initialised (the columns
  // k >= K of Pt are never written, so they stay 0).
  static void fwd_task(const FwdArgs<T>& a, const Geom& g, int64_t b, int64_t c, T* scratch,
                       T* part) {
    const int64_t C = a.C, K = a.K, N = a.N, Kp = g.Kp;
    const T ninf = -std::numeric_limits<T>::infinity();
    int64_t p0, p1;
    chunk_range(g, N, c, p0, p1);
    T* R = part;
    T* M = R + C * Kp;
    T* L = M + Kp;
    T* Pt = scratch;              // [kFwdNB][Kp]
    T* alpha = Pt + kFwdNB * Kp;  // [Kp]
    T* Fb = alpha + Kp;           // [C][kFwdSub]: a panel of channels-last feats, packed
    T* Lb = Fb + (a.f_nhwc ? C * kFwdSub : 0);  // [K][kFwdNB]: channels-last logits, packed
    std::fill(R, R + C * Kp, T(0));
    std::fill(M, M + Kp, ninf);
    std::fill(L, L + Kp, T(0));
    std::fill(alpha, alpha + Kp, T(1));
    const int64_t nkv = Kp / VL;
    std::vector<int64_t> col(static_cast<size_t>(nkv));
    for (int64_t w = 0; w < nkv; ++w) col[w] = w * VL;
    const T* F = a.f + b * C * N;
    const T* Lg = a.l + b * K * N;

    for (int64_t n0 = p0; n0 < p1; n0 += kFwdNB) {
      const int64_t nb = std::min(kFwdNB, p1 - n0);
      if (a.l_nhwc) cpu::FASTCTX_SG_ISA::pack_nhwc(Lg + n0 * K, K, nb, Lb, kFwdNB);
      bool rescale = false;
      for (int64_t k = 0; k < K; ++k) {
        const T* row = a.l_nhwc ? Lb + k * kFwdNB : Lg + k * N + n0;
        const T bm = a.scale * row_max(row, nb);  // scale > 0
        const T mo = M[k];
        if (bm > mo) {
          alpha[k] = std::exp(mo - bm);  // 0 when mo = -inf (R[:, k] and L[k] are 0 then)
          L[k] *= alpha[k];
          M[k] = bm;
          rescale = true;
        } else {
          alpha[k] = T(1);
        }
        const T ms = M[k] == ninf ? T(0) : M[k];  // all -inf so far: exp(-inf - 0) = 0
        L[k] += exp_row(row, nb, a.scale, ms, Pt + k, Kp);
      }
      if (rescale && n0 > p0) {
        for (int64_t r = 0; r < C; ++r)
          for (int64_t k = 0; k < Kp; k += VL) store(R + r * Kp + k, load(R + r * Kp + k) * load(alpha + k));
      }
      if (!a.f_nhwc) {
        gemm(F + n0, N, Pt, Kp, C, nb, col.data(), nkv, R, Kp, true, kFwdNB, true, true);
        continue;
      }
      for (int64_t s0 = 0; s0 < nb; s0 += kFwdSub) {  // channels-last feats: panels, packed
        const int64_t ns = std::min(kFwdSub, nb - s0);
        cpu::FASTCTX_SG_ISA::pack_nhwc(F + (n0 + s0) * C, C, ns, Fb, kFwdSub);
        gemm(Fb, kFwdSub, Pt + s0 * Kp, Kp, C, ns, col.data(), nkv, R, Kp, true, kFwdSub, true);
      }
    }
  }

  // ------------------------------------------------------------------------------------------
  // Backward of pixel block t of image b: its dfeats and dlogits columns. Scratch: bwd_scratch.
  static void bwd_block(const BwdArgs<T>& a, const Geom& g, int64_t b, int64_t t, T* scratch) {
    const int64_t C = a.C, K = a.K, N = a.N, NBcap = g.NBcap;
    const T inf = std::numeric_limits<T>::infinity();
    int64_t n0, nb;
    block_range(g, N, t, n0, nb);
    int64_t col[kNBW + 1];
    const int64_t nw = windows(nb, col);
    T* Fb = scratch;          // [C][NBcap]: the block's feats columns
    T* W = Fb + C * NBcap;    // [K][NBcap]: softmax weights
    T* G = W + K * NBcap;     // [K][NBcap]: dR^T F
    T* Lb = G + K * NBcap;    // [K][NBcap]: channels-last logits, packed
    const T* Lg = a.l + b * K * N + n0;  // (NCHW; channels-last: Lb)
    const T* lse = a.lse + b * K;
    const T* D = a.D + b * K;
    T* dL = a.dl + b * K * N + n0;

    pack_map(a.f + b * C * N, a.f_nhwc, C, N, n0, nb, Fb, NBcap);
    if (a.l_nhwc) cpu::FASTCTX_SG_ISA::pack_nhwc(a.l + (b * N + n0) * K, K, nb, Lb, NBcap);
    for (int64_t k = 0; k < K; ++k) {
      const T l = lse[k] == -inf ? inf : lse[k];  // empty class: exp(... - inf) = 0
      exp_row(a.l_nhwc ? Lb + k * NBcap : Lg + k * N, nb, a.scale, l, W + k * NBcap, 1);
    }
    gemm(a.dRT + b * K * C, C, Fb, NBcap, K, C, col, nw, G, NBcap, false, kKC, false);
    const V sc = bcast(a.scale);
    for (int64_t k = 0; k < K; ++k) {
      const T* w = W + k * NBcap;
      const T* gk = G + k * NBcap;
      T* dst = dL + k * N;
      const V d = bcast(D[k]);
      int64_t j = 0;
      for (; j + VL <= nb; j += VL) store(dst + j, sc * load(w + j) * (load(gk + j) - d));
      for (; j < nb; ++j) dst[j] = a.scale * w[j] * (gk[j] - D[k]);
    }
    gemm(a.dR + b * C * K, K, W, NBcap, C, K, col, nw, a.df + b * C * N + n0, N, false, kKS,
         true, true);
  }
};

// Entry points: pick the vector width of the geometry.
template <class T>
void fwd_task(const FwdArgs<T>& a, const Geom& g, int64_t b, int64_t c, T* scratch, T* part) {
  if (g.VL == vec_lanes<T>(FASTCTX_SG_VEC_BYTES))
    Kern<T, vec_lanes<T>(FASTCTX_SG_VEC_BYTES)>::fwd_task(a, g, b, c, scratch, part);
  else
    Kern<T, 1>::fwd_task(a, g, b, c, scratch, part);
}

template <class T>
void bwd_block(const BwdArgs<T>& a, const Geom& g, int64_t b, int64_t t, T* scratch) {
  if (g.VL == vec_lanes<T>(FASTCTX_SG_VEC_BYTES))
    Kern<T, vec_lanes<T>(FASTCTX_SG_VEC_BYTES)>::bwd_block(a, g, b, t, scratch);
  else
    Kern<T, 1>::bwd_block(a, g, b, t, scratch);
}

}  // namespace FASTCTX_SG_ISA
}  // namespace sg_cpu
}  // namespace fastctx
