// Region attention (every pixel attends to S keys), CPU kernels: the per-task work of
// fastctx::ra_fwd / ra_bwd. Launchers, checks and registration: region_attention.cpp. Contract and
// backward math: shared/docs/OPERATORS.md section 4 (region_attention).
//
// NO INCLUDE GUARD, on purpose: region_attention.cpp includes this file once per instruction set,
// each time with FASTCTX_RA_ISA naming a namespace and FASTCTX_RA_VEC_BYTES its vector width (and,
// for AVX2 and AVX-512, under `#pragma GCC target(...)`), so every kernel below is compiled for the
// baseline target, AVX2 + FMA and AVX-512 (64-byte vectors); the launcher picks one at run time
// (Geom::vbytes) with a CPU feature test
// (as criss_cross_kernels.h does, and for the same reason: GCC's target_clones dispatcher tests
// the CPU model and never picks the AVX2 clone on AMD parts). Only the entry points at the bottom
// are called from outside a namespace; they take no vector-typed arguments.
//
// Design (NCHW: per image, q is a Cqk x N matrix whose pixel axis n is the stride-1 axis; k is
// Cqk x S, v is Cv x S):
// - A pixel block is NB = kNBW * VL consecutive pixels of one image (VL = vector lanes: 8 floats
//   or 4 doubles; VL = 1 when N < 8 resp. 4; the AVX-512 build takes kNBW / 2 windows of 16
//   floats or 8 doubles: the same pixels). A last block of fewer than VL pixels is merged
//   into the one before it, so a block has nb in [VL, NB + VL) pixels (or N < VL with VL = 1).
//   Its pixels are covered by ceil(nb / VL) windows of VL lanes; the last one is shifted left to
//   end at the block's last pixel (it overlaps the window before it and recomputes those lanes
//   with the same arithmetic, so stores of the overlap write the same values twice): no load or
//   store ever leaves the block.
// - All arithmetic is one register-blocked GEMM kernel, 4 rows x 3 vectors = 12 accumulators
//   (6 x 2 and 8 x 1 for a last, narrower panel; fewer rows at the end of M):
//     C[m][col] (+)= sum_kk A[m][kk] * B[kk][col]      (A broadcast, B and C vectors along col)
//   used six ways, always with the vector axis along a stride-1 axis:
//     E  [s][n]  = sum_c kT[s][c] * qb[c][n]          (energies; kT: k transposed, packed once)
//     out[c][n]  = sum_s v[c][s]  * P[s][n]           (straight into the NCHW output)
//     dA [s][n]  = sum_c vT[s][c] * dob[c][n]         (backward)
//     dq [c][n]  = sum_s k[c][s]  * dEs[s][n]         (backward, straight into dq)
//     dk [c][s] += sum_n qb[c][n] * dEst[n][s]        (backward, vectors along s: dEs and P are
//     dv [c][s] += sum_n dob[c][n] * Pt[n][s]          transposed per block, S x nb values)
//   qb / dob: the block's q / dout columns packed contiguously ([C][NBcap]; N is often a power of
//   two, and 512 rows at a 32 KiB stride would all fall into the same cache sets). A
//   channels-last q or dout (N x C per image) is read as it is and transposed into qb / dob
//   block by block (vec.h's pack_map), instead of a transposed copy of the whole map first.
// - Softmax: vectorised over the pixels of a block (one lane per pixel), three passes over s.
//   When asked (keep_p), the forward also stores the weights P ([B, S, N], S rows of nb values
//   per block) and the backward reads them back instead of recomputing them: that saves the
//   energy GEMM (one of five) and the exponentials, for N x S values of memory (the reference's
//   autograd keeps P too). Without them the backward recomputes P = exp(scale E + bias - lse)
//   per block (a pixel with lse = -inf, all keys masked, gets P = 0). The backward takes
//   D = sum_s P * dA, which equals <dout, out> in exact arithmetic (out = sum_s P v) and needs
//   no pass over out.
// - Scratch columns of a block past its nb pixels (up to the next multiple of VL) hold stale
//   finite values from earlier blocks (or the initial zeros); the element-wise passes run over
//   them harmlessly (lane-wise), the backward zeroes their P so they get dE = 0, and nothing
//   past nb is ever stored or reduced.
// - The backward's reductions over pixels (dk, dv, dbias) go into per-task partial buffers; a
//   task is a fixed range of blocks of one image that does not depend on the number of threads,
//   and the launcher adds the partials in task order: bit-identical results run to run and for
//   any thread count.

