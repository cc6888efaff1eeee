// Criss-cross attention (CCNet), CPU kernels: the per-task work of fastctx::cc_fwd / cc_bwd.
// Launchers, checks and registration: criss_cross.cpp. Contract and backward math:
// shared/docs/OPERATORS.md section 1.
//
// NO INCLUDE GUARD, on purpose: criss_cross.cpp includes this file once per instruction set,
// each time with FASTCTX_CC_ISA naming a namespace (and, for AVX2, under
// `#pragma GCC target("avx2,fma")`), so every kernel below is compiled once for the baseline
// target and once for AVX2 + FMA; the launcher picks one at run time with a CPU feature test.
// (GCC's target_clones("arch=haswell", "default") was the first idea: its dispatcher tests the
// CPU *model*, so it never picks the AVX2 clone on AMD parts. Only the entry points at the bottom
// are called from outside a namespace; they take no vector-typed arguments, so the two ABIs
// never meet.)
//
// Design (all on the NCHW layout; j, the column index, is the stride-1 axis):
// - A task is a block of at most kTR consecutive rows i of one image. The forward task computes
//   the out rows and lse of its rows; the backward task owns its rows of dq, dk and dv (no races,
//   no atomics, and the result does not depend on the number of threads). Register blocks that
//   run past the task's last row repeat that row: computed, never stored.
// - Every hot loop is vectorised along j with GCC vector types (V = VL lanes: 8 floats or 4
//   doubles; VL = 1 when W < that). A row of W pixels is covered by ceil(W / VL) windows of VL
//   lanes; the last one is shifted left to end at W (it overlaps the previous window, so no load
//   ever leaves the row) and owns only its lanes >= lo: accumulators are initialised from and
//   stored to those lanes only.
// - Three register-blocked kernels do all the arithmetic, 12 vector accumulators each:
//     col_dot:  O[r][y][j]      (+)= sum_c X[c, row r, j] * Y[c, y, j]   (column energies, dA)
//     col_acc:  O[c, row r, j]  (+)= sum_y P[r][y][j] * Y[c, y, j]       (column parts of
//                                                                         out, dq, dk, dv)
//     row_gemm: C[m][j]         (+)= sum_k A(m, k) * B[k][j]             (row parts: GEMMs)
//   col_dot (2 rows x 6 partner rows) and col_acc (4 rows x 3 channels) loop over the register
//   blocks of a task's kTR rows inside each window, so every vector loaded from the big operand
//   Y (v or dout, Cv = 512 channels in CCNet) feeds kTR FMAs from L1: Y is streamed from memory
//   once per task of kTR rows.
// - The backward runs in two passes over the row tasks. Pass 0 computes, for the queries of its
//   rows, the column weights P and scores dE * scale (and everything of dq, and the row parts of
//   dk and dv); it keeps those two column matrices of every query, [B][H][H][Wp] each (the
//   column half of the attention: 1/(H + W) of the (B, H, W, H + W) one, 9 MiB each at 97 x 97
//   for B = 2). Pass 1 reads them transposed (the queries of the column of each key row) for the
//   column parts of dk and dv: nothing is recomputed (an earlier single pass recomputed the
//   column dA over all Cv channels of dout and v for the key view, the most expensive part).
// - Scratch is per thread: kTR * (H + W) * Wp values for the forward, twice that plus W * Wp for
//   the backward; rows are padded to Wp (64 bytes) and the padding is kept at zero, so the
//   element-wise passes run over whole vectors. Nothing of size (B, H, W, H + W) is ever
//   materialised.
//
// Where the time goes (AMD EPYC, AVX2, 1 thread, one 512-channel 97 x 97 image): row_gemm runs
// at ~40 GFLOP/s (one operand is a broadcast scalar, so little cache traffic per FMA);
// col_dot / col_acc at ~20 (every operand is a vector: one 32-byte load per 1.7 FMAs, fed from
// L2 / memory). What would make it faster still: computing the column parts as row parts of a
// transposed (B, C, W, H) copy (row_gemm throughout, each element streamed once), at the price
// of input-sized copies.

#ifndef FASTCTX_CC_ISA
#error "criss_cross_kernels.h: define FASTCTX_CC_ISA (a namespace name) before including"
#endif
// FASTCTX_CC_IN_REGISTER(v): optional, makes v live in a register (an empty asm with a
// register operand), so the compiler cannot fold its load into several FMAs' memory operands.
#ifndef FASTCTX_CC_IN_REGISTER
#define FASTCTX_CC_IN_REGISTER(v) ((void)0)
#define FASTCTX_CC_IN_REGISTER_DEFAULT
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#define FASTCTX_VEC_ISA FASTCTX_CC_ISA
#include "vec.h"
#undef FASTCTX_VEC_ISA

