// Criss-cross attention (CCNet), CPU: launchers and the CPU registration of the ops
// fastctx::cc_fwd and fastctx::cc_bwd (schemas: csrc/ops/criss_cross.cpp). Semantics:
// shared/docs/OPERATORS.md section 1.
//
// Inputs are made NCHW-contiguous in the compute dtype by prepare(): that copy is the only copy
// of a whole input, and a no-op for NCHW float32 / float64 input (other strided inputs, and
// float16 / bfloat16 inputs, which are upcast to float32, are copied once). Channels-last
// float32 / float64 inputs are read in place: their rows and columns are strided matrices that
// the GEMMs take as they are (Map). Outputs are NCHW-contiguous in the input dtype; lse is
// float32 (float64 for float64 inputs). Accumulation is float32 for float16 / bfloat16 / float32
// and float64 for float64.
//
// Design: the attention of a pixel is a row part (the W pixels of its row) and a column part (the
// H pixels of its column), and both are small dense attentions, so all the arithmetic is BLAS
// GEMMs (gemm() below; torch's BLAS runs single-threaded inside at::parallel_for's workers):
// - a row i of the NCHW map is a C x W matrix with leading dimension H * W, so the row parts read
//   q, k, v, dout and write out, dq, dk, dv in place, with no copy: per row, E_row = Q_i^T K_i,
//   out_i += V_i P_row^T (backward: dP_row = dO_i^T V_i, dq_i += K_i dS_row^T,
//   dk_i += Q_i dS_row, dv_i += dO_i P_row);
// - a column has no unit stride, so the column parts work on tiles of kTile columns packed into
//   per-thread scratch as one C x H matrix per column (pack_cols; only the tile is copied, never
//   a whole input), and their results are unpacked into the outputs' columns. (A column of a
//   channels-last input is an H x C matrix with leading dimension W * C: read in place.)
// One image at a time, the energies of every pixel are kept in E [H][W][Ld]: a pixel's H column
// energies, then its W row energies, padded to Ld (what the reference's torch.cat builds, without
// the (B, H, W, H + W) tensor for every image at once); the column GEMMs write the first part
// (rows of stride W * Ld), the row GEMMs the second (stride Ld), and the joint softmax of a pixel
// is one pass over its Ld values (criss_cross_kernels.h). Per image: row energies (parallel over
// rows), then per column tile the column energies, the softmax of the tile's pixels and the
// column part of the output, which is written; then the row parts are added (parallel over rows).
// The backward recomputes E, and dP in a second buffer G of the same layout, the same way; the
// weights come out of the same softmax code as the forward's, bit for bit, and D = <dout, out>
// of a pixel is sum P dP over its row of E and G (so lse and out are checked but not read).
// Small maps take several images at once (images_per_group).
// Each output element is written by one GEMM call of one thread and then added to by one other:
// results are deterministic run to run and do not depend on the number of threads.
// (Until session 13 the kernels were hand-written, register-blocked loops: ~40 GFLOP/s a thread
// for the row parts and ~20 for the column parts, against ~80 for MKL's GEMMs at these sizes.)
//
// Vector code: the passes of criss_cross_kernels.h are compiled twice, for the baseline target
// and (x86-64 with GCC) for AVX2 + FMA; __builtin_cpu_supports picks one at run time, so no
// -march flag is needed.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../ops/criss_cross.h"
#include "common.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#define FASTCTX_CC_ISA isa_base
#include "criss_cross_kernels.h"
#undef FASTCTX_CC_ISA

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define FASTCTX_CC_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FASTCTX_CC_ISA isa_avx2
#include "criss_cross_kernels.h"
#undef FASTCTX_CC_ISA
#pragma GCC pop_options
#endif