#ifndef FASTCTX_RA_ISA
#error "region_attention_kernels.h: define FASTCTX_RA_ISA (a namespace name) before including"
#endif
#ifndef FASTCTX_RA_VEC_BYTES
#error "region_attention_kernels.h: define FASTCTX_RA_VEC_BYTES (32 or 64) before including"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#define FASTCTX_VEC_ISA FASTCTX_RA_ISA
#include "vec.h"
#undef FASTCTX_VEC_ISA

// Shared by every instruction set (defined once): blocking constants, geometry, task arguments.
#ifndef FASTCTX_RA_CPU_ARGS_DEFINED
#define FASTCTX_RA_CPU_ARGS_DEFINED
namespace fastctx {
namespace ra_cpu {

constexpr int kMR = 4;             // GEMM register block: rows (broadcast operand)
constexpr int kNR = 3;             // GEMM register block: vectors (12 accumulators + 3 + 1 regs)
constexpr int kMRmax = 8;          // GEMM register block: rows when a panel has 1 vector
constexpr int64_t kNBW = 12;       // windows (vectors) per pixel block: 96 floats, 48 doubles
constexpr int64_t kNBWLean = 8;    // the same, for the backward that recomputes the weights
constexpr int64_t kKC = 256;       // GEMM: k per chunk when k runs over channels (E, dA)
constexpr int64_t kKS = 256;       // GEMM: k per chunk when k runs over keys (out, dq)
constexpr int64_t kTaskBlocks = 4; // backward: about this many blocks per task

template <class T>
constexpr int64_t vec_lanes(int64_t bytes = 32) {
  return bytes / static_cast<int64_t>(sizeof(T));
}

// Pixel blocking of one image (the same for every image of a call).
struct Geom {
  int64_t vbytes;   // vector bytes of the instruction set that runs it (32: AVX2, 64: AVX-512)
  int64_t VL;       // vector lanes (1 when N < vec_lanes)
  int64_t NB;       // pixels of a full block
  int64_t NBcap;    // scratch columns of a block (the largest block, rounded up to VL)
  int64_t nblocks;  // blocks per image
  int64_t Sp;       // S rounded up to VL (rows of the transposed scratch)
};

template <class T>
Geom make_geom(int64_t N, int64_t S, int64_t nbw = kNBW, int64_t vbytes = 32) {
  Geom g;
  g.vbytes = vbytes;
  g.VL = N >= vec_lanes<T>(vbytes) ? vec_lanes<T>(vbytes) : 1;
  // nbw counts 32-byte windows: a wider build takes fewer, wider windows, so a block holds the
  // same pixels in every build (the AVX-512 build's scratch is the AVX2 build's: twice the pixels
  // per block put OCR's S = 19 fwd+bwd at 1.01x the reference's peak on 2 threads).
  g.NB = std::max<int64_t>(1, nbw * 32 / vbytes) * g.VL;
  g.nblocks = std::max<int64_t>(1, (N + g.NB - 1) / g.NB);
  if (g.nblocks > 1 && N - (g.nblocks - 1) * g.NB < g.VL) --g.nblocks;  // merge a short tail
  g.NBcap = (std::max(g.NB, N - (g.nblocks - 1) * g.NB) + g.VL - 1) / g.VL * g.VL;
  g.Sp = (S + g.VL - 1) / g.VL * g.VL;
  return g;
}

// First pixel and pixel count of block t.
inline void block_range(const Geom& g, int64_t N, int64_t t, int64_t& n0, int64_t& nb) {
  n0 = t * g.NB;
  nb = t == g.nblocks - 1 ? N - n0 : g.NB;
}

// Per-thread scratch (elements).
inline int64_t fwd_scratch(const Geom& g, int64_t Cqk, int64_t S) {
  return Cqk * g.NBcap + S * g.NBcap;
}
inline int64_t bwd_scratch(const Geom& g, int64_t Cqk, int64_t Cv, int64_t S) {
  return (Cqk + Cv + 2 * S + 1) * g.NBcap + 2 * g.NBcap * g.Sp + S * g.VL;
}
// Per-task partial sums: dk [Cqk][Sp], dv [Cv][Sp], dbias [Sp].
inline int64_t partial_size(const Geom& g, int64_t Cqk, int64_t Cv) {
  return (Cqk + Cv + 1) * g.Sp;
}

// Forward arguments (pointers at image 0; every tensor contiguous).
template <class T>
struct FwdArgs {
  const T* q;     // [B, Cqk, N], or [B, N, Cqk] when q_nhwc
  const T* kT;    // [B, S, Cqk]  (k transposed)
  const T* v;     // [B, Cv, S]
  const T* bias;  // [B, S]
  T* out;         // [B, Cv, N]
  T* lse;         // [B, N]
  T* p;           // [B, S, N], or null: the weights, kept for the backward
  int64_t Cqk, Cv, S, N;
  T scale;
  bool q_nhwc;    // q is a channels-last map, read as it is (pack_map)
};

// Backward arguments. dk / dv / dbias go to a per-task partial buffer, see bwd_task.
template <class T>
struct BwdArgs {
  const T* dout;  // [B, Cv, N], or [B, N, Cv] when dout_nhwc
  const T* q;     // [B, Cqk, N], or [B, N, Cqk] when q_nhwc
  const T* k;     // [B, Cqk, S]
  const T* kT;    // [B, S, Cqk]  (k transposed; read only when p is null)
  const T* vT;    // [B, S, Cv]
  const T* bias;  // [B, S]       (read only when p is null)
  const T* lse;   // [B, N]       (read only when p is null)
  const T* p;     // [B, S, N]: the weights the forward kept, or null: recomputed from lse
  T* dq;          // [B, Cqk, N]
  int64_t Cqk, Cv, S, N;
  T scale;
  bool q_nhwc, dout_nhwc;  // q / dout is a channels-last map, read as it is (pack_map)
};

}  // namespace ra_cpu
}  // namespace fastctx
#endif  // FASTCTX_RA_CPU_ARGS_DEFINED

