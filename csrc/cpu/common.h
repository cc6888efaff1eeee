// What every CPU launcher shares: the compute dtype, the one input copy, argument checks,
// zeroed per-thread scratch, the run-time AVX2 test and the work loop over independent items.
// The vector helpers used inside the kernels are in vec.h.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastctx {
namespace cpu {

// float32 for float16 / bfloat16 / float32 inputs, float64 for float64.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The one copy of an input: contiguous in the compute dtype (a no-op for a contiguous tensor of
// that dtype). (Not Tensor::to(dtype, ..., MemoryFormat::Contiguous): that aliases any tensor
// whose suggest_memory_format() is Contiguous, e.g. a permuted one, without making it contiguous.)
inline at::Tensor prepare(const at::Tensor& t, at::ScalarType ct) {
  if (t.scalar_type() == ct) return t.contiguous();
  at::Tensor r = at::empty(t.sizes(), t.options().dtype(ct));
  r.copy_(t);
  return r;
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

// `name` of op `op_name` (stage `stage`, e.g. "ra_fwd") is a defined CPU tensor of rank `dim`
// (layout `shape`, for the message) with the device and dtype of `ref` (called `ref_name`).
inline void check_tensor(const char* op_name, const char* stage, const at::Tensor& t,
                         const char* name, int64_t dim, const char* shape, const at::Tensor& ref,
                         const char* ref_name = "q") {
  TORCH_CHECK(t.defined(), op_name, " (", stage, "): ", name, " is undefined");
  TORCH_CHECK(t.device() == ref.device(), op_name, " (", stage, "): ", name, " is on ",
              t.device(), " but ", ref_name, " is on ", ref.device());
  TORCH_CHECK(t.device().is_cpu(), op_name, " (", stage, "): ", name,
              " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == dim, op_name, " (", stage, "): ", name, " must be ", dim, "-D ", shape,
              ", got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op_name, " (", stage, "): ", name,
              " has dtype ", t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
}

// The same without a reference: `name` is a defined CPU tensor of rank `dim`.
inline void check_tensor(const char* op_name, const char* stage, const at::Tensor& t,
                         const char* name, int64_t dim, const char* shape) {
  check_tensor(op_name, stage, t, name, dim, shape, t, name);
}

// float16, bfloat16, float32 or float64.
inline bool is_float(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

// t is float16, bfloat16, float32 or float64.
inline void check_float(const char* op_name, const char* stage, const at::Tensor& t,
                        const char* name) {
  TORCH_CHECK(is_float(t.scalar_type()), op_name, " (", stage, "): ", name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
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

// Zero-initialised, 64-byte aligned per-thread scratch (the zeros matter to kernels that run
// element-wise passes over padding lanes: see their headers).
template <class T>
class Scratch {
 public:
  Scratch(int64_t n, const char* op_name) {
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64 * 64;
    p_ = static_cast<T*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(p_ != nullptr, op_name, ": could not allocate ", bytes, " bytes of scratch");
    std::memset(p_, 0, bytes);
  }
  ~Scratch() { std::free(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() const { return p_; }

 private:
  T* p_;
};

// Runs fn(i, scratch) for every i in [0, n) on up to get_num_threads() threads, each with its
// own zero-initialised scratch of scratch_elems values. Items are claimed one at a time from a
// shared counter, so a thread that is descheduled (a loaded machine) holds up no one. Which
// thread runs an item must never change its result.
template <class T, class Fn>
void for_each_item(int64_t n, int64_t scratch_elems, const char* op_name, const Fn& fn) {
  const int64_t nthr = std::min<int64_t>(n, std::max<int64_t>(1, at::get_num_threads()));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthr, 1, [&](int64_t, int64_t) {
    Scratch<T> s(scratch_elems, op_name);
    for (int64_t i = next++; i < n; i = next++) fn(i, s.data());
  });
}

}  // namespace cpu
}  // namespace fastctx