// Shared by every instruction set (defined once): blocking constants and task arguments.
#ifndef FASTCTX_CC_CPU_ARGS_DEFINED
#define FASTCTX_CC_CPU_ARGS_DEFINED
namespace fastctx {
namespace cc_cpu {

// Register blocks (12 vector accumulators; with the operand vectors that is the 16 ymm
// registers of AVX2):
constexpr int kDotR = 2;        // col_dot: rows of a register block (kept in registers)
constexpr int kDotY = 6;        // col_dot: partner rows of a register block (streamed)
constexpr int kAccR = 4;        // col_acc: rows of a register block (streamed)
constexpr int kAccC = 3;        // col_acc: channels of a register block (kept in registers)
constexpr int kRB = 4;          // rows per unit of work (a multiple of both register blocks)
constexpr int kMB = 4;          // row_gemm: rows of C per register block
constexpr int kNB = 3;          // row_gemm: windows of C per register block
// Task and cache blocking:
constexpr int kTR = 8;          // rows of a task: kTR / kRB register blocks share each Y load
constexpr int64_t kCB = 32;     // col_dot: channels per chunk (the X rows of a chunk stay in L2)
constexpr int64_t kYRows = 32;  // col_acc: partner rows per block (a window's lines fit in L1)
constexpr int64_t kKB = 128;    // row_gemm: k per chunk (the k x kNB panel of B stays in L1)
static_assert(kTR % kRB == 0 && kRB % kDotR == 0 && kRB % kAccR == 0,
              "task rows: whole register blocks");

// Forward task arguments (all pointers at image 0; NCHW-contiguous).
template <class T>
struct FwdArgs {
  const T* q;
  const T* k;
  const T* v;
  T* out;
  T* lse;  // [B, H, W]
  int64_t Cqk, Cv, H, W, Wp;
  T scale;
};

// Backward task arguments. lse and D are [B, H, Wp] (rows padded with zeros). Pc and dSc:
// [B][H][H][Wp], the column weights and scores * scale of every query row i (index 1) against
// every partner row y (index 2); written by pass 0, read by pass 1.
template <class T>
struct BwdArgs {
  const T* dout;
  const T* q;
  const T* k;
  const T* v;
  const T* lse;
  const T* D;
  T* dq;
  T* dk;
  T* dv;
  T* Pc;
  T* dSc;
  int64_t Cqk, Cv, H, W, Wp;
  T scale;
};

}  // namespace cc_cpu
}  // namespace fastctx
#endif  // FASTCTX_CC_CPU_ARGS_DEFINED

namespace fastctx {
namespace cc_cpu {
namespace FASTCTX_CC_ISA {

template <class T, int VL>
struct Kern : cpu::FASTCTX_CC_ISA::Vec<T, VL> {
  typedef cpu::FASTCTX_CC_ISA::Vec<T, VL> Base;
  typedef typename Base::V V;
  using Base::bcast;
  using Base::load;
  using Base::load_lo;
  using Base::store;
  using Base::store_lo;
  using Base::vexp;
  using Base::vmax;
  using Base::zero;

  struct Win {
    int64_t j0;  // first column of the window
    int lo;      // first lane this window owns
  };
  static inline Win win(int64_t w, int64_t W) {
    const int64_t j = w * VL;
    const int64_t j0 = std::min<int64_t>(j, W - VL);
    return {j0, static_cast<int>(j - j0)};
  }

  // acc[r][t] += a_r * b_t over an RR x CC register block (RR * CC = 12 accumulators). The
  // smaller side stays in registers and the other side streams through one register, so every
  // operand vector is loaded once: RR + CC loads per 12 FMAs, RR * CC + min(RR, CC) + 1 <= 16
  // vector registers.
  template <int RR, int CC>
  static inline __attribute__((always_inline)) void fma_block(V (&acc)[RR][CC],
                                                              const T* const (&a)[RR],
                                                              const T* const (&b)[CC],
                                                              int64_t oa, int64_t ob) {
    if constexpr (RR <= CC) {
      V av[RR];
#pragma GCC unroll 16
      for (int r = 0; r < RR; ++r) av[r] = load(a[r] + oa);
#pragma GCC unroll 16
      for (int t = 0; t < CC; ++t) {
        V bv = load(b[t] + ob);
        FASTCTX_CC_IN_REGISTER(bv);
#pragma GCC unroll 16
        for (int r = 0; r < RR; ++r) acc[r][t] += av[r] * bv;
      }
    } else {
      V bv[CC];
#pragma GCC unroll 16
      for (int t = 0; t < CC; ++t) bv[t] = load(b[t] + ob);
#pragma GCC unroll 16
      for (int r = 0; r < RR; ++r) {
        const V av = load(a[r] + oa);
#pragma GCC unroll 16
        for (int t = 0; t < CC; ++t) acc[r][t] += av * bv[t];
      }
    }
  }

