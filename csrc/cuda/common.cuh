// What the CUDA sources share: device math in the accumulation type (float for float16 /
// bfloat16 / float32, double for float64) and the launchers' argument check.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <math.h>

// A kernel's dynamic shared memory (the CPU emulation of tests/cuda_emu defines its own).
#ifndef FASTCTX_DYNAMIC_SMEM
#define FASTCTX_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace fastctx {
namespace gpu {

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
__device__ __forceinline__ float acc_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double acc_max(double a, double b) { return fmax(a, b); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -static_cast<acc_t>(INFINITY);
}

// `name` of op `op_name` (stage `stage`, e.g. "sp_fwd") is a defined CUDA tensor of rank `dim`
// (layout `shape`, for the message) on the device of `ref` (called `ref_name`), with its dtype
// when `same_dtype`.
inline void check_tensor(const char* op_name, const char* stage, const at::Tensor& t,
                         const char* name, int64_t dim, const char* shape, const at::Tensor& ref,
                         const char* ref_name, bool same_dtype = true) {
  TORCH_CHECK(t.defined(), op_name, " (", stage, "): ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), op_name, " (", stage, "): ", name, " must be a CUDA tensor, got device ",
              t.device());
  TORCH_CHECK(t.device() == ref.device(), op_name, " (", stage, "): ", name, " is on ",
              t.device(), " but ", ref_name, " is on ", ref.device());
  TORCH_CHECK(t.dim() == dim, op_name, " (", stage, "): ", name, " must be ", dim, "-D ", shape,
              ", got shape ", t.sizes());
  TORCH_CHECK(!same_dtype || t.scalar_type() == ref.scalar_type(), op_name, " (", stage, "): ",
              name, " has dtype ", t.scalar_type(), " but ", ref_name, " has dtype ",
              ref.scalar_type());
}

// float16, bfloat16, float32 or float64.
inline void check_float(const char* op_name, const char* stage, const at::Tensor& t,
                        const char* name) {
  const at::ScalarType st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              op_name, " (", stage, "): ", name,
              " must be float16, bfloat16, float32 or float64, got ", st);
}

}  // namespace gpu
}  // namespace fastctx
