// Interlaced sparse self-attention (ISANet), CPU: launchers and the CPU registration of the ops
// fastctx::isa_fwd and fastctx::isa_bwd (schemas: csrc/ops/interlaced_attention.cpp). Semantics:
// shared/docs/OPERATORS.md section 2.
//
// Work item: one band of one image, the map rows that hold a set of whole groups (long mode: the
// rows of two adjacent phases i % bh (one when bh is odd), their 2 bw groups; short mode: one row
// of blocks, its W / bw groups).
// Groups are independent in both directions, so there are no cross-item reductions: results are
// bit-identical run to run and for any thread count. Items are claimed one at a time from a
// shared counter.
//
// Per item, chunk by chunk of kChunk channels (so the packed chunks stay in L2; packing the whole
// band first measured slower, its scratch round-tripping through memory):
// - pack: the chunk's rows of the band are read straight from the strided q, k, v (dout) by index
//   arithmetic (along W; along C for channels_last), converted to the compute dtype and
//   scattered into per-thread scratch, group by group [u][chunk][L]. No permuted copy of a whole
//   tensor is made. (Gathering group by group instead reads every cache line of the band once per
//   group: measured 3x slower than the GEMMs at ISANet's sizes.) Long mode with bw = 8 (ISANet's
//   block) in float32: blocks of 8 members x the 8 groups of a phase are transposed in registers
//   (pack_members / unpack_members); element by element, packing ran at ~2.7 GB/s and took as
//   long as the forward's GEMMs (one thread, 64x128); transposed, the forward measured 15-20%
//   faster. The blocks step over members, not map rows: a row of a map narrower than 64 holds
//   fewer than 8 members of a group (session 15: 48x48, 6 a row, forward+backward 1.7x faster
//   than transposing within rows, whose partial blocks went element by element). bw = 4 the
//   same with 4 x 4 blocks (pack_members / unpack_members take either): element by element, the
//   unpacking's stores 4 apart and the packing took ~38% of a forward (B1 32x32), and it lost to
//   the reference (0.81-0.99x); transposed 1.39-1.40x. Short mode with bw = 8 or 4: whole runs
//   of bw members copied as vectors (pack_runs / unpack_runs; bw 4, B1 32x32: forward
//   1.15-1.46x -> 2.02-2.11x the reference). Channels-last
//   maps in float32: 8 members of a group x 8 channels at a time, transposed in registers
//   (long mode: pack_members_cl, over members as above; short mode: vec.h's pack_pixels);
//   element by element, the forward took 1.25-1.36x its NCHW time at ISANet's sizes, transposed
//   0.83-1.00x.
// - GEMMs with cpu::gemm (common.h: torch's BLAS, single-threaded inside
//   at::parallel_for); float groups of at most 8 members with the kernels header's small_*
//   (mm_atb / mm_abt / mm_ab pick): a BLAS call cost more than its arithmetic there (16x16 map,
//   block 8x8, long mode: groups of 4, 384 calls a forward, 0.89-0.98x the reference; with the
//   small GEMMs 1.40-1.48x). Forward: S_u = sum over chunks of Q^T K [L, L] for every group u of the
//   band, P = softmax(scale S) per row, then per chunk of v: O = V P^T, unpacked at once.
//   When a backward will follow (keep_p), the forward also stores every group's P in p
//   ([B, groups, L, L], groups in band order: an opaque layout that only isa_bwd reads).
//   Backward (from that P: no recomputation, which saves the S GEMM, one of five, and the
//   exponentials, for N x L values of memory; the reference's autograd keeps P, and S besides):
//   q, k and dout are packed whole (each read from its map once and kept for the second pass),
//   dP = dO^T V summed over chunks of v, dS = scale P (dP - rowsum(P dP)), then per chunk
//   dV = dO P, dQ = K dS^T, dK = Q dS from the packed copies.
// - the row passes (softmax, its backward) are in interlaced_attention_kernels.h, compiled for
//   the baseline target and for AVX2 + FMA, picked at run time.
// - unpack: a chunk's results are written row by row to the NCHW outputs.
//
// Outputs are contiguous NCHW in the input dtype; lse [B, H, W] and p are float32 (float64 for
// float64 inputs); lse is for a backward that recomputes P (Triton's) and is not read here.
// Compute (and accumulation) dtype: float64 for float64 inputs, float32 otherwise.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define FASTCTX_ISA_NS isa_base
#include "interlaced_attention_kernels.h"
#undef FASTCTX_ISA_NS

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define FASTCTX_ISA_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FASTCTX_ISA_NS isa_avx2
#include "interlaced_attention_kernels.h"
#undef FASTCTX_ISA_NS
#pragma GCC pop_options
#endif

