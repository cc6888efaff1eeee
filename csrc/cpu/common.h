// What every CPU launcher shares (besides ../ops/checks.h): the one input copy, argument checks,
// zeroed per-thread scratch, the run-time AVX2 / AVX-512 tests, the work loop over independent items and
// GEMMs on raw pointers.
// The vector helpers used inside the kernels are in vec.h.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "../ops/checks.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// GEMMs on raw pointers (criss-cross and interlaced attention): the BLAS that torch links (MKL in
// the x86-64 wheels) through its Fortran entry points, which libtorch_cpu exports. at::mm_out on
// from_blob views costs 5-10 us of tensor and dispatcher work a call, and these kernels make
// thousands of small calls (criss-cross: 10 per row and per column in the backward; at 32 x 32
// maps and below that was most of the time). Weak, so that the extension still loads against a
// torch without them; the ops then say so (check_blas). Inside at::parallel_for's workers the
// BLAS runs single-threaded.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace fastctx {
namespace cpu {

// The ops that call gemm() check this first.
template <class T>
void check_blas(const char* op_name) {
  const bool ok = std::is_same<T, float>::value ? sgemm_ != nullptr : dgemm_ != nullptr;
  TORCH_CHECK(ok, op_name,
              ": the cpu backend calls torch's BLAS (sgemm_ / dgemm_), which this torch build does "
              "not export; use backend=\"reference\"");
}

// A rows x cols matrix at p with row stride ld and unit column stride (row-major), or, tr, the
// transpose of the cols x rows matrix stored so.
template <class T>
struct Mat {
  T* p;
  int64_t rows, cols, ld;
  bool tr;
  Mat t() const { return {p, cols, rows, ld, !tr}; }
};

template <class T>
Mat<T> mat(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return {const_cast<T*>(p), rows, cols, ld, false};
}

// C = A B + beta C, C not transposed. In BLAS's column-major terms: C^T = B^T A^T, and a
// row-major matrix is its transpose (so an operand that is not transposed here is 'N' there).
template <class T>
void gemm(const Mat<T>& C, const Mat<T>& A, const Mat<T>& B, T beta) {
  const char ta = B.tr ? 'T' : 'N', tb = A.tr ? 'T' : 'N';
  const int m = static_cast<int>(C.cols), n = static_cast<int>(C.rows), k = static_cast<int>(A.cols);
  const int lda = static_cast<int>(B.ld), ldb = static_cast<int>(A.ld), ldc = static_cast<int>(C.ld);
  const T one = T(1);
  if constexpr (std::is_same<T, float>::value)
    sgemm_(&ta, &tb, &m, &n, &k, &one, B.p, &lda, A.p, &ldb, &beta, C.p, &ldc);
  else
    dgemm_(&ta, &tb, &m, &n, &k, &one, B.p, &lda, A.p, &ldb, &beta, C.p, &ldc);
}

// A fresh big output (out, dq, dv, ...) is written once, by the kernels; on Linux its first touch
// costs a page fault per 4 KiB page (the allocator hands such blocks back to the system when they
// are freed, so every call faults them in again), which measured as much time as the arithmetic
// at OCR's and CCNet's sizes (e.g. 8386 faults per criss-cross forward at 65x129, 34 MiB out).
// Asking for transparent huge pages on the 2 MiB-aligned part of the block (what PyTorch's
// THP_MEM_ALLOC_ENABLE does for every allocation) makes that one fault per 2 MiB. Only a hint:
// it changes no values, is a no-op where THP is off, and a failure is ignored.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t bytes = static_cast<uintptr_t>(t.numel()) * t.element_size();
  if (bytes < 2 * kHuge) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (a + kHuge - 1) & ~(kHuge - 1), hi = (a + bytes) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// at::empty for a big output the kernels write in full, with the huge-page hint above.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}

// A channels-last-contiguous float32 / float64 [B, C, H, W] map into the NCHW-contiguous dst of
// the same shape and dtype (layout.cpp).
void nhwc_to_nchw(const at::Tensor& src, const at::Tensor& dst);

// A [B, C, H, W] map laid out channels-last and not NCHW-contiguous (a map that is both, e.g.
// with C = 1, counts as NCHW).
inline bool is_nhwc(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The one copy of an input: contiguous in the compute dtype (no copy for a contiguous tensor of
// that dtype), allocated as empty_output() allocates. (Not Tensor::to(dtype, ...,
// MemoryFormat::Contiguous): that aliases any tensor whose suggest_memory_format() is Contiguous,
// e.g. a permuted one, without making it contiguous.) A channels_last map of the compute dtype is
// transposed by nhwc_to_nchw (layout.cpp), faster than torch's copy_.
inline at::Tensor prepare(const at::Tensor& t, at::ScalarType ct) {
  if (t.scalar_type() == ct && t.is_contiguous()) return t;
  at::Tensor r = empty_output(t.sizes(), t.options().dtype(ct));
  if (t.scalar_type() == ct && is_nhwc(t) && (ct == at::kFloat || ct == at::kDouble)) {
    nhwc_to_nchw(t, r);
  } else {
    r.copy_(t);
  }
  return r;
}

// A map as a kernel that can read channels-last input in place takes it: a channels-last map of
// the compute dtype as it is (nhwc set), anything else as prepare() gives it (NCHW).
inline at::Tensor prepare_or_nhwc(const at::Tensor& t, at::ScalarType ct, bool& nhwc) {
  nhwc = t.scalar_type() == ct && is_nhwc(t);
  return nhwc ? t : prepare(t, ct);
}

// check_tensor of ../ops/checks.h on the CPU.
inline void check_tensor(const char* op_name, const char* stage, const at::Tensor& t,
                         const char* name, int64_t dim, const char* shape, const at::Tensor& ref,
                         const char* ref_name = "q") {
  fastctx::check_tensor(at::kCPU, op_name, stage, t, name, dim, shape, ref, ref_name);
}

// The same without a reference: `name` is a defined CPU tensor of rank `dim`.
inline void check_tensor(const char* op_name, const char* stage, const at::Tensor& t,
                         const char* name, int64_t dim, const char* shape) {
  check_tensor(op_name, stage, t, name, dim, shape, t, name);
}

// Whether the AVX2 + FMA build of a kernel may run here. The kernels are compiled twice (see
// vec.h) and launchers test this at run time: GCC's target_clones dispatcher tests the CPU model
// and never picks the AVX2 clone on AMD parts.
inline bool use_avx2() {
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// Whether an AVX-512 build of a kernel may run here (F, DQ, BW, VL), unless the environment
// variable FASTCTX_CPU_AVX512 is 0 (read once; for A/B timing and tests of the AVX2 build).
inline bool use_avx512() {
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok = [] {
    const char* env = std::getenv("FASTCTX_CPU_AVX512");
    if (env != nullptr && std::strcmp(env, "0") == 0) return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

// The vector bytes of the kernels that have an AVX-512 build (spatial gather, region
// attention): 64 where use_avx512(), else 32 (AVX2, or the baseline build's 32-byte vector types).
inline int64_t vec_bytes() { return use_avx512() ? 64 : 32; }

// Per-thread scratch for at::parallel_for(0, nslots, 1, ...): the call that starts at `begin`
// owns slot `begin` (the calls get disjoint ranges of [0, nslots)). One block of nslots slots
// of `bytes` each (rounded up to 64: every slot 64-byte aligned), allocated by torch's CPU
// allocator on the calling thread: so the profiler's memory events count it (fastctx bench's
// CPU peak memory reads them), which they would not from the OpenMP workers, which do not carry
// the profiler's thread-local state. The block is not touched here: a slot's pages are first
// touched by the thread that uses it (slot() zeroes its first zero_bytes).
class ScratchSlots {
 public:
  ScratchSlots(int64_t nslots, int64_t bytes)
      : stride_((std::max<int64_t>(bytes, 1) + 63) / 64 * 64),
        block_(at::empty({std::max<int64_t>(nslots, 1) * stride_}, at::TensorOptions(at::kByte))) {}
  char* slot(int64_t i, int64_t zero_bytes) const {
    char* p = static_cast<char*>(block_.data_ptr()) + i * stride_;
    std::memset(p, 0, static_cast<size_t>(std::clamp<int64_t>(zero_bytes, 0, stride_)));
    return p;
  }

 private:
  int64_t stride_;
  at::Tensor block_;
};

// Runs fn(i, scratch) for every i in [0, n) on up to get_num_threads() threads, each with its
// own scratch of `bytes` (char*, 64-byte aligned; the first zero_bytes zeroed). Items are claimed
// one at a time from a shared counter, so a thread that is descheduled (a loaded machine) holds
// up no one. Which thread runs an item must never change its result.
template <class Fn>
void for_each_item_bytes(int64_t n, int64_t bytes, int64_t zero_bytes, const Fn& fn) {
  const int64_t nthr = std::min<int64_t>(n, std::max<int64_t>(1, at::get_num_threads()));
  const ScratchSlots slots(nthr, bytes);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthr, 1, [&](int64_t begin, int64_t) {
    char* s = slots.slot(begin, zero_bytes);
    for (int64_t i = next++; i < n; i = next++) fn(i, s);
  });
}

// The same with a zero-initialised scratch of scratch_elems values of T: fn(i, T*).
template <class T, class Fn>
void for_each_item(int64_t n, int64_t scratch_elems, const Fn& fn) {
  const int64_t bytes = scratch_elems * static_cast<int64_t>(sizeof(T));
  for_each_item_bytes(n, bytes, bytes, [&](int64_t i, char* s) { fn(i, reinterpret_cast<T*>(s)); });
}

}  // namespace cpu
}  // namespace fastctx
