// The argument checks of the compiled region-attention ops (schemas: region_attention.cpp), one
// for every device: the CPU and CUDA launchers call them with their device type.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>

#include "checks.h"

namespace fastctx {
namespace ra_checks {

constexpr const char* kOp = "fastctx.region_attention";

// q [B, Cqk, H, W] floating, k [B, Cqk, S], v [B, Cv, S], bias [B, S]: one device and dtype.
inline void inputs(c10::DeviceType dev, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& bias, const char* stage) {
  check_tensor(dev, kOp, stage, q, "q", 4, "[B, Cqk, H, W]", q, "q");
  check_float(kOp, stage, q, "q");
  check_tensor(dev, kOp, stage, k, "k", 3, "[B, Cqk, S]", q, "q");
  check_tensor(dev, kOp, stage, v, "v", 3, "[B, Cv, S]", q, "q");
  check_tensor(dev, kOp, stage, bias, "bias", 2, "[B, S]", q, "q");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1), kOp, " (", stage,
              "): k must be [B, Cqk, S] with B and Cqk of q, got q ", q.sizes(), " and k ",
              k.sizes());
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(2) == k.size(2), kOp, " (", stage,
              "): v must be [B, Cv, S] with B and S of k, got k ", k.sizes(), " and v ",
              v.sizes());
  TORCH_CHECK(bias.size(0) == k.size(0) && bias.size(1) == k.size(2), kOp, " (", stage,
              "): bias must be [B, S] = [", k.size(0), ", ", k.size(2), "], got ", bias.sizes());
}

// ra_bwd's dout and out: [B, Cv, H, W] with B, H, W of q and Cv of v.
inline void outputs(c10::DeviceType dev, const at::Tensor& dout, const at::Tensor& out,
                    const at::Tensor& q, const at::Tensor& v) {
  check_tensor(dev, kOp, "ra_bwd", dout, "dout", 4, "[B, Cv, H, W]", q, "q");
  check_tensor(dev, kOp, "ra_bwd", out, "out", 4, "[B, Cv, H, W]", q, "q");
  const std::array<int64_t, 4> shape{q.size(0), v.size(1), q.size(2), q.size(3)};
  const at::IntArrayRef sizes(shape);
  TORCH_CHECK(dout.sizes() == sizes, kOp, " (ra_bwd): dout must be [B, Cv, H, W] = ", sizes,
              ", got ", dout.sizes());
  TORCH_CHECK(out.sizes() == sizes, kOp, " (ra_bwd): out must be [B, Cv, H, W] = ", sizes,
              ", got ", out.sizes());
}

}  // namespace ra_checks
}  // namespace fastctx