  // col_dot: O[r * ors + y * oys + j] (= or +=) sum_{c < C} X[xoff[r] + c * cs + j] * Y[y * W + c * cs + j]
  // for y < H, j < W and the rows r of the register blocks that hold a row < nr (xoff has an
  // entry for each of those).
  // Loop order: chunks of kCB channels (the kTR x kCB rows of X stay in L2), blocks of kDotY
  // partner rows, windows, register blocks of kDotR rows, channels. The Y lines of a window are
  // loaded once for all the rows and reused by the next window from L1; partial sums over the
  // chunks go through O. The partner rows of the next block (contiguous per channel) are
  // prefetched meanwhile.
  static void col_dot(const T* __restrict X, const int64_t* xoff, const T* __restrict Y,
                      int64_t C, int64_t cs, int64_t H, int64_t W, T* __restrict O, int64_t ors,
                      int64_t oys, int nr, bool accumulate) {
    constexpr int RR = kDotR, CC = kDotY;
    const int64_t nw = (W + VL - 1) / VL;
    const int nmb = (nr + RR - 1) / RR;
    constexpr int64_t kLine = 64 / sizeof(T);
    for (int64_t c0 = 0; c0 == 0 || c0 < C; c0 += kCB) {
      const int64_t c1 = std::min(C, c0 + kCB);
      const bool acc_in = accumulate || c0 > 0;
      for (int64_t y0 = 0; y0 < H; y0 += CC) {
        const int ny = static_cast<int>(std::min<int64_t>(CC, H - y0));
        const int64_t pf_rows = y0 + CC < H ? std::min<int64_t>(CC, H - y0 - CC) : 0;
        const T* pf_base = Y + (y0 + CC) * W;
        const int64_t pf_len = pf_rows * W;
        for (int64_t w = 0; w < nw; ++w) {
          const Win wi = win(w, W);
          const T* yp[CC];
          for (int t = 0; t < CC; ++t) yp[t] = Y + std::min(y0 + t, H - 1) * W + wi.j0;
          // Lines of the next block to prefetch during this window: ~ pf_len / nw per channel.
          const int64_t pf0 = (pf_len * w / nw) / kLine * kLine;
          const int64_t pf1 = (pf_len * (w + 1) / nw + kLine - 1) / kLine * kLine;
          for (int m = 0; m < nmb; ++m) {
            T* Om = O + m * RR * ors + wi.j0;
            V acc[RR][CC];
#pragma GCC unroll 16
            for (int r = 0; r < RR; ++r)
#pragma GCC unroll 16
              for (int t = 0; t < CC; ++t)
                acc[r][t] = (acc_in && t < ny) ? load_lo(Om + r * ors + (y0 + t) * oys, wi.lo)
                                               : zero();
            const T* xp[RR];
            for (int r = 0; r < RR; ++r) xp[r] = X + xoff[m * RR + r] + wi.j0;
            // (Prefetching needs a second copy of the loop; with VL = 1 the compiler may contract
            // the two copies into FMAs differently, and which rows take which copy depends on
            // the split into tasks: so no prefetching there, and results never depend on the
            // number of threads.)
            if (VL > 1 && m == 0 && pf0 < pf1) {
              for (int64_t c = c0; c < c1; ++c) {
                const int64_t o = c * cs;
                for (int64_t q = pf0; q < pf1; q += kLine) __builtin_prefetch(pf_base + o + q, 0, 3);
                fma_block<RR, CC>(acc, xp, yp, o, o);
              }
            } else {
              for (int64_t c = c0; c < c1; ++c) fma_block<RR, CC>(acc, xp, yp, c * cs, c * cs);
            }
#pragma GCC unroll 16
            for (int r = 0; r < RR; ++r)
#pragma GCC unroll 16
              for (int t = 0; t < CC; ++t)
                if (t < ny) store_lo(Om + r * ors + (y0 + t) * oys, acc[r][t], wi.lo);
          }
        }
      }
    }
  }