namespace fastctx {
namespace ra_cpu {
namespace FASTCTX_RA_ISA {

template <class T, int VL>
struct Kern : cpu::FASTCTX_RA_ISA::RegGemm<T, VL, kMR, kNR, kMRmax> {
  typedef cpu::FASTCTX_RA_ISA::RegGemm<T, VL, kMR, kNR, kMRmax> Base;
  typedef typename Base::V V;
  using Base::bcast;
  using Base::gemm;
  using Base::lane;
  using Base::load;
  using Base::pack;
  using Base::pack_map;
  using Base::store;
  using Base::vexp;
  using Base::vmax;
  using Base::windows;
  using Base::zero;

  // dst[n * Sp + s] = src[s * NBcap + n] for s < S, n < nb (columns [S, Sp) of dst untouched).
  static void transpose(const T* __restrict src, int64_t S, int64_t NBcap, int64_t nb,
                        T* __restrict dst, int64_t Sp) {
    constexpr int64_t tb = 16;
    for (int64_t s0 = 0; s0 < S; s0 += tb)
      for (int64_t n0 = 0; n0 < nb; n0 += tb) {
        const int64_t s1 = std::min(S, s0 + tb), n1 = std::min(nb, n0 + tb);
        for (int64_t n = n0; n < n1; ++n)
          for (int64_t s = s0; s < s1; ++s) dst[n * Sp + s] = src[s * NBcap + n];
      }
  }