namespace fastctx {
namespace cc_cpu {
namespace {

using cpu::gemm;
using cpu::Mat;
using cpu::mat;
using cpu::prepare;
using cpu::use_avx2;

#define CC_OP "fastctx.criss_cross_attention"

template <class T>
T softmax_fwd(T* row, int64_t L, int64_t Ld, int64_t self, T scale) {
#ifdef FASTCTX_CC_HAVE_AVX2
  if (use_avx2()) return isa_avx2::softmax_fwd<T>(row, L, Ld, self, scale);
#endif
  return isa_base::softmax_fwd<T>(row, L, Ld, self, scale);
}

template <class T>
void softmax_bwd(const T* P, T* dP, int64_t Ld, T scale) {
#ifdef FASTCTX_CC_HAVE_AVX2
  if (use_avx2()) return isa_avx2::softmax_bwd<T>(P, dP, Ld, scale);
#endif
  isa_base::softmax_bwd<T>(P, dP, Ld, scale);
}

template <bool Pack, class T>
void move_cols(T* x, int64_t C, int64_t H, int64_t W, int64_t j0, int64_t tn, T* d) {
#ifdef FASTCTX_CC_HAVE_AVX2
  if (use_avx2()) return isa_avx2::move_cols<Pack, T>(x, C, H, W, j0, tn, d);
#endif
  isa_base::move_cols<Pack, T>(x, C, H, W, j0, tn, d);
}

// A tile of columns of an image into its packed copy, and back (move_cols, kernels header).
template <class T>
void pack_cols(const T* x, int64_t C, int64_t H, int64_t W, int64_t j0, int64_t tn, T* d) {
  move_cols<true>(const_cast<T*>(x), C, H, W, j0, tn, d);  // x is only read
}
template <class T>
void unpack_cols(const T* s, int64_t C, int64_t H, int64_t W, int64_t j0, int64_t tn, T* x) {
  move_cols<false>(x, C, H, W, j0, tn, const_cast<T*>(s));  // s is only read
}

// An input map [B, C, H, W] as the GEMMs read it: NCHW-contiguous, or channels-last (nhwc), in
// place. Row i of an image is a C x W matrix either way (NCHW: leading dimension H * W; channels-
// last: its transpose, W x C with leading dimension C). A column of a channels-last image is an
// H x C matrix with leading dimension W * C, read in place too; NCHW columns are packed per tile
// (pack_cols) into per-thread scratch.
template <class T>
struct Map {
  const T* p;
  int64_t C, H, W;
  bool nhwc;