  // col_acc: O[c * cs + ooff[r] + j] (= or +=) sum_{y < H} P[r * prs + y * pys + j] * Y[c * cs + y * W + j]
  // for r < nr, c < C, j < W. P rows >= nr of a register block holding a row < nr are read (they
  // must be finite: the callers zero them), never stored.
  // Loop order: blocks of kAccC channels, blocks of kYRows partner rows, windows, register
  // blocks of kAccR rows, partner rows. The Y lines of a window are loaded once for all the
  // rows and, with the P lines, reused by the next window from L1; partial sums over the
  // partner-row blocks go through O (L1). The next channel block (contiguous) is prefetched
  // meanwhile.
  static void col_acc(const T* __restrict P, int64_t prs, int64_t pys, const T* __restrict Y,
                      int64_t C, int64_t cs, int64_t H, int64_t W, T* __restrict O,
                      const int64_t* ooff, int nr, bool accumulate) {
    constexpr int RR = kAccR, CC = kAccC;
    const int64_t nw = (W + VL - 1) / VL;
    const int nmb = (nr + RR - 1) / RR;
    constexpr int64_t kLine = 64 / sizeof(T);
    for (int64_t c0 = 0; c0 < C; c0 += CC) {
      const int nc = static_cast<int>(std::min<int64_t>(CC, C - c0));
      int64_t coff[CC];
      for (int t = 0; t < CC; ++t) coff[t] = std::min(c0 + t, C - 1) * cs;
      // Channels [c0 + CC, c0 + 2 CC): the planes are cs = H * W apart, so contiguous.
      const T* pf = Y + std::min(c0 + CC, C) * cs;
      const T* const pf_end = Y + std::min(c0 + 2 * CC, C) * cs;
      // Prefetch lines per partner row, spread over the first register block's iterations.
      const int64_t pf_per = ((pf_end - pf) + (nw * H) * kLine - 1) / (nw * H * kLine);
      for (int64_t yb0 = 0, yb1 = 0; yb0 < H; yb0 = yb1) {
        yb1 = H - yb0 < 2 * kYRows ? H : yb0 + kYRows;  // no short last block
        const bool fresh = !accumulate && yb0 == 0;
        for (int64_t w = 0; w < nw; ++w) {
          const Win wi = win(w, W);
          const T* yp[CC];
          for (int t = 0; t < CC; ++t) yp[t] = Y + coff[t] + wi.j0;
          for (int m = 0; m < nmb; ++m) {
            const int rb = m * RR;
            V acc[RR][CC];
#pragma GCC unroll 16
            for (int r = 0; r < RR; ++r)
#pragma GCC unroll 16
              for (int t = 0; t < CC; ++t)
                acc[r][t] = (!fresh && rb + r < nr && t < nc)
                                ? load_lo(O + coff[t] + ooff[rb + r] + wi.j0, wi.lo)
                                : zero();
            const T* pp[RR];
            for (int r = 0; r < RR; ++r) pp[r] = P + (rb + r) * prs + wi.j0;
            int64_t y = yb0;
            if (VL > 1 && m == 0) {  // (VL > 1: see col_dot)
              for (; y < yb1 && pf < pf_end; ++y) {
                for (int64_t q = 0; q < pf_per; ++q) __builtin_prefetch(pf + q * kLine, 0, 3);
                pf += pf_per * kLine;
                fma_block<RR, CC>(acc, pp, yp, y * pys, y * W);
              }
            }
            for (; y < yb1; ++y) fma_block<RR, CC>(acc, pp, yp, y * pys, y * W);
#pragma GCC unroll 16
            for (int r = 0; r < RR; ++r)
#pragma GCC unroll 16
              for (int t = 0; t < CC; ++t)
                if (rb + r < nr && t < nc)
                  store_lo(O + coff[t] + ooff[rb + r] + wi.j0, acc[r][t], wi.lo);
          }
        }
      }
    }
  }