  // ------------------------------------------------------------------------------------------
  // Forward of pixel block t of image b. Scratch: fwd_scratch values.
  static void fwd_block(const FwdArgs<T>& a, const Geom& g, int64_t b, int64_t t, T* scratch) {
    const int64_t Cqk = a.Cqk, Cv = a.Cv, S = a.S, N = a.N, NBcap = g.NBcap;
    int64_t n0, nb;
    block_range(g, N, t, n0, nb);
    T* qb = scratch;              // [Cqk][NBcap]: the block's q columns
    T* E = qb + Cqk * NBcap;      // [S][NBcap]: energies -> weights
    int64_t col[kNBW + 1];
    const int64_t nw = windows(nb, col);

    pack_map(a.q + b * Cqk * N, a.q_nhwc, Cqk, N, n0, nb, qb, NBcap);
    gemm(a.kT + b * S * Cqk, Cqk, qb, NBcap, S, Cqk, col, nw, E, NBcap, false, kKC, false);

    // Softmax over s, one lane per pixel, over whole vectors of columns [0, ncol).
    const T* bias = a.bias + b * S;
    T* lse = a.lse + b * N + n0;
    const V sc = bcast(a.scale), ninf = bcast(-std::numeric_limits<T>::infinity());
    const int64_t ncol = (nb + VL - 1) / VL * VL;
    for (int64_t c = 0; c < ncol; c += VL) {
      V m = ninf;
      for (int64_t s = 0; s < S; ++s) {
        const V e = sc * load(E + s * NBcap + c) + bcast(bias[s]);
        store(E + s * NBcap + c, e);
        m = vmax(m, e);
      }
      m = m == ninf ? zero() : m;  // fully masked: exp(-inf - 0) = 0, no NaN
      V sum = zero();
      for (int64_t s = 0; s < S; ++s) {
        const V p = vexp(load(E + s * NBcap + c) - m);
        store(E + s * NBcap + c, p);
        sum += p;
      }
      const V inv = sum > zero() ? bcast(T(1)) / sum : zero();  // (fully masked: 0, not 1/0)
      for (int64_t s = 0; s < S; ++s) store(E + s * NBcap + c, load(E + s * NBcap + c) * inv);
      for (int l = 0; l < VL && c + l < nb; ++l) {
        const T sl = lane(sum, l);
        lse[c + l] = sl > T(0) ? lane(m, l) + std::log(sl) : -std::numeric_limits<T>::infinity();
      }
    }
    if (a.p) {
      T* P = a.p + b * S * N + n0;
      for (int64_t s = 0; s < S; ++s)
        std::memcpy(P + s * N, E + s * NBcap, static_cast<size_t>(nb) * sizeof(T));
    }
    // out[:, block] = v P.
    gemm(a.v + b * Cv * S, S, E, NBcap, Cv, S, col, nw, a.out + b * Cv * N + n0, N, false, kKS,
         true);
  }

