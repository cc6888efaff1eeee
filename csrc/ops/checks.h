// What every backend's launchers (csrc/cpu, csrc/cuda) share about their arguments: the dtype the
// kernels accumulate in, and checks whose messages name the op, the stage, the argument and the
// shapes. Each op's own checks, written once for both devices, are in csrc/ops/<op>.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace fastctx {

// The dtype the kernels accumulate (and keep statistics such as lse) in: float64 for float64,
// float32 for float16 / bfloat16 / float32.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
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

// `name` of op `op_name` (stage `stage`, e.g. "sp_fwd") is a defined tensor on a `dev` device,
// the device of `ref` (called `ref_name`), of rank `dim` (layout `shape`, for the message), with
// the dtype of `ref` when `same_dtype`.
inline void check_tensor(c10::DeviceType dev, const char* op_name, const char* stage,
                         const at::Tensor& t, const char* name, int64_t dim, const char* shape,
                         const at::Tensor& ref, const char* ref_name, bool same_dtype = true) {
  TORCH_CHECK(t.defined(), op_name, " (", stage, "): ", name, " is undefined");
  TORCH_CHECK(t.device().type() == dev, op_name, " (", stage, "): ", name, " must be a ",
              c10::DeviceTypeName(dev), " tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op_name, " (", stage, "): ", name, " is on ",
              t.device(), " but ", ref_name, " is on ", ref.device());
  TORCH_CHECK(t.dim() == dim, op_name, " (", stage, "): ", name, " must be ", dim, "-D ", shape,
              ", got shape ", t.sizes());
  TORCH_CHECK(!same_dtype || t.scalar_type() == ref.scalar_type(), op_name, " (", stage, "): ",
              name, " has dtype ", t.scalar_type(), " but ", ref_name, " has dtype ",
              ref.scalar_type());
}

// q, k [B, Cqk, H, W] (same shape) and v [B, Cv, H, W] of one map: floating, one device and dtype
// (criss-cross and interlaced attention).
inline void check_qkv_map(c10::DeviceType dev, const char* op_name, const char* stage,
                          const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_tensor(dev, op_name, stage, q, "q", 4, "[B, Cqk, H, W]", q, "q");
  check_float(op_name, stage, q, "q");
  check_tensor(dev, op_name, stage, k, "k", 4, "[B, Cqk, H, W]", q, "q");
  check_tensor(dev, op_name, stage, v, "v", 4, "[B, Cv, H, W]", q, "q");
  TORCH_CHECK(k.sizes() == q.sizes(), op_name, " (", stage,
              "): q and k must have the same shape, got q ", q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(2) == q.size(2) && v.size(3) == q.size(3), op_name,
              " (", stage, "): v must match q in batch and spatial size, got q ", q.sizes(),
              " and v ", v.sizes());
}

// A statistic the forward kept for the backward (lse): a tensor on the device of `ref`, of the
// given sizes (layout `shape`, for the message), in the accumulation dtype of `ref`.
inline void check_stat(c10::DeviceType dev, const char* op_name, const char* stage,
                       const at::Tensor& t, const char* name, const char* shape,
                       at::IntArrayRef sizes, const at::Tensor& ref) {
  TORCH_CHECK(t.defined() && t.device().type() == dev && t.device() == ref.device(), op_name,
              " (", stage, "): ", name, " must be a tensor on ", ref.device());
  TORCH_CHECK(t.sizes() == sizes, op_name, " (", stage, "): ", name, " must have shape ", shape,
              " = ", sizes, ", got ", t.sizes());
  const at::ScalarType ct = acc_dtype(ref.scalar_type());
  TORCH_CHECK(t.scalar_type() == ct, op_name, " (", stage, "): ", name, " must have dtype ", ct,
              " for ", ref.scalar_type(), " inputs, got ", t.scalar_type());
}

}  // namespace fastctx
