// The argument checks of the compiled criss-cross ops (schemas: criss_cross.cpp), one for every
// device: the CPU and CUDA launchers call them with their device type.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>

#include "checks.h"

namespace fastctx {
namespace cc_checks {

constexpr const char* kOp = "fastctx.criss_cross_attention";

// q, k [B, Cqk, H, W] (same shape), v [B, Cv, H, W], floating, one device and dtype.
inline void qkv(c10::DeviceType dev, const at::Tensor& q, const at::Tensor& k,
                const at::Tensor& v, const char* stage) {
  check_qkv_map(dev, kOp, stage, q, k, v);
}

// cc_bwd's arguments: q, k, v as above; dout and out of v's shape; lse [B, H, W] in the
// accumulation dtype.
inline void bwd(c10::DeviceType dev, const at::Tensor& dout, const at::Tensor& q,
                const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                const at::Tensor& lse) {
  qkv(dev, q, k, v, "cc_bwd");
  check_tensor(dev, kOp, "cc_bwd", dout, "dout", 4, "[B, Cv, H, W]", q, "q");
  check_tensor(dev, kOp, "cc_bwd", out, "out", 4, "[B, Cv, H, W]", q, "q");
  TORCH_CHECK(dout.sizes() == v.sizes(), kOp, " (cc_bwd): dout must have the shape of v ",
              v.sizes(), ", got ", dout.sizes());
  TORCH_CHECK(out.sizes() == v.sizes(), kOp, " (cc_bwd): out must have the shape of v ", v.sizes(),
              ", got ", out.sizes());
  const std::array<int64_t, 3> sizes{q.size(0), q.size(2), q.size(3)};
  check_stat(dev, kOp, "cc_bwd", lse, "lse", "[B, H, W]", sizes, q);
}

}  // namespace cc_checks
}  // namespace fastctx