  // ------------------------------------------------------------------------------------------
  // Backward of blocks [t0, t1) of image b (one task). dq columns of those blocks are stored;
  // the task's sums over its pixels go to part: dk [Cqk][Sp], dv [Cv][Sp], dbias [Sp] (entries
  // s >= S unspecified). Scratch: bwd_scratch values.
  static void bwd_task(const BwdArgs<T>& a, const Geom& g, int64_t b, int64_t t0, int64_t t1,
                       T* scratch, T* part) {
    const int64_t Cqk = a.Cqk, Cv = a.Cv, S = a.S, N = a.N, NBcap = g.NBcap, Sp = g.Sp;
    T* qb = scratch;             // [Cqk][NBcap]: the block's q columns
    T* dob = qb + Cqk * NBcap;   // [Cv][NBcap]: the block's dout columns
    T* E = dob + Cv * NBcap;     // [S][NBcap]: P (zero past the block's pixels)
    T* dA = E + S * NBcap;       // [S][NBcap]: dA -> scale * dE
    T* Pt = dA + S * NBcap;      // [NBcap][Sp]: P transposed (columns >= S stay 0)
    T* dEt = Pt + NBcap * Sp;    // [NBcap][Sp]: scale * dE transposed (columns >= S stay 0)
    T* dbv = dEt + NBcap * Sp;   // [S][VL]: dbias, lane-wise partial sums
    T* lsb = dbv + S * VL;       // [NBcap]: the block's lse (when the weights are recomputed)
    T* dK = part;
    T* dV = dK + Cqk * Sp;
    T* dB = dV + Cv * Sp;

    const T* Q = a.q + b * Cqk * N;
    const T* dO = a.dout + b * Cv * N;
    const T* vT = a.vT + b * S * Cv;
    const T* Kc = a.k + b * Cqk * S;
    const T* Pg = a.p ? a.p + b * S * N : nullptr;
    const T* kT = Pg ? nullptr : a.kT + b * S * Cqk;
    const T* bias = Pg ? nullptr : a.bias + b * S;
    const T* lse = Pg ? nullptr : a.lse + b * N;
    const V ninf = bcast(-std::numeric_limits<T>::infinity());
    const V pinf = bcast(std::numeric_limits<T>::infinity());
    T* dQ = a.dq + b * Cqk * N;
    const V sc = bcast(a.scale);
    int64_t scol[64];  // columns of the s vectors of dEt / Pt, 64 at a time
    std::fill(dbv, dbv + S * VL, T(0));

    for (int64_t t = t0; t < t1; ++t) {
      int64_t n0, nb;
      block_range(g, N, t, n0, nb);
      int64_t col[kNBW + 1];
      const int64_t nw = windows(nb, col);
      const int64_t ncol = (nb + VL - 1) / VL * VL;

      pack_map(Q, a.q_nhwc, Cqk, N, n0, nb, qb, NBcap);
      pack_map(dO, a.dout_nhwc, Cv, N, n0, nb, dob, NBcap);
      if (Pg) {
        pack(Pg + n0, S, N, nb, E, NBcap);
      } else {
        // P = exp(scale E + bias - lse), E = k^T q; a fully masked pixel (lse = -inf) gets
        // exp(e - inf) = 0. Columns past nb are zeroed below.
        gemm(kT, Cqk, qb, NBcap, S, Cqk, col, nw, E, NBcap, false, kKC, false);
        std::memcpy(lsb, lse + n0, static_cast<size_t>(nb) * sizeof(T));
        std::fill(lsb + nb, lsb + ncol, T(0));
        for (int64_t c = 0; c < ncol; c += VL) {
          V l = load(lsb + c);
          l = l == ninf ? pinf : l;
          for (int64_t s = 0; s < S; ++s)
            store(E + s * NBcap + c, vexp(sc * load(E + s * NBcap + c) + bcast(bias[s]) - l));
        }
      }
      if (ncol > nb)
        for (int64_t s = 0; s < S; ++s) std::fill(E + s * NBcap + nb, E + s * NBcap + ncol, T(0));
      gemm(vT, Cv, dob, NBcap, S, Cv, col, nw, dA, NBcap, false, kKC, false);

      // D = sum_s P dA, dE = P (dA - D).
      for (int64_t c = 0; c < ncol; c += VL) {
        V D = zero();
        for (int64_t s = 0; s < S; ++s) D += load(E + s * NBcap + c) * load(dA + s * NBcap + c);
        for (int64_t s = 0; s < S; ++s) {
          const V de = load(E + s * NBcap + c) * (load(dA + s * NBcap + c) - D);
          store(dbv + s * VL, load(dbv + s * VL) + de);
          store(dA + s * NBcap + c, sc * de);
        }
      }
      // dq[:, block] = k (scale dE).
      gemm(Kc, S, dA, NBcap, Cqk, S, col, nw, dQ + n0, N, false, kKS, true);

      // dk += q (scale dE)^T, dv += dout P^T, over the block's pixels.
      transpose(E, S, NBcap, nb, Pt, Sp);
      transpose(dA, S, NBcap, nb, dEt, Sp);
      const bool acc = t > t0;
      const int64_t nsv = Sp / VL;
      for (int64_t s0 = 0; s0 < nsv; s0 += 64) {
        const int64_t ns = std::min<int64_t>(64, nsv - s0);
        for (int64_t i = 0; i < ns; ++i) scol[i] = (s0 + i) * VL;
        gemm(qb, NBcap, dEt, Sp, Cqk, nb, scol, ns, dK, Sp, acc, kKC, false);
        gemm(dob, NBcap, Pt, Sp, Cv, nb, scol, ns, dV, Sp, acc, kKC, false);
      }
    }
    for (int64_t s = 0; s < S; ++s) {
      T sum = T(0);
      for (int l = 0; l < VL; ++l) sum += dbv[s * VL + l];
      dB[s] = sum;
    }
  }
};

// Entry points: pick the vector width of the geometry.
template <class T>
void fwd_block(const FwdArgs<T>& a, const Geom& g, int64_t b, int64_t t, T* scratch) {
  if (g.VL == vec_lanes<T>(FASTCTX_RA_VEC_BYTES))
    Kern<T, vec_lanes<T>(FASTCTX_RA_VEC_BYTES)>::fwd_block(a, g, b, t, scratch);
  else
    Kern<T, 1>::fwd_block(a, g, b, t, scratch);
}

template <class T>
void bwd_task(const BwdArgs<T>& a, const Geom& g, int64_t b, int64_t t0, int64_t t1, T* scratch,
              T* part) {
  if (g.VL == vec_lanes<T>(FASTCTX_RA_VEC_BYTES))
    Kern<T, vec_lanes<T>(FASTCTX_RA_VEC_BYTES)>::bwd_task(a, g, b, t0, t1, scratch, part);
  else
    Kern<T, 1>::bwd_task(a, g, b, t0, t1, scratch, part);
}

}  // namespace FASTCTX_RA_ISA
}  // namespace ra_cpu
}  // namespace fastctx