  // row_gemm: Cm[m * cms + j] (= or +=) sum_{k < K} A[m * ams + k * aks] * B[k * bks + j]
  // for m < M, j < W.
  // Loop order: chunks of kKB along k, groups of kNB windows, blocks of kMB rows of C, k. The
  // kKB x kNB panel of B stays in L1 while every block of C passes over it; partial sums over
  // the chunks go through C.
  static void row_gemm(const T* __restrict A, int64_t ams, int64_t aks, const T* __restrict B,
                       int64_t bks, int64_t M, int64_t K, int64_t W, T* __restrict Cm,
                       int64_t cms, bool accumulate) {
    const int64_t nw = (W + VL - 1) / VL;
    for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kKB) {
      const int64_t k1 = std::min(K, k0 + kKB);
      const bool acc_in = accumulate || k0 > 0;
      for (int64_t w0 = 0; w0 < nw; w0 += kNB) {
        const int nn = static_cast<int>(std::min<int64_t>(kNB, nw - w0));
        Win wi[kNB];
        for (int t = 0; t < kNB; ++t) wi[t] = win(std::min(w0 + t, nw - 1), W);
        const T* ba = B + wi[0].j0;
        const T* bb = B + wi[1].j0;
        const T* bc = B + wi[2].j0;
        for (int64_t m0 = 0; m0 < M; m0 += kMB) {
          const int nm = static_cast<int>(std::min<int64_t>(kMB, M - m0));
          const T* a0 = A + std::min(m0 + 0, M - 1) * ams;
          const T* a1 = A + std::min(m0 + 1, M - 1) * ams;
          const T* a2 = A + std::min(m0 + 2, M - 1) * ams;
          const T* a3 = A + std::min(m0 + 3, M - 1) * ams;
          V acc[kMB][kNB];
#pragma GCC unroll 4
          for (int i = 0; i < kMB; ++i)
#pragma GCC unroll 3
            for (int t = 0; t < kNB; ++t)
              acc[i][t] = (acc_in && i < nm && t < nn)
                              ? load_lo(Cm + (m0 + i) * cms + wi[t].j0, wi[t].lo)
                              : zero();
          for (int64_t k = k0; k < k1; ++k) {
            const int64_t ob = k * bks, oa = k * aks;
            const V va = load(ba + ob), vb = load(bb + ob), vc = load(bc + ob);
            V a = bcast(a0[oa]);
            acc[0][0] += a * va; acc[0][1] += a * vb; acc[0][2] += a * vc;
            a = bcast(a1[oa]);
            acc[1][0] += a * va; acc[1][1] += a * vb; acc[1][2] += a * vc;
            a = bcast(a2[oa]);
            acc[2][0] += a * va; acc[2][1] += a * vb; acc[2][2] += a * vc;
            a = bcast(a3[oa]);
            acc[3][0] += a * va; acc[3][1] += a * vb; acc[3][2] += a * vc;
          }
#pragma GCC unroll 4
          for (int i = 0; i < kMB; ++i)
#pragma GCC unroll 3
            for (int t = 0; t < kNB; ++t)
              if (i < nm && t < nn)
                store_lo(Cm + (m0 + i) * cms + wi[t].j0, acc[i][t], wi[t].lo);
        }
      }
    }
  }

  // D[j * ldd + jp] = S[jp * lds + j] for j, jp < n.
  static void transpose(const T* __restrict S, int64_t lds, int64_t n, T* __restrict D,
                        int64_t ldd) {
    constexpr int64_t tb = 16;
    for (int64_t a0 = 0; a0 < n; a0 += tb)
      for (int64_t b0 = 0; b0 < n; b0 += tb) {
        const int64_t a1 = std::min(n, a0 + tb), b1 = std::min(n, b0 + tb);
        for (int64_t a = a0; a < a1; ++a)
          for (int64_t b = b0; b < b1; ++b) D[b * ldd + a] = S[a * lds + b];
      }
  }

  // The element-wise passes below run over whole vectors, columns [0, Wv), Wv = W rounded up to
  // VL (<= Wp). Lanes [W, Wv) are computed from zero padding and set back to zero afterwards, so
  // every padding lane of the scratch stays exactly 0.
  static inline int64_t vec_width(int64_t W) { return (W + VL - 1) / VL * VL; }
  static inline void zero_tail(T* row, int64_t W, int64_t Wv) {
    for (int64_t j = W; j < Wv; ++j) row[j] = T(0);
  }