  Mat<T> row(int64_t b, int64_t i) const {
    return nhwc ? mat(p + (b * H * W + i * W) * C, W, C, C).t()
                : mat(p + b * C * H * W + i * W, C, W, H * W);
  }
  // Columns [j0, j0 + tn) of image b into d (tn x C x H) when NCHW; nothing to do when nhwc.
  void pack(int64_t b, int64_t j0, int64_t tn, T* d) const {
    if (!nhwc) pack_cols(p + b * C * H * W, C, H, W, j0, tn, d);
  }
  // Column j0 + t of image b as a C x H matrix (d: what pack() filled).
  Mat<T> col(int64_t b, int64_t j0, int64_t t, const T* d) const {
    return nhwc ? mat(p + (b * H * W + j0 + t) * C, H, C, W * C).t() : mat(d + t * C * H, C, H, H);
  }
};

// An input for the GEMMs: a channels-last map of the compute dtype in place when BLAS's 32-bit
// leading dimensions reach its columns (W * C), else prepare()'s NCHW copy.
inline at::Tensor gemm_input(const at::Tensor& t, at::ScalarType ct) {
  bool nhwc = false;
  if (t.size(1) * t.size(3) > std::numeric_limits<int>::max()) return prepare(t, ct);
  return cpu::prepare_or_nhwc(t, ct, nhwc);
}

// The Map of what gemm_input() gave: NCHW-contiguous or channels-last.
template <class T>
Map<T> as_map(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.size(1), t.size(2), t.size(3), cpu::is_nhwc(t)};
}

// Ld: H + W rounded up to 64 bytes.
template <class T>
int64_t row_len(int64_t H, int64_t W) {
  constexpr int64_t q = 64 / sizeof(T);
  return (H + W + q - 1) / q * q;
}

// Images processed together: as many as keep one energy buffer ([images][H][W][Ld]) within
// 8 MiB (one image of 97 x 97 at a time; all of a small batch at once, so that small maps do not
// pay three parallel regions per image).
template <class T>
int64_t images_per_group(int64_t B, int64_t HW, int64_t Ld) {
  const int64_t per_image = std::max<int64_t>(1, HW * Ld * int64_t(sizeof(T)));
  return std::clamp<int64_t>((int64_t(8) << 20) / per_image, 1, B);
}

// BLAS takes 32-bit sizes: the leading dimensions of the row GEMMs (H * W) and of the column
// energies (W * Ld) must fit.
inline void check_blas_strides(int64_t HW, int64_t WLd, int64_t H, int64_t W) {
  TORCH_CHECK(HW <= std::numeric_limits<int>::max() && WLd <= std::numeric_limits<int>::max(),
              CC_OP ": the cpu backend's BLAS calls take 32-bit strides; a ", H, " x ", W,
              " map is too large for them");
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> cc_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                              const at::Tensor& v_in, double scale) {
  cc_checks::qkv(at::kCPU, q_in, k_in, v_in, "cc_fwd");
  const int64_t B = q_in.size(0), H = q_in.size(2), W = q_in.size(3);
  const int64_t Cv = v_in.size(1);
  int64_t Cqk = q_in.size(1);
  const at::ScalarType dt = q_in.scalar_type(), ct = acc_dtype(dt);
  auto lse = at::empty({B, H, W}, q_in.options().dtype(ct));
  if (B == 0 || H == 0 || W == 0) return {at::empty({B, Cv, H, W}, v_in.options()), lse};

  at::Tensor q, k;
  if (Cqk == 0) {  // every energy is 0: run with one zero channel
    Cqk = 1;
    q = k = at::zeros({B, 1, H, W}, q_in.options().dtype(ct));
  } else {
    q = gemm_input(q_in, ct);
    k = gemm_input(k_in, ct);
  }
  const at::Tensor v = gemm_input(v_in, ct);
  at::Tensor out = cpu::empty_output({B, Cv, H, W}, v_in.options().dtype(ct));

  AT_DISPATCH_FLOATING_TYPES(ct, "cc_fwd_cpu", [&] {
    using T = scalar_t;
    cpu::check_blas<T>(CC_OP);
    const int64_t HW = H * W, L = H + W, Ld = row_len<T>(H, W), NB = images_per_group<T>(B, HW, Ld);
    check_blas_strides(HW, W * Ld, H, W);
    at::Tensor E_t = at::empty({NB * HW * Ld}, q.options());
    T* E = E_t.mutable_data_ptr<T>();
    const T sc = static_cast<T>(scale);
    const int64_t ntiles = (W + kTile - 1) / kTile;
    const int64_t tile_elems = kTile * H * (2 * Cqk + 2 * Cv);
    const Map<T> Q = as_map<T>(q), K = as_map<T>(k), V = as_map<T>(v);
    T *o0 = out.mutable_data_ptr<T>(), *l0 = lse.mutable_data_ptr<T>();
    for (int64_t b0 = 0; b0 < B; b0 += NB) {
      const int64_t nb = std::min(NB, B - b0);
      // Row energies: E[i][j][H + x] = <q[:, i, j], k[:, i, x]>. Item: (image, row).
      cpu::for_each_item_bytes(nb * H, 0, 0, [&](int64_t it, char*) {
        const int64_t b = b0 + it / H, i = it % H;
        T* Eb = E + (it / H) * HW * Ld;
        gemm<T>(mat(Eb + i * W * Ld + H, W, W, Ld), Q.row(b, i).t(), K.row(b, i), T(0));
      });
      // Per tile of columns: column energies E[i][j][y] = <q[:, i, j], k[:, y, j]>, the softmax
      // of its pixels, and the column part of out, written. Item: (image, tile).
      cpu::for_each_item_bytes(nb * ntiles, tile_elems * int64_t(sizeof(T)), 0, [&](int64_t it, char* s) {
        const int64_t b = b0 + it / ntiles, j0 = (it % ntiles) * kTile, tn = std::min(kTile, W - j0);
        T* Eb = E + (it / ntiles) * HW * Ld;
        T* Qc = reinterpret_cast<T*>(s);
        T *Kc = Qc + kTile * Cqk * H, *Vc = Kc + kTile * Cqk * H, *Oc = Vc + kTile * Cv * H;
        Q.pack(b, j0, tn, Qc);
        K.pack(b, j0, tn, Kc);
        for (int64_t t = 0; t < tn; ++t)
          gemm<T>(mat(Eb + (j0 + t) * Ld, H, H, W * Ld), Q.col(b, j0, t, Qc).t(),
                  K.col(b, j0, t, Kc), T(0));
        for (int64_t i = 0; i < H; ++i)
          for (int64_t t = 0; t < tn; ++t) {
            const int64_t p = i * W + j0 + t;
            l0[b * HW + p] = softmax_fwd<T>(Eb + p * Ld, L, Ld, i, sc);
          }
        V.pack(b, j0, tn, Vc);
        for (int64_t t = 0; t < tn; ++t)
          gemm<T>(mat(Oc + t * Cv * H, Cv, H, H), V.col(b, j0, t, Vc),
                  mat(Eb + (j0 + t) * Ld, H, H, W * Ld).t(), T(0));
        unpack_cols(Oc, Cv, H, W, j0, tn, o0 + b * Cv * HW);
      });
      // Row parts: out[:, i, :] += V_i P_row^T.
      cpu::for_each_item_bytes(nb * H, 0, 0, [&](int64_t it, char*) {
        const int64_t b = b0 + it / H, i = it % H;
        const T* Eb = E + (it / H) * HW * Ld;
        gemm<T>(mat(o0 + b * Cv * HW + i * W, Cv, W, HW), V.row(b, i),
                mat(Eb + i * W * Ld + H, W, W, Ld).t(), T(1));
      });
    }
  });
  if (ct != dt) out = out.to(dt);
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> cc_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in, double scale) {
  cc_checks::bwd(at::kCPU, dout_in, q_in, k_in, v_in, out_in, lse_in);
  const int64_t B = q_in.size(0), H = q_in.size(2), W = q_in.size(3);
  int64_t Cqk = q_in.size(1), Cv = v_in.size(1);
  const at::ScalarType dt = q_in.scalar_type(), ct = acc_dtype(dt);

  auto dq = cpu::empty_output({B, Cqk, H, W}, q_in.options());
  auto dk = cpu::empty_output({B, Cqk, H, W}, k_in.options());
  auto dv = cpu::empty_output({B, Cv, H, W}, v_in.options());
  if (B == 0 || H == 0 || W == 0) return {dq, dk, dv};

  // Zero-width q/k or v/dout: run with one zero channel (energies 0, resp. dP = 0) into scratch
  // gradients that are dropped; the real gradient of that width is empty.
  const auto copts = q_in.options().dtype(ct);
  at::Tensor q, k, v, dout;
  const bool no_qk = Cqk == 0, no_v = Cv == 0;
  if (no_qk) {
    Cqk = 1;
    q = k = at::zeros({B, 1, H, W}, copts);
  } else {
    q = gemm_input(q_in, ct);
    k = gemm_input(k_in, ct);
  }
  if (no_v) {
    Cv = 1;
    v = dout = at::zeros({B, 1, H, W}, copts);
  } else {
    v = gemm_input(v_in, ct);
    dout = gemm_input(dout_in, ct);
  }
  at::Tensor dq_c = (ct == dt && !no_qk) ? dq : cpu::empty_output({B, Cqk, H, W}, copts);
  at::Tensor dk_c = (ct == dt && !no_qk) ? dk : cpu::empty_output({B, Cqk, H, W}, copts);
  at::Tensor dv_c = (ct == dt && !no_v) ? dv : cpu::empty_output({B, Cv, H, W}, copts);

  AT_DISPATCH_FLOATING_TYPES(ct, "cc_bwd_cpu", [&] {
    using T = scalar_t;
    cpu::check_blas<T>(CC_OP);
    const int64_t HW = H * W, L = H + W, Ld = row_len<T>(H, W), NB = images_per_group<T>(B, HW, Ld);
    check_blas_strides(HW, W * Ld, H, W);
    // E: energies, then weights P; G: dP, then dE * scale. G's padding must be finite (zeros;
    // the GEMMs never write it).
    at::Tensor E_t = at::empty({NB * HW * Ld}, copts), G_t = at::zeros({NB * HW * Ld}, copts);
    T *E = E_t.mutable_data_ptr<T>(), *G = G_t.mutable_data_ptr<T>();
    const T sc = static_cast<T>(scale);
    const int64_t ntiles = (W + kTile - 1) / kTile;
    const int64_t tile_elems = kTile * H * (4 * Cqk + 2 * Cv);
    const Map<T> Q = as_map<T>(q), K = as_map<T>(k), V = as_map<T>(v), D = as_map<T>(dout);
    T *dq0 = dq_c.mutable_data_ptr<T>(), *dk0 = dk_c.mutable_data_ptr<T>(), *dv0 = dv_c.mutable_data_ptr<T>();
    for (int64_t b0 = 0; b0 < B; b0 += NB) {
      const int64_t nb = std::min(NB, B - b0);
      // Row energies and dP_row[i][j][x] = <dout[:, i, j], v[:, i, x]>. Item: (image, row).
      cpu::for_each_item_bytes(nb * H, 0, 0, [&](int64_t it, char*) {
        const int64_t b = b0 + it / H, i = it % H, r = (it / H) * HW * Ld + i * W * Ld + H;
        gemm<T>(mat(E + r, W, W, Ld), Q.row(b, i).t(), K.row(b, i), T(0));
        gemm<T>(mat(G + r, W, W, Ld), D.row(b, i).t(), V.row(b, i), T(0));
      });
      // Per tile of columns: column energies and dP_col[i][j][y] = <dout[:, i, j], v[:, y, j]>,
      // the tile's pixels' P and dE * scale, and the column parts of dq, dk, dv, written.
      // Item: (image, tile).
      cpu::for_each_item_bytes(nb * ntiles, tile_elems * int64_t(sizeof(T)), 0, [&](int64_t it, char* s) {
        const int64_t b = b0 + it / ntiles, j0 = (it % ntiles) * kTile, tn = std::min(kTile, W - j0);
        T *Eb = E + (it / ntiles) * HW * Ld, *Gb = G + (it / ntiles) * HW * Ld;
        const int64_t oq = b * Cqk * HW, ov = b * Cv * HW;
        T* Qc = reinterpret_cast<T*>(s);
        T *Kc = Qc + kTile * Cqk * H, *dQc = Kc + kTile * Cqk * H, *dKc = dQc + kTile * Cqk * H;
        T *Dc = dKc + kTile * Cqk * H, *Vc = Dc + kTile * Cv * H;
        Q.pack(b, j0, tn, Qc);
        K.pack(b, j0, tn, Kc);
        D.pack(b, j0, tn, Dc);
        V.pack(b, j0, tn, Vc);
        for (int64_t t = 0; t < tn; ++t) {
          const int64_t c = (j0 + t) * Ld;
          gemm<T>(mat(Eb + c, H, H, W * Ld), Q.col(b, j0, t, Qc).t(), K.col(b, j0, t, Kc), T(0));
          gemm<T>(mat(Gb + c, H, H, W * Ld), D.col(b, j0, t, Dc).t(), V.col(b, j0, t, Vc), T(0));
        }
        for (int64_t i = 0; i < H; ++i)
          for (int64_t t = 0; t < tn; ++t) {
            const int64_t p = (i * W + j0 + t) * Ld;
            softmax_fwd<T>(Eb + p, L, Ld, i, sc);
            softmax_bwd<T>(Eb + p, Gb + p, Ld, sc);
          }
        // dv[:, y, j] = sum_i dout[:, i, j] P[i][y] (into Vc, no longer needed, or unused when v
        // is channels-last),
        // dq[:, i, j] = sum_y k[:, y, j] dS[i][y], dk[:, y, j] = sum_i q[:, i, j] dS[i][y].
        for (int64_t t = 0; t < tn; ++t) {
          const Mat<T> Pc = mat(Eb + (j0 + t) * Ld, H, H, W * Ld), dSc = mat(Gb + (j0 + t) * Ld, H, H, W * Ld);
          gemm<T>(mat(Vc + t * Cv * H, Cv, H, H), D.col(b, j0, t, Dc), Pc, T(0));
          gemm<T>(mat(dQc + t * Cqk * H, Cqk, H, H), K.col(b, j0, t, Kc), dSc.t(), T(0));
          gemm<T>(mat(dKc + t * Cqk * H, Cqk, H, H), Q.col(b, j0, t, Qc), dSc, T(0));
        }
        unpack_cols(Vc, Cv, H, W, j0, tn, dv0 + ov);
        unpack_cols(dQc, Cqk, H, W, j0, tn, dq0 + oq);
        unpack_cols(dKc, Cqk, H, W, j0, tn, dk0 + oq);
      });
      // Row parts: dq_i += K_i dS_row^T, dk_i += Q_i dS_row, dv_i += dO_i P_row. Item: (image, row).
      cpu::for_each_item_bytes(nb * H, 0, 0, [&](int64_t it, char*) {
        const int64_t b = b0 + it / H, i = it % H, r = (it / H) * HW * Ld + i * W * Ld + H;
        const int64_t oq = b * Cqk * HW + i * W, ov = b * Cv * HW + i * W;
        const Mat<T> Pr = mat(E + r, W, W, Ld), dSr = mat(G + r, W, W, Ld);
        gemm<T>(mat(dq0 + oq, Cqk, W, HW), K.row(b, i), dSr.t(), T(1));
        gemm<T>(mat(dk0 + oq, Cqk, W, HW), Q.row(b, i), dSr, T(1));
        gemm<T>(mat(dv0 + ov, Cv, W, HW), D.row(b, i), Pr, T(1));
      });
    }
  });
  if (!no_qk && ct != dt) {
    dq = dq_c.to(dt);
    dk = dk_c.to(dt);
  }
  if (!no_v && ct != dt) dv = dv_c.to(dt);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace cc_cpu
}  // namespace fastctx

TORCH_LIBRARY_IMPL(fastctx, CPU, m) {
  m.impl("cc_fwd", &fastctx::cc_cpu::cc_fwd_cpu);
  m.impl("cc_bwd", &fastctx::cc_cpu::cc_bwd_cpu);
}