namespace fastctx {
namespace isa_cpu {
namespace {

#define ISA_OP "fastctx.interlaced_attention"

using cpu::use_avx2;

template <class T>
void softmax_fwd(T* S, int64_t L, int64_t Lp, T scale, T* lse) {
#ifdef FASTCTX_ISA_HAVE_AVX2
  if (use_avx2()) return isa_avx2::softmax_fwd<T>(S, L, Lp, scale, lse);
#endif
  isa_base::softmax_fwd<T>(S, L, Lp, scale, lse);
}

template <class T>
void softmax_bwd(const T* P, T* dP, int64_t L, int64_t Lp, T scale) {
#ifdef FASTCTX_ISA_HAVE_AVX2
  if (use_avx2()) return isa_avx2::softmax_bwd<T>(P, dP, L, Lp, scale);
#endif
  isa_base::softmax_bwd<T>(P, dP, L, Lp, scale);
}

void pack_members(int bw, const float* s, const int64_t* off, int64_t gw, int64_t L, float* d,
                  int64_t ds) {
#ifdef FASTCTX_ISA_HAVE_AVX2
  if (use_avx2()) return isa_avx2::pack_members(bw, s, off, gw, L, d, ds);
#endif
  isa_base::pack_members(bw, s, off, gw, L, d, ds);
}

void unpack_members(int bw, const float* s, int64_t ss, const int64_t* off, int64_t gw, int64_t L,
                    float* d) {
#ifdef FASTCTX_ISA_HAVE_AVX2
  if (use_avx2()) return isa_avx2::unpack_members(bw, s, ss, off, gw, L, d);
#endif
  isa_base::unpack_members(bw, s, ss, off, gw, L, d);
}

void pack_members_cl(const float* s, const int64_t* off, int64_t gw, int64_t sJ, int64_t L,
                     int64_t C, float* d, int64_t ds) {
#ifdef FASTCTX_ISA_HAVE_AVX2
  if (use_avx2()) return isa_avx2::pack_members_cl(s, off, gw, sJ, L, C, d, ds);
#endif
  isa_base::pack_members_cl(s, off, gw, sJ, L, C, d, ds);
}

void pack_pixels(const float* s, int64_t sn, int64_t C, int64_t nb, float* d, int64_t ds) {
#ifdef FASTCTX_ISA_HAVE_AVX2
  if (use_avx2()) return isa_avx2::pack_pixels(s, sn, C, nb, d, ds);
#endif
  isa_base::pack_pixels(s, sn, C, nb, d, ds);
}

void pack_runs(int bw, const float* s, int64_t sH, int64_t rows, int64_t n, float* d, int64_t ds) {
#ifdef FASTCTX_ISA_HAVE_AVX2
  if (use_avx2()) return isa_avx2::pack_runs(bw, s, sH, rows, n, d, ds);
#endif
  isa_base::pack_runs(bw, s, sH, rows, n, d, ds);
}

void unpack_runs(int bw, const float* s, int64_t ss, int64_t rows, int64_t n, float* d,
                 int64_t dH) {
#ifdef FASTCTX_ISA_HAVE_AVX2
  if (use_avx2()) return isa_avx2::unpack_runs(bw, s, ss, rows, n, d, dH);
#endif
  isa_base::unpack_runs(bw, s, ss, rows, n, d, dH);
}

// The three GEMM forms of a group (interlaced_attention_kernels.h's small_* for float groups of
// L <= 8 members, torch's BLAS otherwise). X, Y: packed chunks [cn][L]; M: L x L, row stride ldm.
// mm_atb: C (L x L, row stride ldc) = X^T Y (+ C when accumulate); mm_abt: C [cn][L] = X M^T;
// mm_ab: C [cn][L] = X M.
constexpr int64_t kSmallL = 8;

template <class A>
void mm_atb(A* C, int64_t ldc, const A* X, const A* Y, int64_t cn, int64_t L, bool accumulate) {
  if constexpr (std::is_same_v<A, float>) {
    if (L <= kSmallL) {
#ifdef FASTCTX_ISA_HAVE_AVX2
      if (use_avx2()) return isa_avx2::small_atb(X, Y, cn, L, C, ldc, accumulate);
#endif
      return isa_base::small_atb(X, Y, cn, L, C, ldc, accumulate);
    }
  }
  cpu::gemm<A>(cpu::mat<A>(C, L, L, ldc), cpu::mat<A>(X, cn, L, L).t(), cpu::mat<A>(Y, cn, L, L),
               A(accumulate ? 1 : 0));
}

template <class A>
void mm_abt(A* C, const A* X, int64_t cn, int64_t L, const A* M, int64_t ldm) {
  if constexpr (std::is_same_v<A, float>) {
    if (L <= kSmallL) {
#ifdef FASTCTX_ISA_HAVE_AVX2
      if (use_avx2()) return isa_avx2::small_abt(X, cn, L, M, ldm, C);
#endif
      return isa_base::small_abt(X, cn, L, M, ldm, C);
    }
  }
  cpu::gemm<A>(cpu::mat<A>(C, cn, L, L), cpu::mat<A>(X, cn, L, L), cpu::mat<A>(M, L, L, ldm).t(),
               A(0));
}

template <class A>
void mm_ab(A* C, const A* X, int64_t cn, int64_t L, const A* M, int64_t ldm) {
  if constexpr (std::is_same_v<A, float>) {
    if (L <= kSmallL) {
#ifdef FASTCTX_ISA_HAVE_AVX2
      if (use_avx2()) return isa_avx2::small_ab(X, cn, L, M, ldm, C);
#endif
      return isa_base::small_ab(X, cn, L, M, ldm, C);
    }
  }
  cpu::gemm<A>(cpu::mat<A>(C, cn, L, L), cpu::mat<A>(X, cn, L, L), cpu::mat<A>(M, L, L, ldm), A(0));
}

// The grouping of one call. A band is the set of map rows whose groups it holds completely:
// long mode, band t = the rows of the m adjacent phases i % bh in [t m, t m + m) (its m bw groups
// are those phases times the columns' phases); short mode, band t = the rows of block row t (its
// gw groups are the blocks of that row). Long mode takes m = 2 phases per band when bh is even:
// the band's rows then come in pairs of adjacent map rows, read as one contiguous stretch (one
// phase per band read rows of W values each in its own 4 KiB page, which measured latency bound).
// m depends only on bh, so which groups an item holds never depends on the thread count.
struct Geom {
  int64_t H, W, bh, bw, gh, gw;
  int64_t L;       // members per group
  int64_t Lp;      // L rounded up to the vector width (row stride of the L x L matrices)
  int64_t m;       // long mode: phases per band (1 in short mode)
  int64_t nbands;  // bands per image
  int64_t R;       // map rows per band
  int64_t U;       // groups per band
  int64_t N;       // positions per band: R * W = U * L
  bool long_mode;
};

// The members of a group, L: (H / bh) * (W / bw) in long mode, bh * bw in short mode; and the
// groups of an image, H * W / L (0 for an empty map). The kept weights are [B, groups, L, L].
std::pair<int64_t, int64_t> groups_of(int64_t H, int64_t W, int64_t bh, int64_t bw, bool long_mode) {
  const int64_t L = long_mode ? (H / bh) * (W / bw) : bh * bw;
  return {L, L > 0 ? H * W / L : 0};
}

Geom make_geom(int64_t H, int64_t W, int64_t bh, int64_t bw, bool long_mode, int64_t vl) {
  Geom g;
  g.H = H, g.W = W, g.bh = bh, g.bw = bw, g.gh = H / bh, g.gw = W / bw;
  g.long_mode = long_mode;
  g.L = groups_of(H, W, bh, bw, long_mode).first;
  g.Lp = (g.L + vl - 1) / vl * vl;
  g.m = long_mode && bh % 2 == 0 ? 2 : 1;
  g.nbands = long_mode ? bh / g.m : g.gh;
  g.R = long_mode ? g.m * g.gh : bh;
  g.U = long_mode ? g.m * bw : g.gw;
  g.N = g.R * W;
  return g;
}

// Map row of row r of band t. Long mode: row r = I m + p is row I of phase t m + p.
inline int64_t band_row(const Geom& g, int64_t t, int64_t r) {
  return g.long_mode ? (r / g.m) * g.bh + t * g.m + r % g.m : t * g.bh + r;
}

// Long mode: the offsets (map row times sH) of the rows of band t, phase by phase: entry
// p * gh + I is row I of the band's phase p (row r = I m + p of the band).
std::vector<int64_t> phase_rows(const Geom& g, int64_t t, int64_t sH) {
  std::vector<int64_t> off(g.R);
  for (int64_t p = 0; p < g.m; ++p)
    for (int64_t I = 0; I < g.gh; ++I) off[p * g.gh + I] = band_row(g, t, I * g.m + p) * sH;
  return off;
}

// Group pu[n] (within the band) and member pl[n] of position n = r * W + j of any band. Long
// mode: row r = I m + p, (I, J) = (r / m, j / bw) is member I * gw + J of group p bw + j % bw.
// Short mode: (a, b) = (r, j % bw) is member a * bw + b of group j / bw.
void band_members(const Geom& g, int64_t* pu, int64_t* pl) {
  for (int64_t r = 0; r < g.R; ++r)
    for (int64_t j = 0; j < g.W; ++j) {
      const int64_t n = r * g.W + j;
      pu[n] = g.long_mode ? (r % g.m) * g.bw + j % g.bw : j / g.bw;
      pl[n] = g.long_mode ? (r / g.m) * g.gw + j / g.bw : r * g.bw + j % g.bw;
    }
}

// A 4-D tensor [B, C, H, W] by pointer and strides (in elements).
template <class T>
struct Map {
  T* p;
  int64_t C, sB, sC, sH, sW;
};

template <class T>
Map<T> map_of(const at::Tensor& t) {
  return Map<T>{static_cast<T*>(t.data_ptr()), t.size(1), t.stride(0), t.stride(1), t.stride(2),
                t.stride(3)};
}

constexpr int64_t kAhead = 8;   // pack: rows requested ahead
constexpr int64_t kChunk = 128;  // channels packed at a time

// The stride of the groups of a packed band, for `elems` elements per group: whole 64-byte lines,
// an odd number of them. Packing writes every group of the band at once (a map row holds members
// of all of them); with a stride of a power of two lines (e.g. 16 members x 128 channels = 8 KiB)
// the groups' lines all fall in one L1 set and evict each other between stores.
template <class A>
int64_t group_stride(int64_t elems) {
  const int64_t line = 64 / int64_t(sizeof(A)), n = (elems + line - 1) / line;
  return (n | 1) * line;
}

// Requests the cache lines of a row of n elements at stride sw (contiguous rows only).
template <class T>
inline void prefetch_row(const T* p, int64_t n, int64_t sw) {
  if (sw != 1) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), e = a + n * sizeof(T);
  for (uintptr_t l = a & ~uintptr_t(63); l < e; l += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(l), 0, 3);
}

// Packs channels [c0, c0 + cn) of band t of image b of x into dst, group by group:
// dst[u * us + (c - c0) * L + l] (u < U, l < L; us >= cn * L: the group stride) in the compute
// dtype A. Each map row is read once, along W (channels_last and other maps whose channel stride
// is the smaller one: along C, pixel by pixel).
template <class T, class A>
void pack_band(const Map<const T>& x, int64_t b, int64_t t, int64_t c0, int64_t cn, const Geom& g,
               const int64_t* pu, const int64_t* pl, A* dst, int64_t us) {
  const T* base = x.p + b * x.sB + c0 * x.sC;
  const int64_t L = g.L, CL = us, W = g.W;
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
    if (x.sW == 1 && g.long_mode && (g.bw == 8 || g.bw == 4) &&
        std::abs(x.sC) >= std::abs(x.sW)) {
      // Channel by channel, phase by phase, bw members at a time; the next channel's rows are
      // requested while this one is copied.
      std::vector<int64_t> off = phase_rows(g, t, x.sH);
      for (int64_t c = 0; c < cn; ++c) {
        if (c + 1 < cn)
          for (int64_t r = 0; r < g.R; ++r) prefetch_row(base + (c + 1) * x.sC + off[r], W, 1);
        for (int64_t p = 0; p < g.m; ++p)
          pack_members(int(g.bw), base + c * x.sC, off.data() + p * g.gh, g.gw, L,
                       dst + p * g.bw * CL + c * L, CL);
      }
      return;
    }
    if (x.sW == 1 && !g.long_mode && (g.bw == 8 || g.bw == 4) &&
        std::abs(x.sC) >= std::abs(x.sW)) {
      // Channel by channel: the band's bh map rows (block row t), their runs of bw members.
      const int64_t r0 = band_row(g, t, 0) * x.sH;  // the band's first row; bh rows follow
      for (int64_t c = 0; c < cn; ++c) {
        if (c + 1 < cn)
          for (int64_t r = 0; r < g.bh; ++r)
            prefetch_row(base + (c + 1) * x.sC + r0 + r * x.sH, W, 1);
        pack_runs(int(g.bw), base + c * x.sC + r0, x.sH, g.bh, g.gw, dst + c * L, CL);
      }
      return;
    }
    if (x.sC == 1 && x.sW != 1) {
      // Channels-last: blocks of 8 members of a group x 8 channels transposed in registers.
      // Long mode: group p bw + b of the band (phase p, column phase b) has member I gw + J at
      // row I of phase p, pixel J bw + b; short mode: the bw pixels of block J of the band's
      // row r are members r bw + b of group J.
      if (g.long_mode) {
        std::vector<int64_t> off = phase_rows(g, t, x.sH);
        for (int64_t p = 0; p < g.m; ++p)
          for (int64_t b2 = 0; b2 < g.bw; ++b2)
            pack_members_cl(base + b2 * x.sW, off.data() + p * g.gh, g.gw, g.bw * x.sW, L, cn,
                            dst + (p * g.bw + b2) * CL, L);
      } else {
        for (int64_t r = 0; r < g.R; ++r) {
          const T* row = base + band_row(g, t, r) * x.sH;
          for (int64_t J = 0; J < g.gw; ++J)
            pack_pixels(row + J * g.bw * x.sW, x.sW, cn, g.bw, dst + J * CL + r * g.bw, L);
        }
      }
      return;
    }
  }
  if (std::abs(x.sC) < std::abs(x.sW)) {
    for (int64_t r = 0; r < g.R; ++r) {
      const T* row = base + band_row(g, t, r) * x.sH;
      for (int64_t j = 0; j < W; ++j) {
        const T* s = row + j * x.sW;
        A* d = dst + pu[r * W + j] * CL + pl[r * W + j];
        for (int64_t c = 0; c < cn; ++c) d[c * L] = static_cast<A>(s[c * x.sC]);
      }
    }
  } else {
    // Rows (c, r) in order; the row kAhead rows on is requested while this one is copied, so
    // several rows are in flight from memory at once.
    const int64_t nrows = cn * g.R;
    for (int64_t it = 0; it < nrows; ++it) {
      const int64_t c = it / g.R, r = it % g.R;
      if (it + kAhead < nrows) {
        const int64_t c2 = (it + kAhead) / g.R, r2 = (it + kAhead) % g.R;
        prefetch_row(base + c2 * x.sC + band_row(g, t, r2) * x.sH, W, x.sW);
      }
      const T* s = base + c * x.sC + band_row(g, t, r) * x.sH;
      A* d = dst + c * L;
      if (x.sW == 1 && g.long_mode) {  // (I, J): member I * gw + J of group p bw + j % bw
        A* dr = d + (r % g.m) * g.bw * CL + (r / g.m) * g.gw;
        for (int64_t b2 = 0; b2 < g.bw; ++b2) {
          A* db = dr + b2 * CL;
          const T* sb = s + b2;
          for (int64_t J = 0; J < g.gw; ++J) db[J] = static_cast<A>(sb[J * g.bw]);
        }
      } else if (x.sW == 1) {  // (a, b) = (r, j % bw): member r * bw + b of group j / bw
        for (int64_t J = 0; J < g.gw; ++J) {
          A* dj = d + J * CL + r * g.bw;
          const T* sj = s + J * g.bw;
          for (int64_t b2 = 0; b2 < g.bw; ++b2) dj[b2] = static_cast<A>(sj[b2]);
        }
      } else {
        const int64_t *u = pu + r * W, *l = pl + r * W;
        for (int64_t j = 0; j < W; ++j) d[u[j] * CL + l[j]] = static_cast<A>(s[j * x.sW]);
      }
    }
  }
}

// The inverse: y[b, c, row, j] = src[u * us + (c - c0) * L + l] for the channels [c0, c0 + cn)
// of band t of image b (y: a fresh contiguous tensor), converted to T.
template <class T, class A>
void unpack_band(const Map<T>& y, int64_t b, int64_t t, int64_t c0, int64_t cn, const Geom& g,
                 const int64_t* pu, const int64_t* pl, const A* src, int64_t us) {
  T* base = y.p + b * y.sB + c0 * y.sC;
  const int64_t L = g.L, CL = us, W = g.W, nrows = cn * g.R;
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
    if (y.sW == 1 && g.long_mode && (g.bw == 8 || g.bw == 4)) {
      std::vector<int64_t> off = phase_rows(g, t, y.sH);
      for (int64_t c = 0; c < cn; ++c)
        for (int64_t p = 0; p < g.m; ++p)
          unpack_members(int(g.bw), src + p * g.bw * CL + c * L, CL, off.data() + p * g.gh, g.gw,
                         L, base + c * y.sC);
      return;
    }
    if (y.sW == 1 && !g.long_mode && (g.bw == 8 || g.bw == 4)) {
      const int64_t r0 = band_row(g, t, 0) * y.sH;
      for (int64_t c = 0; c < cn; ++c)
        unpack_runs(int(g.bw), src + c * L, CL, g.bh, g.gw, base + c * y.sC + r0, y.sH);
      return;
    }
  }
  for (int64_t it = 0; it < nrows; ++it) {
    const int64_t c = it / g.R, r = it % g.R;
    T* d = base + c * y.sC + band_row(g, t, r) * y.sH;
    const A* s = src + c * L;
    if (y.sW == 1 && g.long_mode) {  // the inverse of pack_band's cases
      const A* sr = s + (r % g.m) * g.bw * CL + (r / g.m) * g.gw;
      for (int64_t b2 = 0; b2 < g.bw; ++b2) {
        const A* sb = sr + b2 * CL;
        for (int64_t J = 0; J < g.gw; ++J) d[J * g.bw + b2] = static_cast<T>(sb[J]);
      }
    } else if (y.sW == 1) {
      for (int64_t J = 0; J < g.gw; ++J) {
        const A* sj = s + J * CL + r * g.bw;
        T* dj = d + J * g.bw;
        for (int64_t b2 = 0; b2 < g.bw; ++b2) dj[b2] = static_cast<T>(sj[b2]);
      }
    } else {
      const int64_t *u = pu + r * W, *l = pl + r * W;
      for (int64_t j = 0; j < W; ++j) d[j * y.sW] = static_cast<T>(s[u[j] * CL + l[j]]);
    }
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t bh,
                  int64_t bw, const char* op) {
  check_qkv_map(at::kCPU, ISA_OP, op, q, k, v);
  TORCH_CHECK(bh > 0 && bw > 0, ISA_OP " (", op, "): block must be positive, got ", bh, "x", bw);
  TORCH_CHECK(q.size(2) % bh == 0 && q.size(3) % bw == 0, ISA_OP " (", op, "): the map ",
              q.size(2), "x", q.size(3), " is not divisible by block ", bh, "x", bw);
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& v, const at::Tensor& q) {
  cpu::check_tensor(ISA_OP, "isa_bwd", t, name, 4, "[B, Cv, H, W]", q);
  TORCH_CHECK(t.sizes() == v.sizes(), ISA_OP " (isa_bwd): ", name, " must have the shape of v ",
              v.sizes(), ", got ", t.sizes());
}

// Per-worker scratch (offsets in elements of the compute dtype): the band's L x L matrices, one
// per group (S / P, and dP / dS in the backward), the band's lse (forward), and the packed inputs and
// results. Forward: chunk buffers of kChunk channels of the band [U][kChunk][L] (x0, x1: two
// packed inputs, y0: a result). Backward: q, k and dout packed whole ([U][C][L] in x0, x1, xd),
// so that each is read from the strided map once and the dQ / dK / dV passes reuse them; v in
// chunks (xv); two result chunks (y0, y1).
struct Layout {  // s and dp first: the zeroed prefix [0, lse)
  int64_t s, dp, lse, x0, x1, xd, xv, y0, y1, total;
  int64_t uc, uq, ud;  // group strides (group_stride) of a packed chunk, of whole q / k, of dout
};

template <class A>
Layout layout(const Geom& g, bool backward, int64_t Cqk, int64_t Cv) {
  Layout y;
  y.uc = group_stride<A>(kChunk * g.L);
  y.uq = group_stride<A>(Cqk * g.L);
  y.ud = group_stride<A>(Cv * g.L);
  const int64_t LL = g.U * g.L * g.Lp, X = g.U * y.uc;
  int64_t n = 0;
  auto take = [&](int64_t elems) {
    const int64_t at = n;
    n += (elems + 15) / 16 * 16;  // keep every buffer 64-byte aligned
    return at;
  };
  y.s = take(LL);
  y.dp = take(backward ? LL : 0);
  y.lse = take(backward ? 0 : g.N);
  y.x0 = take(backward ? g.U * y.uq : X);
  y.x1 = take(backward ? g.U * y.uq : X);
  y.xd = take(backward ? g.U * y.ud : 0);
  y.xv = take(backward ? X : 0);
  y.y0 = take(X);
  y.y1 = take(backward ? X : 0);
  y.total = n;
  return y;
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> isa_fwd_cpu(const at::Tensor& q_in,
                                                           const at::Tensor& k_in,
                                                           const at::Tensor& v_in, int64_t bh,
                                                           int64_t bw, bool long_mode,
                                                           double scale, bool keep_p) {
  check_inputs(q_in, k_in, v_in, bh, bw, "isa_fwd");
  const int64_t B = q_in.size(0), Cqk = q_in.size(1), H = q_in.size(2), W = q_in.size(3);
  const int64_t Cv = v_in.size(1);
  const at::ScalarType dt = q_in.scalar_type(), ct = acc_dtype(dt);
  auto out = cpu::empty_output({B, Cv, H, W}, q_in.options());
  auto lse = at::empty({B, H, W}, q_in.options().dtype(ct));
  const std::pair<int64_t, int64_t> lg = groups_of(H, W, bh, bw, long_mode);
  const int64_t L = lg.first, G = lg.second;
  auto p = keep_p ? cpu::empty_output({B, G, L, L}, q_in.options().dtype(ct))
                  : at::empty({0}, q_in.options().dtype(ct));
  if (B == 0 || H == 0 || W == 0) return {out, lse, p};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "isa_fwd_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(ct, "isa_fwd_cpu_compute", [&] {
      using A = scalar_t;
      cpu::check_blas<A>(ISA_OP);
      const Geom g = make_geom(H, W, bh, bw, long_mode, 32 / int64_t(sizeof(A)));
      const Layout y = layout<A>(g, false, Cqk, Cv);
      const int64_t uc = y.uc;
      const Map<const T> mq = map_of<const T>(q_in), mk = map_of<const T>(k_in),
                         mv = map_of<const T>(v_in);
      const Map<T> mo = map_of<T>(out);
      std::vector<int64_t> members(2 * g.N);
      int64_t *pu = members.data(), *pl = pu + g.N;
      band_members(g, pu, pl);
      A* lse_p = lse.mutable_data_ptr<A>();
      A* p_p = keep_p ? p.mutable_data_ptr<A>() : nullptr;
      const int64_t Lp = g.Lp, LL = L * Lp;
      // Scratch: the layout y; its L x L matrices (before y.lse) zeroed: the padding columns of
      // the dP rows must be finite (kernels header). Every slot is 64-byte aligned, so the
      // BLAS results do not depend on which thread ran an item.
      cpu::for_each_item_bytes(B * g.nbands, y.total * int64_t(sizeof(A)), y.lse * int64_t(sizeof(A)),
                               [&](int64_t item, char* scratch) {
        const int64_t b = item / g.nbands, t = item % g.nbands;
        A* base = reinterpret_cast<A*>(scratch);
        A *S = base + y.s, *lg = base + y.lse, *xq = base + y.x0, *xk = base + y.x1, *yo = base + y.y0;
        // S_u = Q_u^T K_u, summed over chunks of channels.
        for (int64_t c0 = 0; c0 < Cqk; c0 += kChunk) {
          const int64_t cn = std::min(kChunk, Cqk - c0);
          pack_band(mq, b, t, c0, cn, g, pu, pl, xq, uc);
          pack_band(mk, b, t, c0, cn, g, pu, pl, xk, uc);
          for (int64_t u = 0; u < g.U; ++u)
            mm_atb<A>(S + u * LL, Lp, xq + u * uc, xk + u * uc, cn, L, c0 != 0);
        }
        if (Cqk == 0) std::fill(S, S + g.U * LL, A(0));
        for (int64_t u = 0; u < g.U; ++u) softmax_fwd<A>(S + u * LL, L, Lp, static_cast<A>(scale), lg + u * L);
        if (p_p) {
          A* pb = p_p + (b * g.nbands + t) * g.U * L * L;
          for (int64_t u = 0; u < g.U; ++u)
            for (int64_t l = 0; l < L; ++l)
              std::memcpy(pb + (u * L + l) * L, S + u * LL + l * Lp, size_t(L) * sizeof(A));
        }
        // O_u = V_u P_u^T, chunk by chunk of channels.
        for (int64_t c0 = 0; c0 < Cv; c0 += kChunk) {
          const int64_t cn = std::min(kChunk, Cv - c0);
          pack_band(mv, b, t, c0, cn, g, pu, pl, xq, uc);
          for (int64_t u = 0; u < g.U; ++u) mm_abt<A>(yo + u * uc, xq + u * uc, cn, L, S + u * LL, Lp);
          unpack_band(mo, b, t, c0, cn, g, pu, pl, yo, uc);
        }
        A* lb = lse_p + b * H * W;
        for (int64_t r = 0; r < g.R; ++r) {
          A* d = lb + band_row(g, t, r) * W;
          for (int64_t j = 0; j < W; ++j) d[j] = lg[pu[r * W + j] * L + pl[r * W + j]];
        }
      });
    });
  });
  return {out, lse, p};
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> isa_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& p_in, int64_t bh, int64_t bw, bool long_mode, double scale) {
  check_inputs(q_in, k_in, v_in, bh, bw, "isa_bwd");
  check_like(dout_in, "dout", v_in, q_in);
  check_like(out_in, "out", v_in, q_in);
  const int64_t B = q_in.size(0), Cqk = q_in.size(1), H = q_in.size(2), W = q_in.size(3);
  const int64_t Cv = v_in.size(1);
  const at::ScalarType dt = q_in.scalar_type(), ct = acc_dtype(dt);
  (void)lse_in;
  const std::pair<int64_t, int64_t> lg = groups_of(H, W, bh, bw, long_mode);
  const int64_t L = lg.first, G = lg.second;
  TORCH_CHECK(p_in.defined() && p_in.device().is_cpu(),
              ISA_OP " (isa_bwd): p must be a CPU tensor");
  TORCH_CHECK(p_in.dim() == 4 && p_in.size(0) == B && p_in.size(1) == G && p_in.size(2) == L &&
                  p_in.size(3) == L,
              ISA_OP " (isa_bwd): p must be the weights that isa_fwd kept (keep_p=True), of shape "
              "[B, groups, L, L] = [", B, ", ", G, ", ", L, ", ", L, "]; got ", p_in.sizes(),
              " (the CPU backward does not recompute them)");
  TORCH_CHECK(p_in.scalar_type() == ct, ISA_OP " (isa_bwd): p must have dtype ", ct, " for ", dt,
              " inputs, got ", p_in.scalar_type());

  auto dq = cpu::empty_output({B, Cqk, H, W}, q_in.options());
  auto dk = cpu::empty_output({B, Cqk, H, W}, q_in.options());
  auto dv = cpu::empty_output({B, Cv, H, W}, q_in.options());
  if (B == 0 || H == 0 || W == 0) return {dq, dk, dv};
  const at::Tensor p = p_in.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "isa_bwd_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(ct, "isa_bwd_cpu_compute", [&] {
      using A = scalar_t;
      cpu::check_blas<A>(ISA_OP);
      const Geom g = make_geom(H, W, bh, bw, long_mode, 32 / int64_t(sizeof(A)));
      const Layout y = layout<A>(g, true, Cqk, Cv);
      const int64_t uc = y.uc, uq = y.uq, ud = y.ud;  // group strides of the packed buffers
      const Map<const T> mq = map_of<const T>(q_in), mk = map_of<const T>(k_in),
                         mv = map_of<const T>(v_in), mdo = map_of<const T>(dout_in);
      const Map<T> mdq = map_of<T>(dq), mdk = map_of<T>(dk), mdv = map_of<T>(dv);
      std::vector<int64_t> members(2 * g.N);
      int64_t *pu = members.data(), *pl = pu + g.N;
      band_members(g, pu, pl);
      const A* p_p = p.const_data_ptr<A>();
      const int64_t Lp = g.Lp, LL = L * Lp;
      // Scratch: as in the forward.
      cpu::for_each_item_bytes(B * g.nbands, y.total * int64_t(sizeof(A)), y.lse * int64_t(sizeof(A)),
                               [&](int64_t item, char* scratch) {
        const int64_t b = item / g.nbands, t = item % g.nbands;
        A* base = reinterpret_cast<A*>(scratch);
        A *S = base + y.s, *dP = base + y.dp;
        A *xq = base + y.x0, *xk = base + y.x1, *xd = base + y.xd, *xv = base + y.xv;
        A *y0 = base + y.y0, *y1 = base + y.y1;
        // P_u from the forward, into rows of Lp with zero padding; q and k packed whole (for dQ
        // and dK).
        const A* pb = p_p + (b * g.nbands + t) * g.U * L * L;
        for (int64_t u = 0; u < g.U; ++u)
          for (int64_t l = 0; l < L; ++l) {
            A* row = S + u * LL + l * Lp;
            std::memcpy(row, pb + (u * L + l) * L, size_t(L) * sizeof(A));
            std::fill(row + L, row + Lp, A(0));
          }
        pack_band(mq, b, t, 0, Cqk, g, pu, pl, xq, uq);
        pack_band(mk, b, t, 0, Cqk, g, pu, pl, xk, uq);
        // dP_u = dO_u^T V_u, summed over chunks of v (dout packed whole, kept for dV).
        for (int64_t c0 = 0; c0 < Cv; c0 += kChunk) {
          const int64_t cn = std::min(kChunk, Cv - c0);
          pack_band(mdo, b, t, c0, cn, g, pu, pl, xd + c0 * L, ud);
          pack_band(mv, b, t, c0, cn, g, pu, pl, xv, uc);
          for (int64_t u = 0; u < g.U; ++u)
            mm_atb<A>(dP + u * LL, Lp, xd + u * ud + c0 * L, xv + u * uc, cn, L, c0 != 0);
        }
        if (Cv == 0) std::fill(dP, dP + g.U * LL, A(0));
        for (int64_t u = 0; u < g.U; ++u)
          softmax_bwd<A>(S + u * LL, dP + u * LL, L, Lp, static_cast<A>(scale));
        // dV_u = dO_u P_u, chunk by chunk of channels.
        for (int64_t c0 = 0; c0 < Cv; c0 += kChunk) {
          const int64_t cn = std::min(kChunk, Cv - c0);
          for (int64_t u = 0; u < g.U; ++u)
            mm_ab<A>(y0 + u * uc, xd + u * ud + c0 * L, cn, L, S + u * LL, Lp);
          unpack_band(mdv, b, t, c0, cn, g, pu, pl, y0, uc);
        }
        // dQ_u = K_u dS_u^T and dK_u = Q_u dS_u, chunk by chunk of channels.
        for (int64_t c0 = 0; c0 < Cqk; c0 += kChunk) {
          const int64_t cn = std::min(kChunk, Cqk - c0);
          for (int64_t u = 0; u < g.U; ++u) {
            mm_abt<A>(y0 + u * uc, xk + u * uq + c0 * L, cn, L, dP + u * LL, Lp);
            mm_ab<A>(y1 + u * uc, xq + u * uq + c0 * L, cn, L, dP + u * LL, Lp);
          }
          unpack_band(mdq, b, t, c0, cn, g, pu, pl, y0, uc);
          unpack_band(mdk, b, t, c0, cn, g, pu, pl, y1, uc);
        }
      });
    });
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace isa_cpu
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CPU, m) {
  m.impl("isa_fwd", &fastctx::isa_cpu::isa_fwd_cpu);
  m.impl("isa_bwd", &fastctx::isa_cpu::isa_bwd_cpu);
}