  // Forward softmax of one query row: Ec [H][Wp] and Er [W][Wp] hold the raw dot products; they
  // become the attention weights (Ec[ii] = 0: the pixel itself is counted once, in the row).
  // lse[j] for j < W. mx, sm: [Wp] scratch.
  static void softmax_fwd(T* __restrict Ec, T* __restrict Er, int64_t H, int64_t W, int64_t Wp,
                          int64_t ii, T scale, T* __restrict mx, T* __restrict sm,
                          T* __restrict lse) {
    const int64_t Wv = vec_width(W);
    const V sc = bcast(scale);
    auto row_of = [&](int64_t y) { return y < H ? Ec + y * Wp : Er + (y - H) * Wp; };
    for (int64_t j = 0; j < Wv; j += VL) store(mx + j, bcast(-std::numeric_limits<T>::infinity()));
    for (int64_t y = 0; y < H + W; ++y) {
      if (y == ii) continue;
      T* row = row_of(y);
      for (int64_t j = 0; j < Wv; j += VL) {
        const V e = sc * load(row + j);
        store(row + j, e);
        store(mx + j, vmax(load(mx + j), e));
      }
    }
    for (int64_t j = 0; j < Wv; j += VL) store(sm + j, zero());
    for (int64_t y = 0; y < H + W; ++y) {
      T* row = row_of(y);
      if (y == ii) {
        for (int64_t j = 0; j < Wv; j += VL) store(row + j, zero());
        continue;
      }
      for (int64_t j = 0; j < Wv; j += VL) {
        const V p = vexp(load(row + j) - load(mx + j));
        store(row + j, p);
        store(sm + j, load(sm + j) + p);
      }
    }
    for (int64_t j = 0; j < W; ++j) lse[j] = mx[j] + std::log(sm[j]);
    for (int64_t j = 0; j < Wv; j += VL) store(sm + j, bcast(T(1)) / load(sm + j));
    for (int64_t y = 0; y < H + W; ++y) {
      T* row = row_of(y);
      for (int64_t j = 0; j < Wv; j += VL) store(row + j, load(row + j) * load(sm + j));
      zero_tail(row, W, Wv);
    }
  }

  // S [n][Wp] raw dot products -> P = exp(scale * S - lse) (0 on row skip), in place; lse is
  // the one row of the queries (every S row is a partner of the same W queries).
  static void probs(T* __restrict S, int64_t n, int64_t W, int64_t Wp, int64_t skip, T scale,
                    const T* __restrict lse) {
    const int64_t Wv = vec_width(W);
    const V sc = bcast(scale);
    for (int64_t y = 0; y < n; ++y) {
      T* row = S + y * Wp;
      if (y == skip) {
        for (int64_t j = 0; j < Wv; j += VL) store(row + j, zero());
        continue;
      }
      for (int64_t j = 0; j < Wv; j += VL) store(row + j, vexp(sc * load(row + j) - load(lse + j)));
      zero_tail(row, W, Wv);
    }
  }

  // dA [n][Wp] -> dE * scale = scale * P * (dA - D), in place. D: one row, as lse in probs().
  // (Padding lanes: 0 * (0 - 0).)
  static void dscores(const T* __restrict P, T* __restrict dA, int64_t n, int64_t W, int64_t Wp,
                      T scale, const T* __restrict D) {
    const int64_t Wv = vec_width(W);
    const V sc = bcast(scale);
    for (int64_t y = 0; y < n; ++y) {
      const T* p = P + y * Wp;
      T* a = dA + y * Wp;
      for (int64_t j = 0; j < Wv; j += VL) store(a + j, sc * load(p + j) * (load(a + j) - load(D + j)));
    }
  }

  // ------------------------------------------------------------------------------------------
  // Forward task: rows [i0, i0 + nrows) of image b, nrows <= kTR. Scratch: kTR * (H + W) * Wp
  // + 2 * Wp values, zero-initialised once.
  static void fwd_rows(const FwdArgs<T>& a, int64_t b, int64_t i0, int64_t nrows, T* scratch) {
    const int64_t H = a.H, W = a.W, Wp = a.Wp, HW = H * W, Cqk = a.Cqk, Cv = a.Cv;
    const T* Q = a.q + b * Cqk * HW;
    const T* Kt = a.k + b * Cqk * HW;
    const T* Vt = a.v + b * Cv * HW;
    T* O = a.out + b * Cv * HW;
    T* L = a.lse + b * HW;
    const int nr = static_cast<int>(nrows);
    int64_t roff[kTR];
    for (int r = 0; r < kTR; ++r) roff[r] = (i0 + std::min(r, nr - 1)) * W;

    T* Ec = scratch;                // [kTR][H][Wp]: column energies -> weights
    T* Er = Ec + kTR * H * Wp;      // [kTR][W][Wp]: row energies -> weights, [j'][j]
    T* mx = Er + kTR * W * Wp;      // [Wp]
    T* sm = mx + Wp;                // [Wp]

    // Column energies of the kTR query rows against every row of k (the diagonal is dropped
    // in the softmax), then the row energies Er[r][j'][j] = <k[:, i, j'], q[:, i, j]>.
    col_dot(Q, roff, Kt, Cqk, HW, H, W, Ec, H * Wp, Wp, nr, false);
    for (int r = 0; r < nr; ++r)
      row_gemm(Kt + roff[r], 1, HW, Q + roff[r], HW, W, Cqk, W, Er + r * W * Wp, Wp, false);
    for (int r = 0; r < nr; ++r)
      softmax_fwd(Ec + r * H * Wp, Er + r * W * Wp, H, W, Wp, i0 + r, a.scale, mx, sm,
                  L + roff[r]);
    for (int r = nr; r < kTR; ++r) std::fill(Ec + r * H * Wp, Ec + (r + 1) * H * Wp, T(0));
    if (Cv == 0) return;
    // out rows = column part (stored) + row part (accumulated).
    col_acc(Ec, H * Wp, Wp, Vt, Cv, HW, H, W, O, roff, nr, false);
    for (int r = 0; r < nr; ++r)
      row_gemm(Vt + roff[r], HW, 1, Er + r * W * Wp, Wp, Cv, W, W, O + roff[r], HW, true);
  }

  // Backward task: rows [i0, i0 + nrows) of dq, dk, dv of image b, nrows <= kTR, in pass 0 or
  // pass 1 (every task of pass 0 ends before pass 1 starts). Scratch: 2 * kTR * (H + W) * Wp +
  // W * Wp values, zero-initialised once.
  static void bwd_rows(const BwdArgs<T>& a, int64_t b, int64_t i0, int64_t nrows, T* scratch,
                       int pass) {
    const int64_t H = a.H, W = a.W, Wp = a.Wp, HW = H * W, Cqk = a.Cqk, Cv = a.Cv;
    const T sc = a.scale;
    const T* dO = a.dout + b * Cv * HW;
    const T* Q = a.q + b * Cqk * HW;
    const T* Kt = a.k + b * Cqk * HW;
    const T* Vt = a.v + b * Cv * HW;
    const T* L = a.lse + b * H * Wp;
    const T* D = a.D + b * H * Wp;
    T* dQ = a.dq + b * Cqk * HW;
    T* dK = a.dk + b * Cqk * HW;
    T* dV = a.dv + b * Cv * HW;
    const int nr = static_cast<int>(nrows);
    int64_t roff[kTR];
    for (int r = 0; r < kTR; ++r) roff[r] = (i0 + std::min(r, nr - 1)) * W;

    T* H1 = scratch;               // [kTR][H][Wp]
    T* H2 = H1 + kTR * H * Wp;     // [kTR][H][Wp]
    T* W1 = H2 + kTR * H * Wp;     // [kTR][W][Wp]
    T* W2 = W1 + kTR * W * Wp;     // [kTR][W][Wp]
    T* Tt = W2 + kTR * W * Wp;     // [W][Wp]
    const int64_t hs = H * Wp, ws = W * Wp;
    auto zero_rows = [&](T* buf, int64_t stride) {
      for (int r = nr; r < kTR; ++r) std::fill(buf + r * stride, buf + (r + 1) * stride, T(0));
    };
    T* Pc = a.Pc + b * H * hs;
    T* dSc = a.dSc + b * H * hs;

    if (pass == 1) {
      // (3) Keys in rows i, seen by the queries (y, j) of their column, y != i (the weight of
      // y == i is 0: that pixel is counted in its row): P and dE * scale of those queries are
      // pass 0's, at [y][i]. dv and dk rows += their column parts.
      for (int r = 0; r < nr; ++r)
        for (int64_t y = 0; y < H; ++y) {
          std::copy(Pc + y * hs + (i0 + r) * Wp, Pc + y * hs + (i0 + r + 1) * Wp, H1 + r * hs + y * Wp);
          std::copy(dSc + y * hs + (i0 + r) * Wp, dSc + y * hs + (i0 + r + 1) * Wp, H2 + r * hs + y * Wp);
        }
      zero_rows(H1, hs);
      zero_rows(H2, hs);
      col_acc(H1, hs, Wp, dO, Cv, HW, H, W, dV, roff, nr, true);
      col_acc(H2, hs, Wp, Q, Cqk, HW, H, W, dK, roff, nr, true);
      return;
    }

    // (1) Queries in rows i: P (column: H1, row: W1) from lse, dA (H2, W2), dE * scale in place.
    col_dot(Q, roff, Kt, Cqk, HW, H, W, H1, hs, Wp, nr, false);
    col_dot(dO, roff, Vt, Cv, HW, H, W, H2, hs, Wp, nr, false);
    for (int r = 0; r < nr; ++r) {
      row_gemm(Kt + roff[r], 1, HW, Q + roff[r], HW, W, Cqk, W, W1 + r * ws, Wp, false);
      row_gemm(Vt + roff[r], 1, HW, dO + roff[r], HW, W, Cv, W, W2 + r * ws, Wp, false);
      const T* Lr = L + (i0 + r) * Wp;
      const T* Dr = D + (i0 + r) * Wp;
      probs(H1 + r * hs, H, W, Wp, i0 + r, sc, Lr);
      probs(W1 + r * ws, W, W, Wp, -1, sc, Lr);
      dscores(H1 + r * hs, H2 + r * hs, H, W, Wp, sc, Dr);
      dscores(W1 + r * ws, W2 + r * ws, W, W, Wp, sc, Dr);
    }
    zero_rows(H1, hs);
    zero_rows(H2, hs);
    std::copy(H1, H1 + nr * hs, Pc + i0 * hs);  // kept for pass 1 (whole rows: padding lanes 0)
    std::copy(H2, H2 + nr * hs, dSc + i0 * hs);
    // dq rows: column part (stored) + row part (accumulated).
    col_acc(H2, hs, Wp, Kt, Cqk, HW, H, W, dQ, roff, nr, false);
    for (int r = 0; r < nr; ++r)
      row_gemm(Kt + roff[r], HW, 1, W2 + r * ws, Wp, Cqk, W, W, dQ + roff[r], HW, true);

    // (2) Keys in rows i, seen by the queries of the same row: dk, dv rows (stored; pass 1
    // adds the column parts).
    for (int r = 0; r < nr; ++r) {
      transpose(W2 + r * ws, Wp, W, Tt, Wp);
      row_gemm(Q + roff[r], HW, 1, Tt, Wp, Cqk, W, W, dK + roff[r], HW, false);
      transpose(W1 + r * ws, Wp, W, Tt, Wp);
      row_gemm(dO + roff[r], HW, 1, Tt, Wp, Cv, W, W, dV + roff[r], HW, false);
    }
  }

  // D[i][j] = sum_c dout[c, i, j] * out[c, i, j]; padded copy of the lse row. Row i of image b.
  static void prep_row(const T* __restrict dO, const T* __restrict O, const T* __restrict lse,
                       int64_t Cv, int64_t HW, int64_t W, int64_t Wp, T* __restrict D,
                       T* __restrict Lp) {
    for (int64_t j = 0; j < Wp; ++j) D[j] = T(0);
    for (int64_t c = 0; c < Cv; ++c) {
      const T* x = dO + c * HW;
      const T* y = O + c * HW;
      for (int64_t j = 0; j < W; ++j) D[j] += x[j] * y[j];
    }
    for (int64_t j = 0; j < W; ++j) Lp[j] = lse[j];
    for (int64_t j = W; j < Wp; ++j) Lp[j] = T(0);
  }
};

// Entry points: pick the vector width by W.
template <class T>
constexpr int vec_lanes() {
  return 32 / static_cast<int>(sizeof(T));
}

template <class T>
void fwd_rows(const FwdArgs<T>& a, int64_t b, int64_t i0, int64_t nrows, T* scratch) {
  if (a.W >= vec_lanes<T>())
    Kern<T, vec_lanes<T>()>::fwd_rows(a, b, i0, nrows, scratch);
  else
    Kern<T, 1>::fwd_rows(a, b, i0, nrows, scratch);
}

template <class T>
void bwd_rows(const BwdArgs<T>& a, int64_t b, int64_t i0, int64_t nrows, T* scratch, int pass) {
  if (a.W >= vec_lanes<T>())
    Kern<T, vec_lanes<T>()>::bwd_rows(a, b, i0, nrows, scratch, pass);
  else
    Kern<T, 1>::bwd_rows(a, b, i0, nrows, scratch, pass);
}

template <class T>
void prep_row(const T* dO, const T* O, const T* lse, int64_t Cv, int64_t HW, int64_t W,
              int64_t Wp, T* D, T* Lp) {
  Kern<T, 1>::prep_row(dO, O, lse, Cv, HW, W, Wp, D, Lp);
}

}  // namespace FASTCTX_CC_ISA
}  // namespace cc_cpu
}  // namespace fastctx

#ifdef FASTCTX_CC_IN_REGISTER_DEFAULT
#undef FASTCTX_CC_IN_REGISTER
#undef FASTCTX_CC_IN_REGISTER_DEFAULT
#endif
